"""Chunked fusion loss in plain torch: never more than [chunk x V] logits alive (the CPU default backend).

Per chunk of rows (math in rowmath.py):
    z = h W^T + b held in fp32 (fp64 for fp64 inputs), softcap in place; for bf16/fp16 inputs the GEMM
        itself runs in the input dtype (fp32 accumulation, result rounded once, exactly like F.linear)
        and is then upcast, so chunked matches a plain-torch model; the triton backend keeps the
        fp32 accumulator (slightly more accurate in bf16)
    m, argmax = max_v z;  z_sp = z[label, ids] (gather before z is overwritten)
    buf = exp(z - m) in place -> lse = m + log(sum buf)        (and exp(z/T - m/T) in a 2nd buffer, T != 1)
    loss terms and gradient coefficients (rowmath) -> buf becomes dLoss/dz in place:
    dz = alpha q + beta qT + scatter(sp_ids, sp_coef), times 1 - (z/cap)^2 under softcap
    d_hidden[chunk] = dz W;  d_weight += dz^T h (fp32 accumulator);  d_bias += sum_rows dz
So one chunk costs one [c x V] fp32 buffer (two with T != 1, three with softcap) and the GEMMs run
through addmm into preallocated outputs.

Chunk sizes. Rows per chunk = budget / (V * 4 bytes * buffers), so with the default 256 MiB budget
(N=4096, V=49152, fp32) a chunk is ~1365 rows. When even MIN_ROWS rows would exceed the budget (huge
V), the vocabulary is split into blocks too, with a two-pass path: pass 1 computes online max / sum-exp
over V blocks, pass 2 recomputes each block's logits for the dense gradient; z at label / teacher ids and
the sparse gradient use indexed dots with the gathered rows W[ids] (no block needs them).

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

from .params import FusionParams, FusionStats, reduction_scale
from .rowmath import RowTerms, grad_coefs, make_stats, row_loss
from .targets import SparseTarget

MIN_ROWS = 64


@dataclass(frozen=True)
class ChunkConfig:
    """budget_bytes: memory for the [rows x V-block] float buffers of one chunk."""

    budget_bytes: int = 256 * 2**20


def _plan(N: int, V: int, n_buf: int, elt: int, cfg: ChunkConfig) -> tuple[int, int]:
    """(rows per chunk, vocabulary block) so that rows * vblock * elt * n_buf <= budget."""
    per_row = V * elt * n_buf
    rows = cfg.budget_bytes // per_row
    if rows >= min(N, MIN_ROWS):
        return max(1, min(N, rows)), V
    rows = min(N, MIN_ROWS)
    vblock = max(1, cfg.budget_bytes // (rows * elt * n_buf))
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


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out [c, v] (compute dtype) = h w^T + b, without extra [c, v] temporaries when dtypes agree."""
    if h.dtype == out.dtype:
        if b is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(b.to(out.dtype), h, w.t(), out=out)
    else:  # low-precision GEMM (fp32 accumulate inside, rounded like F.linear), then upcast: an fp32 copy
        # of W per chunk would cost a [V, H] fp32 temporary every chunk
        z = h @ w.t()
        if b is not None:
            z = z + b
        out.copy_(z)


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
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return z


def _chunk_single(h, weight, bias, tg: SparseTarget, params, g, out: _Out, r0, r1, bufs, cdt):
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
    terms = row_loss(tg, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], params)
    out.put_rows(r0, r1, terms, argmax)
    if g is None:
        return
    alpha, beta, sp_ids, sp_coef = grad_coefs(tg, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], params, g)
    if zt is None:
        z.mul_(((alpha + beta) / sumexp).unsqueeze(1))
    else:
        z.mul_((alpha / sumexp).unsqueeze(1))
        z.add_(zt.mul_((beta * torch.exp(m / T - lse_t)).unsqueeze(1)))
    z.scatter_add_(1, sp_ids.clamp_min(0), sp_coef)
    if fac is not None:
        z.mul_(fac)
    _apply_dz(z, h, weight, out, r0, r1, slice(None), cdt)


def _apply_dz(dz, h, weight, out: _Out, r0, r1, vsl, cdt):
    """Accumulate the GEMM gradients of dz [c, v] for rows [r0, r1) and vocabulary slice vsl."""
    if out.dh is not None:
        w = weight[vsl]
        if dz.dtype == w.dtype:
            if vsl == slice(None):
                torch.mm(dz, w, out=out.dh[r0:r1])
            else:
                out.dh[r0:r1].addmm_(dz, w)
        else:
            prod = dz.to(w.dtype) @ w
            if vsl == slice(None):
                out.dh[r0:r1] = prod
            else:
                out.dh[r0:r1] += prod
    if out.dw is not None:
        out.dw[vsl].addmm_(dz.t(), h.to(cdt))
    if out.db is not None:
        out.db[vsl] += dz.sum(0)


def _chunk_blocked(h, weight, bias, tg: SparseTarget, params, g, out: _Out, r0, r1, bufs, cdt, vblock):
    """One row chunk with the vocabulary in blocks: two passes (see module doc)."""
    c = r1 - r0
    V = weight.shape[0]
    T = params.temperature
    cap = params.softcap
    dev = h.device
    m = torch.full((c,), -torch.inf, dtype=cdt, device=dev)
    s = torch.zeros(c, dtype=cdt, device=dev)
    s_t = torch.zeros(c, dtype=cdt, device=dev)
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
        s = s * torch.exp(m - m_new) + z.sub_(m_new.unsqueeze(1)).exp_().sum(1)
        m = m_new
    lse = m + s.log()
    lse_t = m / T + s_t.log() if T != 1.0 else lse
    sp_ids = torch.cat([tg.label.unsqueeze(1), tg.ids], dim=1)
    z_sp = _indexed_logits(h, weight, bias, sp_ids, cap, cdt)
    terms = row_loss(tg, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], params)
    out.put_rows(r0, r1, terms, argmax)
    if g is None:
        return
    alpha, beta, sp_ids, sp_coef = grad_coefs(tg, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], params, g)
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
            zt.sub_(lse_t.unsqueeze(1)).exp_().mul_(beta.unsqueeze(1))
            z.sub_(lse.unsqueeze(1)).exp_().mul_(alpha.unsqueeze(1)).add_(zt)
        else:
            z.sub_(lse.unsqueeze(1)).exp_().mul_((alpha + beta).unsqueeze(1))
        if fac is not None:
            z.mul_(fac)
        _apply_dz(z, h, weight, out, r0, r1, slice(v0, v1), cdt)
    # sparse part: coefficients times the softcap factor at those ids, as indexed GEMVs
    coef = sp_coef if cap is None else sp_coef * (1.0 - (z_sp / cap) ** 2)
    safe = sp_ids.clamp_min(0)
    if out.dh is not None:
        out.dh[r0:r1] += torch.einsum("cs,csh->ch", coef, weight[safe].to(cdt)).to(out.dh.dtype)
    if out.dw is not None:
        rows_x_coef = (coef.unsqueeze(2) * h.to(cdt).unsqueeze(1)).reshape(-1, h.shape[1])
        out.dw.index_add_(0, safe.reshape(-1), rows_x_coef)
    if out.db is not None:
        out.db.index_add_(0, safe.reshape(-1), coef.reshape(-1))


def _run(hidden, weight, bias, target: SparseTarget, params: FusionParams, g, need, want_stats, cfg):
    """Loss rows (+ stats rows, + gradients when g is not None) over all row chunks."""
    N = hidden.shape[0]
    V = weight.shape[0]
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    elt = torch.finfo(cdt).bits // 8
    flags = (True, params.temperature != 1.0, params.softcap is not None and g is not None)
    rows, vblock = _plan(N, V, sum(flags), elt, cfg)
    bufs = [torch.empty((rows, vblock), dtype=cdt, device=hidden.device) if f else None for f in flags]
    out = _Out(hidden, weight, bias, cdt, want_stats, need if g is not None else (False, False, False))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        tg = target.rows(r0, r1)
        gc = None if g is None else (g if g.dim() == 0 else g[r0:r1])
        if vblock == V:
            _chunk_single(hidden[r0:r1], weight, bias, tg, params, gc, out, r0, r1, bufs, cdt)
        else:
            _chunk_blocked(hidden[r0:r1], weight, bias, tg, params, gc, out, r0, r1, bufs, cdt, vblock)
    return out


class _ChunkedFusionLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, params, cfg, want_stats, grad_enabled):
        # needs_input_grad stays True under torch.no_grad(): without the caller's grad mode every
        # evaluation pass would compute full gradients (3x the cost).
        need = tuple(ctx.needs_input_grad[:3]) if grad_enabled else (False, False, False)
        grad_now = any(need) and params.reduction != "none"
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        scale = reduction_scale(params, target.valid, cdt)
        out = _run(hidden, weight, bias, target, params, scale if grad_now else None, need, want_stats, cfg)
        # Inputs are kept as plain references (no version check): only reduction "none" and a second
        # backward through a retained graph recompute from them.
        ctx.inputs, ctx.scale, ctx.grads = (hidden, weight, bias), scale, None
        if params.reduction == "none":
            loss = out.loss
        else:
            loss = out.loss.sum() * scale
            # The first backward scales these in place and hands them over (no second [V, H] copy; autograd
            # can adopt them as .grad); a later backward (retain_graph, gradcheck) recomputes instead.
            ctx.grads = (out.dh, None if out.dw is None else out.dw.to(weight.dtype),
                         None if out.db is None else out.db.to(bias.dtype))
        ctx.target, ctx.params, ctx.cfg, ctx.need = target, params, cfg, need
        if want_stats:
            st = make_stats(target, RowTerms(out.loss, out.ce, out.kd, out.sup), out.argmax)
            extra = (st.ce, st.kd, st.accuracy, st.kept_fraction, st.student_mass_on_support)
        else:
            extra = tuple(torch.zeros(()) for _ in range(5))
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
        return dh, dw, db, None, None, None, None, None


def chunked_fusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    target: SparseTarget,
    params: FusionParams,
    return_stats: bool = False,
    cfg: ChunkConfig | None = None,
):
    """Chunked fusion loss. hidden [N, H], weight [V, H], bias [V] | None, labels [N] (already in target),
    target: SparseTarget from build_sparse_target. Returns loss ([N] for "none", else 0-dim; float32,
    float64 for float64 inputs) or (loss, FusionStats)."""
    res = _ChunkedFusionLoss.apply(hidden, weight, bias, target, params, cfg or ChunkConfig(), return_stats,
                                   torch.is_grad_enabled())
    if not return_stats:
        return res[0]
    return res[0], FusionStats(*res[1:])
