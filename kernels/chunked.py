"""Chunked fusion loss in plain torch: never more than [chunk x V] logits alive (the CPU default backend,
and on CUDA the GEMM path: three cuBLAS GEMMs, 6 N H V flops).

Per chunk of rows (math in rowmath.py):
    z = h W^T + b held in fp32 (fp64 for fp64 inputs), softcap in place. For bf16/fp16 inputs the GEMM
        takes the low-precision operands with an fp32 result (torch's out_dtype where it has one, CUDA;
        else the product is rounded once in the input dtype, exactly like F.linear) and is then upcast
    m, argmax = max_v z;  z_sp = z[label, ids] (gather before z is overwritten)
    buf = exp(z - m) in place -> lse = m + log(sum buf)        (and exp(z/T - m/T) in a 2nd buffer, T != 1)
    tail_bucket: the sum over the columns outside the row's support, taken with those columns zeroed
        (saved and put back), gives lse_out without subtracting anything from lse
    loss terms and gradient coefficients (rowmath) -> buf becomes dLoss/dz in place:
    dz = alpha q + beta qT + [outside support] gamma exp(z - lse_out) + scatter(sp_ids, sp_coef),
        times 1 - (z/cap)^2 under softcap
    d_hidden[chunk] = dz W;  d_weight += dz^T h;  d_bias += sum_rows dz
With `lowp_grad` (default on CUDA for bf16/fp16 inputs) dz is rounded to the input dtype before the two
gradient GEMMs, as torch's own matmul backward does: tensor-core GEMMs, d_weight accumulated in fp32 (an
fp32 result of the low-precision GEMM where torch has out_dtype). Otherwise the GEMMs run in fp32.

Chunk sizes. Rows per chunk = budget / (V * 4 bytes * buffers). The default budget is 256 MiB on the CPU
and, on CUDA, the size of the weight in the input dtype (V * H * 2 bytes for bf16): the logits buffer then
costs no more than the weight gradient CCE also holds, and at H = 4096 a chunk is ~2,048 rows, enough for
full-speed GEMMs. When even MIN_ROWS rows would exceed the budget (huge V), the vocabulary is split into
blocks too, with a two-pass path: pass 1 computes online max / sum-exp over V blocks, pass 2 recomputes
each block's logits for the dense gradient; z at label / teacher ids and the sparse gradient use indexed
dots with the gathered rows W[ids] (no block needs them).

Gradient timing (decided): with reduction "mean"/"sum", gradients are computed in the forward (one pass
over the logits instead of two, like Liger / CCE) and backward only multiplies them by grad_output.
Under ZeRO-3 the lm_head weight is therefore needed only while the forward runs and its gradient is
ready when backward reaches the loss. With reduction "none" the upstream gradient differs per row and
is unknown in forward, so backward recomputes the logits chunk by chunk (saving hidden and weight).
d_weight / d_bias are accumulated in fp32 and cast to the parameter dtype at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import FusionParams, FusionStats, reduction_scale, softcap
from .rowmath import RowTerms, grad_coefs, make_stats, row_loss, support_ids
from .targets import SparseTarget

MIN_ROWS = 64
CPU_BUDGET = 256 * 2**20


@dataclass(frozen=True)
class ChunkConfig:
    """budget_bytes: memory for the [rows x V-block] float buffers of one chunk (None: 256 MiB on the CPU,
    the weight's own size on CUDA; see the module doc). lowp_grad: round dz to a bf16/fp16 input's dtype
    for the gradient GEMMs (None: on CUDA only). fused: the chunk's elementwise work in the two Triton row
    kernels of triton_rows.py, on a logits buffer in the input dtype (None: on CUDA only)."""

    budget_bytes: int | None = None
    lowp_grad: bool | None = None
    fused: bool | None = None

    def budget(self, weight: torch.Tensor) -> int:
        if self.budget_bytes is not None:
            return self.budget_bytes
        if weight.is_cuda:
            return max(CPU_BUDGET, weight.numel() * weight.element_size())
        return CPU_BUDGET


def _plan(N: int, V: int, n_buf: int, elt: int, budget: int) -> tuple[int, int]:
    """(rows per chunk, vocabulary block) so that rows * vblock * elt * n_buf <= budget."""
    per_row = V * elt * n_buf
    rows = budget // per_row
    if rows >= min(N, MIN_ROWS):
        return max(1, min(N, rows)), V
    rows = min(N, MIN_ROWS)
    vblock = max(1, budget // (rows * elt * n_buf))
    return rows, min(V, vblock)


class _Out:
    """Per-call accumulators: loss rows, optional stats rows and gradients."""

    def __init__(self, hidden, weight, bias, cdt, want_stats, need):
        N, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        self.loss = torch.empty(N, dtype=cdt, device=dev)
        self.ce = torch.empty(N, dtype=cdt, device=dev) if want_stats else None
        self.kd = torch.empty(N, dtype=cdt, device=dev) if want_stats else None
        self.sup = torch.empty(N, dtype=cdt, device=dev) if want_stats else None
        self.argmax = torch.empty(N, dtype=torch.int64, device=dev) if want_stats else None
        self.dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need[0] else None  # contiguous
        self.dw = torch.zeros((V, H), dtype=cdt, device=dev) if need[1] else None
        self.db = torch.zeros(V, dtype=cdt, device=dev) if (need[2] and bias is not None) else None

    def put_rows(self, r0, r1, terms: RowTerms, argmax):
        self.loss[r0:r1] = terms.loss
        if self.ce is not None:
            self.ce[r0:r1] = terms.ce
            self.kd[r0:r1] = terms.kd
            self.sup[r0:r1] = terms.sup_mass
            self.argmax[r0:r1] = argmax


_OUT_DTYPE = {"ok": None}  # whether torch.mm / addmm take out_dtype here (decided at the first CUDA call)


def _mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b for a, b of one dtype and out of that dtype or wider (fp32): the GEMM gets the
    low-precision operands and writes an fp32 result where torch supports out_dtype (CUDA); elsewhere the
    product is formed in the operands' dtype (rounded once, like F.linear) and then added in out's dtype."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.is_cuda and _OUT_DTYPE["ok"] is not False:
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            _OUT_DTYPE["ok"] = True
            return
        except (RuntimeError, TypeError):  # an older torch: no out_dtype GEMMs
            _OUT_DTYPE["ok"] = False
    prod = a @ b
    if accumulate:
        out += prod
    else:
        out.copy_(prod)


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out [c, v] (compute dtype) = h w^T + b, without [c, v] temporaries when torch allows it."""
    if b is None:
        _mm(out, h, w.t(), accumulate=False)
    elif h.dtype == out.dtype:
        torch.addmm(b, h, w.t(), out=out)
    else:
        out.copy_(b.to(out.dtype).expand_as(out))
        _mm(out, h, w.t(), accumulate=True)


def _softcap_(z: torch.Tensor, cap: float | None, fac: torch.Tensor | None) -> None:
    """z <- cap tanh(z / cap) in place; fac <- 1 - (z / cap)^2 (the chain-rule factor)."""
    if cap is None:
        return
    z.div_(cap).tanh_()
    if fac is not None:
        torch.mul(z, z, out=fac)
        fac.neg_().add_(1.0)
    z.mul_(cap)


def _indexed_logits(h, weight, bias, ids, cap, cdt):
    """z at ids: h [c, H], ids [c, S] (-1 allowed) -> z [c, S] in cdt (softcapped)."""
    safe = ids.clamp_min(0)
    z = torch.einsum("ch,csh->cs", h.to(cdt), weight[safe].to(cdt))
    if bias is not None:
        z = z + bias.to(cdt)[safe]
    return softcap(z, cap)


def _support_in_row(sup: torch.Tensor) -> torch.Tensor:
    """sup [c, S] (-1 = none) -> the same with every -1 replaced by one of the row's own support ids (0
    when the row has none): gathering / scattering there touches only support columns."""
    any_id = sup.amax(1, keepdim=True).clamp_min(0)
    return torch.where(sup >= 0, sup, any_id)


def _support_mask(sup: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """bool [c, v1 - v0]: column v0 + j is in the row's support."""
    inside = (sup >= v0) & (sup < v1)
    local = torch.where(inside, sup - v0, torch.zeros_like(sup))
    hits = torch.zeros((sup.shape[0], v1 - v0), dtype=torch.int32, device=sup.device)
    hits.scatter_add_(1, local, inside.to(torch.int32))  # add, not write: out-of-block slots add 0
    return hits > 0


def _chunk_single(h, weight, bias, tg: SparseTarget, params, g, out: _Out, r0, r1, bufs, cdt, lowp):
    """One row chunk with the whole vocabulary in one buffer (see module doc)."""
    c = r1 - r0
    T = params.temperature
    cap = params.softcap
    z = bufs[0][:c]
    zt = bufs[1][:c] if T != 1.0 else None
    fac = bufs[2][:c] if (cap is not None and g is not None) else None
    _logits_into(z, h, weight, bias)
    _softcap_(z, cap, fac)
    if out.argmax is not None:
        m, argmax = z.max(1)
    else:  # amax is ~3x cheaper than max-with-indices on CPU; argmax only feeds the stats
        m, argmax = z.amax(1), None
    sp_ids = torch.cat([tg.label.unsqueeze(1), tg.ids], dim=1)
    z_sp = z.gather(1, sp_ids.clamp_min(0))
    if zt is not None:
        torch.div(z, T, out=zt)
        zt.sub_((m / T).unsqueeze(1)).exp_()
        lse_t = (m / T) + zt.sum(1).log()
    z.sub_(m.unsqueeze(1)).exp_()
    sumexp = z.sum(1)
    lse = m + sumexp.log()
    if zt is None:
        lse_t = lse
    lse_out = sup = saved = None
    if params.tail_bucket:  # the complement's sum with the support columns zeroed, then put back
        sup = _support_in_row(support_ids(tg))
        saved = z.gather(1, sup)
        z.scatter_(1, sup, 0.0)
        lse_out = m + z.sum(1).log()
        z.scatter_(1, sup, saved)
    terms = row_loss(tg, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], params, lse_out)
    out.put_rows(r0, r1, terms, argmax)
    if g is None:
        return
    gc = grad_coefs(tg, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], params, g, lse_out)
    if zt is None:
        dense = (gc.alpha + gc.beta) / sumexp
        if sup is not None:  # gamma on every column, then the support columns rewritten without it
            z.mul_((dense + gc.gamma * torch.exp(m - gc.lse_out)).unsqueeze(1))
            z.scatter_(1, sup, saved * dense.unsqueeze(1))
        else:
            z.mul_(dense.unsqueeze(1))
    else:
        z.mul_((gc.alpha / sumexp).unsqueeze(1))
        z.add_(zt.mul_((gc.beta * torch.exp(m / T - lse_t)).unsqueeze(1)))
    z.scatter_add_(1, gc.sp_ids.clamp_min(0), gc.sp_coef)
    if fac is not None:
        z.mul_(fac)
    _apply_dz(z, h, weight, out, r0, r1, 0, weight.shape[0], lowp)


def _chunk_fused(h, weight, bias, tg: SparseTarget, params, g, out: _Out, r0, r1, buf, cdt):
    """One row chunk on the Triton row kernels (triton_rows.py): the GEMM writes raw logits in the buffer's
    dtype, one kernel reads them for the row statistics, one overwrites them with the dense dLoss/dz."""
    from .triton_rows import rows_dz_, rows_lse

    c = r1 - r0
    cap, T = params.softcap, params.temperature
    z = buf[:c]
    if bias is None:
        torch.mm(h, weight.t(), out=z)
    else:
        torch.addmm(bias, h, weight.t(), out=z)
    sp_ids = torch.cat([tg.label.unsqueeze(1), tg.ids], dim=1)
    safe = sp_ids.clamp_min(0)
    z_sp = z.gather(1, safe).to(cdt)
    z_sp = softcap(z_sp, cap)
    sup = support_ids(tg) if params.tail_bucket else None
    rs = rows_lse(z, cap, T, sup, argmax=out.argmax is not None)
    terms = row_loss(tg, rs.lse, rs.lse_t, z_sp[:, 0], z_sp[:, 1:], params, rs.lse_out)
    out.put_rows(r0, r1, terms, rs.argmax)
    if g is None:
        return
    gc = grad_coefs(tg, rs.lse, rs.lse_t, z_sp[:, 0], z_sp[:, 1:], params, g, rs.lse_out)
    rows_dz_(z, cap, T, sup, rs.lse, rs.lse_t, gc.lse_out, gc.alpha, gc.beta, gc.gamma)
    # sparse part, rounded once: each id's coefficients summed in fp32 (duplicates included), added to the
    # dense value there, written back (every slot of an id writes the same value)
    coef = gc.sp_coef if cap is None else gc.sp_coef * (1.0 - (z_sp / cap) ** 2)
    same = safe.unsqueeze(2) == safe.unsqueeze(1)  # [c, S', S']
    total = (same * coef.unsqueeze(1)).sum(2)
    z.scatter_(1, safe, (z.gather(1, safe).to(cdt) + total).to(z.dtype))
    _apply_dz(z, h, weight, out, r0, r1, 0, weight.shape[0], lowp=True)


def _apply_dz(dz, h, weight, out: _Out, r0, r1, v0, v1, lowp):
    """Accumulate the GEMM gradients of dz [c, v1 - v0] (fp32/fp64) for rows [r0, r1) and columns [v0, v1)."""
    full = v0 == 0 and v1 == weight.shape[0]
    if lowp and weight.dtype != dz.dtype:
        dz = dz.to(weight.dtype)  # what torch's bf16 matmul backward feeds its GEMMs
    if out.dh is not None:
        w = weight[v0:v1]
        if dz.dtype == w.dtype:
            _mm(out.dh[r0:r1], dz, w, accumulate=not full)
        else:
            prod = dz.to(w.dtype) @ w
            if full:
                out.dh[r0:r1] = prod
            else:
                out.dh[r0:r1] += prod
    if out.dw is not None:
        _mm(out.dw[v0:v1], dz.t(), h if dz.dtype == h.dtype else h.to(dz.dtype), accumulate=True)
    if out.db is not None:
        out.db[v0:v1] += dz.sum(0, dtype=out.db.dtype)


def _chunk_blocked(h, weight, bias, tg: SparseTarget, params, g, out: _Out, r0, r1, bufs, cdt, vblock, lowp):
    """One row chunk with the vocabulary in blocks: two passes (see module doc)."""
    c = r1 - r0
    V = weight.shape[0]
    T = params.temperature
    cap = params.softcap
    dev = h.device
    m = torch.full((c,), -torch.inf, dtype=cdt, device=dev)
    s = torch.zeros(c, dtype=cdt, device=dev)
    s_t = torch.zeros(c, dtype=cdt, device=dev)
    s_out = torch.zeros(c, dtype=cdt, device=dev)
    sup = support_ids(tg) if params.tail_bucket else None
    argmax = torch.zeros(c, dtype=torch.int64, device=dev)
    for v0 in range(0, V, vblock):
        v1 = min(V, v0 + vblock)
        z = bufs[0][:c, : v1 - v0]
        _logits_into(z, h, weight[v0:v1], None if bias is None else bias[v0:v1])
        _softcap_(z, cap, None)
        bm, bi = z.max(1)
        m_new = torch.maximum(m, bm)
        argmax = torch.where(bm > m, bi + v0, argmax)
        if T != 1.0:
            zt = bufs[1][:c, : v1 - v0]
            torch.sub(z, m_new.unsqueeze(1), out=zt)
            s_t = s_t * torch.exp((m - m_new) / T) + zt.div_(T).exp_().sum(1)
        rescale = torch.exp(m - m_new)
        z.sub_(m_new.unsqueeze(1)).exp_()
        s = s * rescale + z.sum(1)
        if sup is not None:
            s_out = s_out * rescale + z.masked_fill(_support_mask(sup, v0, v1), 0.0).sum(1)
        m = m_new
    lse = m + s.log()
    lse_t = m / T + s_t.log() if T != 1.0 else lse
    lse_out = m + s_out.log() if sup is not None else None
    sp_ids = torch.cat([tg.label.unsqueeze(1), tg.ids], dim=1)
    z_sp = _indexed_logits(h, weight, bias, sp_ids, cap, cdt)
    terms = row_loss(tg, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], params, lse_out)
    out.put_rows(r0, r1, terms, argmax)
    if g is None:
        return
    gc = grad_coefs(tg, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], params, g, lse_out)
    if out.dh is not None:
        out.dh[r0:r1].zero_()
    for v0 in range(0, V, vblock):
        v1 = min(V, v0 + vblock)
        z = bufs[0][:c, : v1 - v0]
        fac = bufs[2][:c, : v1 - v0] if cap is not None else None
        _logits_into(z, h, weight[v0:v1], None if bias is None else bias[v0:v1])
        _softcap_(z, cap, fac)
        if T != 1.0:
            zt = bufs[1][:c, : v1 - v0]
            torch.div(z, T, out=zt)
            zt.sub_(lse_t.unsqueeze(1)).exp_().mul_(gc.beta.unsqueeze(1))
            z.sub_(lse.unsqueeze(1)).exp_().mul_(gc.alpha.unsqueeze(1)).add_(zt)
        elif sup is not None:
            tail = torch.exp(z - gc.lse_out.unsqueeze(1)).mul_(gc.gamma.unsqueeze(1))
            tail.masked_fill_(_support_mask(sup, v0, v1), 0.0)
            z.sub_(lse.unsqueeze(1)).exp_().mul_((gc.alpha + gc.beta).unsqueeze(1)).add_(tail)
        else:
            z.sub_(lse.unsqueeze(1)).exp_().mul_((gc.alpha + gc.beta).unsqueeze(1))
        if fac is not None:
            z.mul_(fac)
        _apply_dz(z, h, weight, out, r0, r1, v0, v1, lowp)
    # sparse part: coefficients times the softcap factor at those ids, as indexed GEMVs
    coef = gc.sp_coef if cap is None else gc.sp_coef * (1.0 - (z_sp / cap) ** 2)
    safe = gc.sp_ids.clamp_min(0)
    if out.dh is not None:
        out.dh[r0:r1] += torch.einsum("cs,csh->ch", coef, weight[safe].to(cdt)).to(out.dh.dtype)
    if out.dw is not None:
        rows_x_coef = (coef.unsqueeze(2) * h.to(cdt).unsqueeze(1)).reshape(-1, h.shape[1])
        out.dw.index_add_(0, safe.reshape(-1), rows_x_coef.to(out.dw.dtype))
    if out.db is not None:
        out.db.index_add_(0, safe.reshape(-1), coef.reshape(-1).to(out.db.dtype))


def _run(hidden, weight, bias, target: SparseTarget, params: FusionParams, g, need, want_stats, cfg):
    """Loss rows (+ stats rows, + gradients when g is not None) over all row chunks."""
    N = hidden.shape[0]
    V = weight.shape[0]
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = _Out(hidden, weight, bias, cdt, want_stats, need if g is not None else (False, False, False))
    fused = hidden.dtype != torch.float64 and (cfg.fused if cfg.fused is not None else hidden.is_cuda)
    if fused:  # one buffer in the input dtype; the row kernels hold everything else in registers
        rows, _ = _plan(N, V, 1, hidden.element_size(), max(cfg.budget(weight), V * hidden.element_size()))
        buf = torch.empty((rows, V), dtype=hidden.dtype, device=hidden.device)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            gc = None if g is None else (g if g.dim() == 0 else g[r0:r1])
            _chunk_fused(hidden[r0:r1], weight, bias, target.rows(r0, r1), params, gc, out, r0, r1, buf, cdt)
        return out
    elt = torch.finfo(cdt).bits // 8
    lowp = hidden.dtype in (torch.bfloat16, torch.float16) and (
        cfg.lowp_grad if cfg.lowp_grad is not None else hidden.is_cuda)
    flags = (True, params.temperature != 1.0, params.softcap is not None and g is not None)
    rows, vblock = _plan(N, V, sum(flags), elt, cfg.budget(weight))
    bufs = [torch.empty((rows, vblock), dtype=cdt, device=hidden.device) if f else None for f in flags]
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        tg = target.rows(r0, r1)
        gc = None if g is None else (g if g.dim() == 0 else g[r0:r1])
        if vblock == V:
            _chunk_single(hidden[r0:r1], weight, bias, tg, params, gc, out, r0, r1, bufs, cdt, lowp)
        else:
            _chunk_blocked(hidden[r0:r1], weight, bias, tg, params, gc, out, r0, r1, bufs, cdt, vblock, lowp)
    return out


class _ChunkedFusionLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, row_weights, target, params, cfg, want_stats, grad_enabled):
        # needs_input_grad stays True under torch.no_grad(): without the caller's grad mode every
        # evaluation pass would compute full gradients (3x the cost).
        need = tuple(ctx.needs_input_grad[:3]) if grad_enabled else (False, False, False)
        grad_now = any(need) and params.reduction != "none"
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        scale = reduction_scale(params, target.valid, cdt, row_weights)
        out = _run(hidden, weight, bias, target, params, scale if grad_now else None, need, want_stats, cfg)
        # Inputs are kept as plain references (no version check): only reduction "none" and a second
        # backward through a retained graph recompute from them.
        ctx.inputs, ctx.scale, ctx.grads = (hidden, weight, bias), scale, None
        if params.reduction == "none":
            loss = out.loss
        else:
            loss = (out.loss * scale).sum() if scale.dim() else out.loss.sum() * scale
            # The first backward scales these in place and hands them over (no second [V, H] copy; autograd
            # can adopt them as .grad); a later backward (retain_graph, gradcheck) recomputes instead.
            ctx.grads = (out.dh, None if out.dw is None else out.dw.to(weight.dtype),
                         None if out.db is None else out.db.to(bias.dtype))
        ctx.target, ctx.params, ctx.cfg, ctx.need = target, params, cfg, need
        if want_stats:
            st = make_stats(target, RowTerms(out.loss, out.ce, out.kd, out.sup), out.argmax)
            extra = (st.ce, st.kd, st.accuracy, st.kept_fraction, st.student_mass_on_support, st.row_ce,
                     st.row_kd, st.row_mass)
        else:
            extra = tuple(torch.zeros(()) for _ in range(8))
        ctx.mark_non_differentiable(*extra)
        return (loss,) + extra

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            hidden, weight, bias = ctx.inputs
            g = grad_loss if ctx.params.reduction == "none" else grad_loss * ctx.scale
            out = _run(hidden, weight, bias, ctx.target, ctx.params, g, ctx.need, False, ctx.cfg)
            dh = out.dh
            dw = None if out.dw is None else out.dw.to(weight.dtype)
            db = None if out.db is None else out.db.to(bias.dtype)
        else:
            dh, dw, db = (None if x is None else x.mul_(grad_loss.to(x.dtype)) for x in ctx.grads)
            ctx.grads = None
        return dh, dw, db, None, None, None, None, None, None


def chunked_fusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    target: SparseTarget,
    params: FusionParams,
    return_stats: bool = False,
    cfg: ChunkConfig | None = None,
    row_weights: torch.Tensor | None = None,
):
    """Chunked fusion loss. hidden [N, H], weight [V, H], bias [V] | None, labels [N] (already in target),
    target: SparseTarget from build_sparse_target, row_weights [N] | None (reduction "sum" only; see
    params.reduction_scale). Returns loss ([N] for "none", else 0-dim; float32, float64 for float64
    inputs) or (loss, FusionStats)."""
    res = _ChunkedFusionLoss.apply(hidden, weight, bias, row_weights, target, params, cfg or ChunkConfig(),
                                   return_stats, torch.is_grad_enabled())
    if not return_stats:
        return res[0]
    return res[0], FusionStats(*res[1:])
