"""Triton gradients of the fusion loss: d_hidden, d_weight, d_bias from the rowmath coefficients.

rowmath.grad_coefs gives, per row, alpha, beta, gamma, lse_out and a sparse part (sp_ids, sp_coef):
    dL/dz[i, v]     = alpha_i p_iv + beta_i q_iv + [v not in S_i] gamma_i exp(z_iv - lse_out_i)     (dense)
                      + sum_{s: sp_ids[i, s] == v} sp_coef[i, s]                                     (sparse)
    p = exp(z - lse), q = exp(z / T - lse_t)       (T == 1: one exp, coefficient alpha + beta)
    dL/dz_raw       = dL/dz * (1 - (z / s)^2) under a softcap s (tanh' written with tanh = z / s)
    d_hidden = dz_raw @ W,  d_weight = dz_raw^T @ h,  d_bias = sum_i dz_raw[i, :]
The two parts are separable (the GEMMs are linear), so they run apart:

Dense part: the logit tiles are recomputed (2 N H V flops) and consumed in registers. Two designs:
    atomic (default): _grad_tile_kernel, grid = (row blocks x vocabulary blocks), each tile's dz feeds both
        d_hidden[rows] += dz @ W[cols] and d_weight[cols] += dz^T @ h[rows] through fp32 atomic adds
        (CCE's design; 8 N H V flops with the forward; the order of the adds varies, so the last bits do).
    deterministic: _grad_hidden_kernel (grid = row blocks, loop over V) and _grad_weight_kernel (grid =
        vocabulary blocks, loop over N), each program owning its rows of the output: no atomics, bitwise
        reproducible, 10 N H V flops.
    Gradient filtering (CCE's trick, `filter_eps` > 0): a tile whose |dz| are all below it adds nothing (its
    GEMMs are skipped). Off by default: results are then exact.
Sparse part: at most S' = T*K + 1 ids per row, with the softcap factor at those ids from z_sp:
    _sparse_dh_kernel: grid = rows; d_hidden[i] += sum_s c[i, s] W[ids[i, s]] (the program owns row i)
    _sparse_dw_kernel: the (id, row, c) entries sorted by id (a stable sort: rows in order), grid = entries;
        the first entry of each id's run sums c * h[row] over the run and adds it to d_weight[id] and d_bias
        (one program per id: no atomics). Run ends come from a reverse cummin on the device: no host sync.
    Under the interpreter the sparse part runs as the equivalent torch ops (index_add_ / einsum), which are
    deterministic on the CPU; `sparse_impl="triton"` forces the kernels (tests do).
Accumulation is fp32 throughout; the outputs are cast to the parameters' dtypes at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    DENSE_FLAGS,
    INTERPRET,
    check_inputs,
    decorate,
    dense_dz_tile,
    helper,
    launch_kwargs,
    launching,
    logit_tile,
    softcap_arg,
)

# ---------------------------------------------------------------------------------------------------------
# dense part


def _grad_tile_kernel(H_ptr, W_ptr, Bias_ptr, LSE_ptr, LSET_ptr, LSEO_ptr, Alpha_ptr, Beta_ptr, Gamma_ptr,
                      Sup_ptr, DH_ptr, DW_ptr, DB_ptr, N, V, D, n_sup, stride_hn, stride_wv, stride_sup, SOFTCAP,
                      inv_t, filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                      TAIL: tl.constexpr, FILTER: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                      NEED_DB: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr):
    # grouped order: GROUP row blocks walk the vocabulary together, so their h rows stay in L2 while each W
    # block is read GROUP times in a row
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP * v_blocks
    first_n = (pid // per_group) * GROUP
    rows_here = tl.minimum(n_blocks - first_n, GROUP)
    n0 = (first_n + (pid % per_group) % rows_here) * BLOCK_N
    v0 = ((pid % per_group) // rows_here) * BLOCK_V
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    z = logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP, HAS_BIAS,
                   HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    dz = dense_dz_tile(z, offs_n, offs_v, mask_n, mask_v, LSE_ptr, LSET_ptr, LSEO_ptr, Alpha_ptr, Beta_ptr,
                       Gamma_ptr, Sup_ptr, n_sup, stride_sup, inv_t, SOFTCAP, HAS_TEMP, HAS_SOFTCAP, TAIL)
    if NEED_DB:
        tl.atomic_add(DB_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v)
    keep = True
    if FILTER:
        keep = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps
    if keep:
        dz_op = dz
        if not UPCAST:
            dz_op = dz.to(W_ptr.dtype.element_ty)
        offs_h = tl.arange(0, BLOCK_H)
        rows64 = offs_n.to(tl.int64)
        cols64 = offs_v.to(tl.int64)
        for h0 in range(0, D, BLOCK_H):
            hh = h0 + offs_h
            mask_h = hh < D
            if NEED_DH:
                w = tl.load(W_ptr + cols64[:, None] * stride_wv + hh[None, :],
                            mask=mask_v[:, None] & mask_h[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                part = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
                tl.atomic_add(DH_ptr + rows64[:, None] * D + hh[None, :], part,
                              mask=mask_n[:, None] & mask_h[None, :])
            if NEED_DW:
                h = tl.load(H_ptr + rows64[:, None] * stride_hn + hh[None, :],
                            mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                part = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
                tl.atomic_add(DW_ptr + cols64[:, None] * D + hh[None, :], part,
                              mask=mask_v[:, None] & mask_h[None, :])


@helper
def rows_update(dz_op, Op_ptr, Out_ptr, n_op, n_out, D, stride_op, op0, out0, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_OP: tl.constexpr, BLOCK_OUT: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """Out[out0 : out0 + BLOCK_OUT, :] += dz_op @ Op[op0 : op0 + BLOCK_OP, :] over H in BLOCK_H steps; Out is
    an fp32 [n_out, D] buffer this program owns (no atomics). dz_op [BLOCK_OUT, BLOCK_OP]."""
    op_blk = tl.make_block_ptr(Op_ptr, (n_op, D), (stride_op, 1), (op0, 0), (BLOCK_OP, BLOCK_H), (1, 0))
    out_blk = tl.make_block_ptr(Out_ptr, (n_out, D), (D, 1), (out0, 0), (BLOCK_OUT, BLOCK_H), (1, 0))
    for _ in range(0, tl.cdiv(D, BLOCK_H)):
        b = tl.load(op_blk, boundary_check=(0, 1), padding_option="zero")
        if UPCAST:
            b = b.to(tl.float32)
        acc = tl.load(out_blk, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(dz_op, b, acc, input_precision=DOT_PRECISION)
        tl.store(out_blk, acc, boundary_check=(0, 1))
        op_blk = tl.advance(op_blk, (0, BLOCK_H))
        out_blk = tl.advance(out_blk, (0, BLOCK_H))


def _grad_hidden_kernel(H_ptr, W_ptr, Bias_ptr, LSE_ptr, LSET_ptr, LSEO_ptr, Alpha_ptr, Beta_ptr, Gamma_ptr,
                        Sup_ptr, DH_ptr, N, V, D, n_sup, stride_hn, stride_wv, stride_sup, SOFTCAP, inv_t,
                        filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                        TAIL: tl.constexpr, FILTER: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP,
                       HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = dense_dz_tile(z, offs_n, offs_v, mask_n, mask_v, LSE_ptr, LSET_ptr, LSEO_ptr, Alpha_ptr,
                           Beta_ptr, Gamma_ptr, Sup_ptr, n_sup, stride_sup, inv_t, SOFTCAP, HAS_TEMP,
                           HAS_SOFTCAP, TAIL)
        keep = True
        if FILTER:
            keep = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps
        if keep:
            # a new name: rebinding dz to another dtype inside a runtime `if` breaks scf.if type matching
            dz_op = dz
            if not UPCAST:
                dz_op = dz.to(W_ptr.dtype.element_ty)
            rows_update(dz_op, W_ptr, DH_ptr, V, N, D, stride_wv, v0, n0, UPCAST, DOT_PRECISION, BLOCK_V, BLOCK_N,
                        BLOCK_H)


def _grad_weight_kernel(H_ptr, W_ptr, Bias_ptr, LSE_ptr, LSET_ptr, LSEO_ptr, Alpha_ptr, Beta_ptr, Gamma_ptr,
                        Sup_ptr, DW_ptr, DB_ptr, N, V, D, n_sup, stride_hn, stride_wv, stride_sup, SOFTCAP, inv_t,
                        filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                        TAIL: tl.constexpr, FILTER: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    v0 = tl.program_id(0) * BLOCK_V
    offs_v = v0 + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        z = logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP,
                       HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = dense_dz_tile(z, offs_n, offs_v, mask_n, mask_v, LSE_ptr, LSET_ptr, LSEO_ptr, Alpha_ptr,
                           Beta_ptr, Gamma_ptr, Sup_ptr, n_sup, stride_sup, inv_t, SOFTCAP, HAS_TEMP,
                           HAS_SOFTCAP, TAIL)
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        if NEED_DW:
            keep = True
            if FILTER:
                keep = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps
            if keep:
                dzt = tl.trans(dz)  # [BLOCK_V, BLOCK_N]
                if not UPCAST:
                    dzt = dzt.to(H_ptr.dtype.element_ty)
                rows_update(dzt, H_ptr, DW_ptr, N, V, D, stride_hn, n0, v0, UPCAST, DOT_PRECISION, BLOCK_N,
                            BLOCK_V, BLOCK_H)
    if NEED_DB:
        tl.store(DB_ptr + offs_v, db, mask=mask_v)


# ---------------------------------------------------------------------------------------------------------
# sparse part


def _sparse_dh_kernel(W_ptr, Ids_ptr, Coef_ptr, DH_ptr, V, D, S, stride_wv, stride_ids,
                      BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_h = tl.arange(0, BLOCK_H)
    for s0 in range(0, S, BLOCK_S):
        mask_s = s0 + offs_s < S
        ids = tl.load(Ids_ptr + row * stride_ids + s0 + offs_s, mask=mask_s, other=-1).to(tl.int64)
        c = tl.load(Coef_ptr + row * stride_ids + s0 + offs_s, mask=mask_s, other=0.0)
        ok = mask_s & (ids >= 0) & (ids < V)
        ids = tl.where(ok, ids, 0)
        for h0 in range(0, D, BLOCK_H):
            mask_h = h0 + offs_h < D
            w = tl.load(W_ptr + ids[:, None] * stride_wv + h0 + offs_h[None, :], mask=ok[:, None] & mask_h[None, :],
                        other=0.0).to(tl.float32)
            part = tl.sum(w * c[:, None], axis=0)
            ptr = DH_ptr + row * D + h0 + offs_h
            tl.store(ptr, tl.load(ptr, mask=mask_h, other=0.0) + part, mask=mask_h)


def _sparse_dw_kernel(H_ptr, SortedIds_ptr, Rows_ptr, Coef_ptr, RunEnd_ptr, DW_ptr, DB_ptr, D, stride_hn,
                      NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_H: tl.constexpr):
    e = tl.program_id(0)
    uid = tl.load(SortedIds_ptr + e)
    prev = tl.load(SortedIds_ptr + e - 1, mask=e > 0, other=-1)
    if (uid >= 0) & (uid != prev):  # the first entry of its id's run does the run
        end = tl.load(RunEnd_ptr + e).to(tl.int32)
        uid64 = uid.to(tl.int64)
        if NEED_DB:
            total = 0.0
            for j in range(e, end):
                total += tl.load(Coef_ptr + j)
            tl.store(DB_ptr + uid64, tl.load(DB_ptr + uid64) + total)
        if NEED_DW:
            offs_h = tl.arange(0, BLOCK_H)
            for h0 in range(0, D, BLOCK_H):
                mask_h = h0 + offs_h < D
                acc = tl.zeros((BLOCK_H,), tl.float32)
                for j in range(e, end):
                    r = tl.load(Rows_ptr + j)
                    c = tl.load(Coef_ptr + j)
                    acc += c * tl.load(H_ptr + r * stride_hn + h0 + offs_h, mask=mask_h, other=0.0).to(tl.float32)
                ptr = DW_ptr + uid64 * D + h0 + offs_h
                tl.store(ptr, tl.load(ptr, mask=mask_h, other=0.0) + acc, mask=mask_h)


_GRAD_FLAGS = {**DENSE_FLAGS, "TAIL": lambda a: a["Sup_ptr"] is not None,
               "FILTER": lambda a: a["filter_eps"] > 0}
_grad_tile_kernel = decorate(_grad_tile_kernel, _GRAD_FLAGS, reset_to_zero=("DH_ptr", "DW_ptr", "DB_ptr"))
_grad_hidden_kernel = decorate(_grad_hidden_kernel, _GRAD_FLAGS, reset_to_zero=("DH_ptr",))
_grad_weight_kernel = decorate(_grad_weight_kernel, _GRAD_FLAGS, reset_to_zero=("DW_ptr",))
_sparse_dh_kernel = triton.jit(_sparse_dh_kernel)
_sparse_dw_kernel = triton.jit(_sparse_dw_kernel)


def _run_ends(sorted_ids: torch.Tensor) -> torch.Tensor:
    """int64 [E]: for each entry of the sorted ids, the index one past the end of its id's run (device ops
    only: a reverse cummin over the run starts)."""
    E = sorted_ids.shape[0]
    idx = torch.arange(E, device=sorted_ids.device)
    start = torch.ones(E, dtype=torch.bool, device=sorted_ids.device)
    start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    nxt = torch.full((E,), E, dtype=torch.int64, device=sorted_ids.device)
    nxt[:-1] = torch.where(start[1:], idx[1:], torch.full_like(idx[1:], E))
    return torch.flip(torch.cummin(torch.flip(nxt, [0]), 0).values, [0])


def sparse_grad(hidden, weight, sp_ids, coef, dh, dw, db, impl: str | None = None) -> None:
    """Add the sparse part in place: dh [N, H] += sum_s coef[:, s] W[sp_ids[:, s]], dw[id] += coef h[row],
    db[id] += coef (fp32 accumulators, None = not needed). sp_ids [N, S'] int64 (-1 = none), coef [N, S']
    f32 already holding the softcap factor. impl: "torch" | "triton" (None: torch under the interpreter)."""
    impl = impl or ("torch" if INTERPRET else "triton")
    n, S = sp_ids.shape
    if n == 0 or S == 0:
        return
    coef = torch.where(sp_ids >= 0, coef, torch.zeros_like(coef)).contiguous()
    safe = sp_ids.clamp_min(0).contiguous()
    if impl == "torch":
        if dh is not None:
            dh += torch.einsum("ns,nsh->nh", coef, weight[safe].to(torch.float32))
        if dw is not None:
            rows_x_coef = coef.unsqueeze(2) * hidden.to(torch.float32).unsqueeze(1)  # [N, S', H]
            dw.index_add_(0, safe.reshape(-1), rows_x_coef.reshape(-1, hidden.shape[1]))
        if db is not None:
            db.index_add_(0, safe.reshape(-1), coef.reshape(-1))
        return
    D = hidden.shape[1]
    with launching(hidden.device):
        if dh is not None:
            _sparse_dh_kernel[(n,)](weight, sp_ids.contiguous(), coef, dh, weight.shape[0], D, S, weight.stride(0),
                                    S, BLOCK_S=16, BLOCK_H=128, num_warps=4)
        if dw is not None or db is not None:
            flat = torch.where(coef != 0, sp_ids, torch.full_like(sp_ids, -1)).reshape(-1)
            order = torch.argsort(flat, stable=True)
            sorted_ids = flat[order].contiguous()
            rows = (order // S).contiguous()
            coefs = coef.reshape(-1)[order].contiguous()
            ends = _run_ends(sorted_ids)
            dummy = torch.empty(1, dtype=torch.float32, device=hidden.device)
            _sparse_dw_kernel[(sorted_ids.shape[0],)](
                hidden, sorted_ids, rows, coefs, ends, dummy if dw is None else dw, dummy if db is None else db, D,
                hidden.stride(0), NEED_DW=dw is not None, NEED_DB=db is not None, BLOCK_H=128, num_warps=4)


def fused_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
               temperature: float, lse: torch.Tensor, lse_t: torch.Tensor, coefs, z_sp: torch.Tensor,
               support: torch.Tensor | None = None, *, need_hidden: bool = True, need_weight: bool = True,
               need_bias: bool | None = None, filter_eps: float = 0.0, deterministic: bool = False,
               sparse_impl: str | None = None):
    """Gradients of a loss whose logit gradient has the rowmath form (module header).

    hidden [N, H], weight [V, H], bias [V] or None; lse, lse_t [N] f32; coefs: rowmath.GradCoefs (alpha,
    beta, gamma, lse_out [N]; sp_ids / sp_coef [N, S']); z_sp [N, S'] the softcapped logits at sp_ids;
    support [N, S] int64 (the tail bucket's support, -1 = none) or None. Returns (d_hidden in hidden's
    dtype, d_weight in weight's dtype, d_bias in bias's dtype), None where not needed.
    """
    hidden, weight, bias = check_inputs(hidden, weight, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    need_bias = (bias is not None) if need_bias is None else (need_bias and bias is not None)
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0:
        return (torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    inv_t = 1.0 / float(temperature)
    alpha, beta = coefs.alpha.to(torch.float32), coefs.beta.to(torch.float32)
    if inv_t == 1.0:  # p == q: fold beta into alpha and let the kernels skip the second exp
        alpha, beta = alpha + beta, beta
    row = [x.to(torch.float32).contiguous() for x in (lse, lse_t, coefs.lse_out, alpha, beta, coefs.gamma)]
    sup = None if support is None else support.to(torch.int64).contiguous()
    tail = dict(Sup_ptr=sup, n_sup=0 if sup is None else sup.shape[1], stride_sup=0 if sup is None else sup.stride(0))
    common = (hidden, weight, bias, *row)
    sc = softcap_arg(softcap)
    dh = torch.zeros((n, h), **f32) if need_hidden else None
    dw = torch.zeros((v, h), **f32) if need_weight else None
    db = torch.zeros(v, **f32) if need_bias else None
    dummy = torch.zeros(1, **f32)  # for an output not asked for: the NEED_* flags keep the kernel off it
    scal = dict(SOFTCAP=sc, inv_t=inv_t, filter_eps=float(filter_eps))
    with launching(dev):
        if not deterministic:
            kw = launch_kwargs("grad", n, v, h, sup is not None)
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
            _grad_tile_kernel[grid](*common[:3], *row, tail["Sup_ptr"], dh if dh is not None else dummy,
                                    dw if dw is not None else dummy, db if db is not None else dummy, n, v, h,
                                    tail["n_sup"], hidden.stride(0), weight.stride(0), tail["stride_sup"], **scal,
                                    NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias, GROUP=8, **kw)
        else:
            if need_hidden:
                grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
                _grad_hidden_kernel[grid](*common[:3], *row, tail["Sup_ptr"], dh, n, v, h, tail["n_sup"],
                                          hidden.stride(0), weight.stride(0), tail["stride_sup"], **scal,
                                          **launch_kwargs("grad_hidden", n, v, h, sup is not None))
            if need_weight or need_bias:
                grid = lambda meta: (triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
                _grad_weight_kernel[grid](*common[:3], *row, tail["Sup_ptr"], dw if dw is not None else dummy,
                                          db if db is not None else dummy, n, v, h, tail["n_sup"],
                                          hidden.stride(0), weight.stride(0), tail["stride_sup"], **scal,
                                          NEED_DW=need_weight, NEED_DB=need_bias,
                                          **launch_kwargs("grad_weight", n, v, h, sup is not None))
    c = coefs.sp_coef.to(torch.float32)
    if softcap is not None:
        c = c * (1.0 - (z_sp / float(softcap)) ** 2)
    sparse_grad(hidden, weight, coefs.sp_ids, c, dh, dw, db, sparse_impl)
    return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
