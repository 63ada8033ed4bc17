"""Triton forward of the fusion loss: row statistics of the logits without writing them, and logits at
chosen ids.

1. `lse_forward` (_lse_partial_kernel + a merge). The vocabulary is split into `splits` ranges so that the
   grid (row blocks x splits) fills the GPU: at N = 8,192 and 128-row blocks there are only 64 row blocks
   for 132 SMs. Each program runs the online log-sum-exp over its range,
       m' = max(m, max_v z),  l_sum' = l_sum exp(m - m') + sum_v exp(z - m'),
   and writes its partial (m, l_sum) per row; with a temperature also l_T = sum exp(z/T - m/T) (max z/T = m/T);
   with the tail bucket also l_out, the same sum over the columns outside the row's support (so
   log(1 - q(S)) = log sum_out - lse never subtracts); with stats a running argmax in which only a strictly
   larger tile maximum replaces the best (ties keep the first index, as torch.argmax). The merge over
   splits is a few [N, splits] torch ops: M = max_s m_s, lse = M + log sum_s l_s exp(m_s - M), the split
   with the largest maximum (first on ties) gives the argmax.
2. `indexed_logits` (_indexed_logits_kernel; grid = rows x slot blocks): z[i, s] = softcap(h_i . W[ids[i, s]]
   + b[ids[i, s]]), 0 where ids[i, s] == -1 (also where it is out of range, so a bad id never reads memory).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_common import (
    AUTOTUNE,
    DENSE_FLAGS,
    FLAGS,
    INTERPRET,
    check_inputs,
    decorate,
    in_support,
    kernel_config,
    launch_kwargs,
    launching,
    logit_tile,
    num_sms,
    pow2_between,
    softcap_arg,
    softcap_tile,
)


def _lse_partial_kernel(H_ptr, W_ptr, Bias_ptr, Sup_ptr, PM_ptr, PL_ptr, PLT_ptr, PLO_ptr, PBest_ptr, PIdx_ptr,
                        N, V, D, v_per_split, n_sup, stride_hn, stride_wv, stride_sup, n_splits, SOFTCAP, inv_t,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                        TAIL: tl.constexpr, ARGMAX: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(1)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_N,), tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    l_out = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    v_start = split * v_per_split  # v_per_split is a multiple of BLOCK_V: tiles never straddle two splits
    for v0 in range(v_start, tl.minimum(v_start + v_per_split, V), BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP,
                       HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        if ARGMAX:
            tile_arg = tl.argmax(z, axis=1).to(tl.int64) + v0
            take = tile_max > best
            best_idx = tl.where(take, tile_arg, best_idx)
            best = tl.where(take, tile_max, best)
        m_new = tl.maximum(m, tile_max)
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        l_sum = l_sum * scale + tl.sum(e, axis=1)
        if HAS_TEMP:
            l_t = l_t * tl.exp((m - m_new) * inv_t) + tl.sum(tl.exp((z - m_new[:, None]) * inv_t), axis=1)
        if TAIL:
            outside = ~in_support(Sup_ptr, offs_n, mask_n, offs_v, n_sup, stride_sup)
            l_out = l_out * scale + tl.sum(tl.where(outside, e, 0.0), axis=1)
        m = m_new
    at = offs_n.to(tl.int64) * n_splits + split
    tl.store(PM_ptr + at, m, mask=mask_n)
    tl.store(PL_ptr + at, l_sum, mask=mask_n)
    if HAS_TEMP:
        tl.store(PLT_ptr + at, l_t, mask=mask_n)
    if TAIL:
        tl.store(PLO_ptr + at, l_out, mask=mask_n)
    if ARGMAX:
        tl.store(PBest_ptr + at, best, mask=mask_n)
        tl.store(PIdx_ptr + at, best_idx, mask=mask_n)


def _indexed_logits_kernel(H_ptr, W_ptr, Bias_ptr, Ids_ptr, Out_ptr, V, D, S, stride_hn, stride_wv,
                           stride_ids, stride_out, SOFTCAP, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    ids = tl.load(Ids_ptr + row * stride_ids + offs_s, mask=mask_s, other=-1).to(tl.int64)
    ok = mask_s & (ids >= 0) & (ids < V)
    ids = tl.where(ok, ids, 0)
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = H_ptr + row * stride_hn + offs_h
    w_ptrs = W_ptr + ids[:, None] * stride_wv + offs_h[None, :]
    acc = tl.zeros((BLOCK_S,), tl.float32)
    for h0 in range(0, D, BLOCK_H):
        mask_h = offs_h < D - h0
        h = tl.load(h_ptrs, mask=mask_h, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=ok[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], axis=1)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(Bias_ptr + ids, mask=ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        acc = softcap_tile(acc, SOFTCAP)
    tl.store(Out_ptr + row * stride_out + offs_s, tl.where(ok, acc, 0.0), mask=mask_s)


_LSE_FLAGS = {**DENSE_FLAGS, "TAIL": lambda a: a["Sup_ptr"] is not None,
              "ARGMAX": lambda a: a["PIdx_ptr"] is not None}
_lse_partial_kernel = decorate(_lse_partial_kernel, _LSE_FLAGS)
_indexed_logits_kernel = triton.heuristics(FLAGS)(triton.jit(_indexed_logits_kernel))


class RowStats(NamedTuple):
    """lse, lse_t [N] f32 (lse_t == lse at T == 1); lse_out [N] f32 or None (tail bucket: logsumexp outside
    the support, -inf when the complement is empty or underflows); argmax [N] int64 or None."""

    lse: torch.Tensor
    lse_t: torch.Tensor
    lse_out: torch.Tensor | None
    argmax: torch.Tensor | None


def split_count(n: int, v: int, block_n: int, block_v: int, sms: int) -> int:
    """Vocabulary splits so that row blocks x splits >= 2 waves of the SMs (1 under the interpreter)."""
    if INTERPRET:
        return 1
    row_blocks = triton.cdiv(max(n, 1), block_n)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(v, block_v)))


def lse_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                temperature: float = 1.0, *, support: torch.Tensor | None = None, argmax: bool = True,
                splits: int | None = None) -> RowStats:
    """Row statistics of z = softcap(hidden @ weight.T + bias) without writing z.

    hidden [N, H], weight [V, H], bias [V] or None (fp32/bf16/fp16); support [N, S] int64 (-1 = none) for
    lse_out; splits: vocabulary ranges (None: enough to fill the GPU, see split_count).
    """
    hidden, weight, bias = check_inputs(hidden, weight, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0:
        empty = torch.empty(0, **f32)
        return RowStats(empty, empty, empty if support is not None else None,
                        torch.empty(0, dtype=torch.int64, device=dev) if argmax else None)
    if v == 0:
        raise ValueError("weight has V = 0 rows (an empty ZeRO-3 shard? gather the lm_head weight first)")
    cfg = kernel_config("lse", n, v, h, support is not None)
    n_splits = splits or split_count(n, v, cfg.block_n, cfg.block_v, num_sms(dev))
    align = 256 if AUTOTUNE else cfg.block_v  # a multiple of every BLOCK_V the kernel may run with
    v_per_split = triton.cdiv(triton.cdiv(v, n_splits), align) * align
    n_splits = triton.cdiv(v, v_per_split)
    part = lambda dt=torch.float32: torch.empty((n, n_splits), dtype=dt, device=dev)  # noqa: E731
    pm, pl = part(), part()
    inv_t = 1.0 / float(temperature)
    plt_ = part() if inv_t != 1.0 else None
    plo = part() if support is not None else None
    pbest = part() if argmax else None
    pidx = part(torch.int64) if argmax else None
    sup = None
    if support is not None:
        sup = support.to(torch.int64).contiguous()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), n_splits)  # noqa: E731
    with launching(dev):
        _lse_partial_kernel[grid](hidden, weight, bias, sup, pm, pl, plt_, plo, pbest, pidx, n, v, h, v_per_split,
                                  0 if sup is None else sup.shape[1], hidden.stride(0), weight.stride(0),
                                  0 if sup is None else sup.stride(0), n_splits, softcap_arg(softcap), inv_t,
                                  **launch_kwargs("lse", n, v, h, sup is not None))
    big = pm.amax(1, keepdim=True)
    scale = torch.exp(pm - big)
    lse = big.squeeze(1) + torch.log((pl * scale).sum(1))
    lse_t = lse
    if plt_ is not None:
        lse_t = big.squeeze(1) * inv_t + torch.log((plt_ * torch.exp((pm - big) * inv_t)).sum(1))
    lse_out = None
    if plo is not None:
        lse_out = big.squeeze(1) + torch.log((plo * scale).sum(1))
    arg = None
    if pidx is not None:
        arg = pidx.gather(1, pbest.argmax(1, keepdim=True)).squeeze(1)  # first split on ties
    return RowStats(lse, lse_t, lse_out, arg)


def indexed_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   softcap: float | None, ids: torch.Tensor) -> torch.Tensor:
    """z at chosen vocabulary ids: out[i, s] = softcap(hidden[i] . weight[ids[i, s]] + bias[ids[i, s]]).

    hidden [N, H], weight [V, H], bias [V] or None, ids [N, S] int32/int64 (-1 = skip).
    Returns [N, S] float32, 0 where ids == -1 (and where ids is out of [0, V): never read).
    """
    hidden, weight, bias = check_inputs(hidden, weight, bias)
    n, h = hidden.shape
    if ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"ids must be [N, S] with N = {n}; got {tuple(ids.shape)}")
    ids = ids.contiguous()
    s = ids.shape[1]
    out = torch.empty((n, s), dtype=torch.float32, device=hidden.device)
    if n == 0 or s == 0:
        return out
    block_s = pow2_between(s, 16, 64)
    block_h = pow2_between(h, 16, 128 if INTERPRET else 64)
    with launching(hidden.device):
        _indexed_logits_kernel[(n, triton.cdiv(s, block_s))](
            hidden, weight, bias, ids, out, weight.shape[0], h, s, hidden.stride(0), weight.stride(0),
            ids.stride(0), out.stride(0), softcap_arg(softcap), BLOCK_S=block_s, BLOCK_H=block_h,
            num_warps=4)
    return out
