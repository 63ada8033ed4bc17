"""Row kernels over a chunk of materialized logits: the chunked backend's fused elementwise work on CUDA.

The chunked backend's GEMM path (chunked.py) writes a [c, V] chunk of raw logits z_raw (bf16 for bf16
inputs, the GEMM's own rounding, as F.linear), and these two kernels replace its ~8 torch passes over that
buffer with 2 (the roofline in docs/kernels.md: 12 bytes of traffic per logit instead of 38):

1. `_rows_lse_kernel` (one program per row, loop over V): z = softcap(z_raw); online
       m' = max(m, max z), l_sum' = l_sum e^(m - m') + sum e^(z - m')      -> lse = m + log l_sum
   and, in the same read, l_T for z / T (temperature), l_out over the columns outside the row's support
   (tail bucket: n_sup compares per block, never 1 - q(S)), and the first index of the maximum (stats).
2. `_rows_dz_kernel` (same grid): overwrites the chunk in place with the dense part of dLoss/dz_raw,
       (alpha e^(z - lse) + beta e^(z/T - lse_t) + [v not in S] gamma e^(z - lse_out)) * (1 - (z/cap)^2)
   in the buffer's dtype: the bf16 dz that the two gradient GEMMs take anyway.
The sparse part (label and teacher ids, <= T*K+1 per row) is a scatter_add in torch afterwards.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, launching, pow2_between, softcap_tile


def _rows_lse_kernel(Z_ptr, Sup_ptr, LSE_ptr, LSET_ptr, LSEO_ptr, Arg_ptr, V, n_sup, stride_z, stride_sup, SOFTCAP,
                     inv_t, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, TAIL: tl.constexpr,
                     ARGMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)  # per-lane running max / sums, reduced at the end
    l_sum = tl.zeros((BLOCK,), tl.float32)
    l_t = tl.zeros((BLOCK,), tl.float32)
    l_out = tl.zeros((BLOCK,), tl.float32)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK,), tl.int64)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        mask = cols < V
        z = tl.load(Z_ptr + row * stride_z + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            z = tl.where(mask, softcap_tile(z, SOFTCAP), float("-inf"))
        if ARGMAX:
            take = z > best  # per lane: the first column of each lane's maximum
            best_idx = tl.where(take, cols.to(tl.int64), best_idx)
            best = tl.where(take, z, best)
        m_new = tl.maximum(m, z)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane that saw only padding stays at 0 sums
        scale = tl.exp(m - safe)
        e = tl.exp(z - safe)
        l_sum = l_sum * scale + e
        if HAS_TEMP:
            l_t = l_t * tl.exp((m - safe) * inv_t) + tl.exp((z - safe) * inv_t)
        if TAIL:
            hit = cols < 0
            for s in range(0, n_sup):
                hit = hit | (cols == tl.load(Sup_ptr + row * stride_sup + s))
            l_out = l_out * scale + tl.where(hit, 0.0, e)
        m = m_new
    big = tl.max(m, axis=0)
    w = tl.exp(m - big)
    tl.store(LSE_ptr + row, big + tl.log(tl.sum(l_sum * w, axis=0)))
    if HAS_TEMP:
        tl.store(LSET_ptr + row, big * inv_t + tl.log(tl.sum(l_t * tl.exp((m - big) * inv_t), axis=0)))
    if TAIL:
        tl.store(LSEO_ptr + row, big + tl.log(tl.sum(l_out * w, axis=0)))
    if ARGMAX:
        top = tl.max(best, axis=0)
        tl.store(Arg_ptr + row, tl.min(tl.where(best == top, best_idx, V), axis=0))


def _rows_dz_kernel(Z_ptr, Sup_ptr, LSE_ptr, LSET_ptr, LSEO_ptr, Alpha_ptr, Beta_ptr, Gamma_ptr, V, n_sup, stride_z,
                    stride_sup, SOFTCAP, inv_t, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, TAIL: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    lse = tl.load(LSE_ptr + row)
    alpha = tl.load(Alpha_ptr + row)
    if HAS_TEMP:
        lse_t = tl.load(LSET_ptr + row)
        beta = tl.load(Beta_ptr + row)
    if TAIL:
        lse_out = tl.load(LSEO_ptr + row)
        gamma = tl.load(Gamma_ptr + row)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        mask = cols < V
        ptr = Z_ptr + row * stride_z + cols
        z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap_tile(z, SOFTCAP)
        dz = alpha * tl.exp(z - lse)
        if HAS_TEMP:
            dz += beta * tl.exp(z * inv_t - lse_t)
        if TAIL:
            hit = cols < 0
            for s in range(0, n_sup):
                hit = hit | (cols == tl.load(Sup_ptr + row * stride_sup + s))
            dz += tl.where(hit, 0.0, gamma * tl.exp(z - lse_out))
        if HAS_SOFTCAP:
            t = z / SOFTCAP
            dz = dz * (1.0 - t * t)
        tl.store(ptr, dz.to(Z_ptr.dtype.element_ty), mask=mask)


_FLAGS = {"HAS_SOFTCAP": lambda a: a["SOFTCAP"] is not None, "HAS_TEMP": lambda a: a["inv_t"] != 1.0,
          "TAIL": lambda a: a["Sup_ptr"] is not None}
_rows_lse_kernel = triton.heuristics({**_FLAGS, "ARGMAX": lambda a: a["Arg_ptr"] is not None})(
    triton.jit(_rows_lse_kernel))
_rows_dz_kernel = triton.heuristics(_FLAGS)(triton.jit(_rows_dz_kernel))


class RowLse(NamedTuple):
    lse: torch.Tensor       # [c] f32
    lse_t: torch.Tensor     # [c] f32 (== lse at T == 1)
    lse_out: torch.Tensor | None
    argmax: torch.Tensor | None


def _block(V: int) -> int:
    return pow2_between(V, 16, 2048 if INTERPRET else 1024)


def rows_lse(z: torch.Tensor, softcap: float | None, temperature: float, support: torch.Tensor | None,
             argmax: bool) -> RowLse:
    """Row statistics of a raw logits chunk z [c, V] (any float dtype, unit stride along V)."""
    c, V = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    lse, lse_t = torch.empty(c, **f32), torch.empty(c, **f32)
    lse_out = torch.empty(c, **f32) if support is not None else None
    arg = torch.empty(c, dtype=torch.int64, device=z.device) if argmax else None
    sup = None if support is None else support.to(torch.int64).contiguous()
    inv_t = 1.0 / float(temperature)
    if c:
        with launching(z.device):
            _rows_lse_kernel[(c,)](z, sup, lse, lse_t, lse_out, arg, V, 0 if sup is None else sup.shape[1],
                                   z.stride(0), 0 if sup is None else sup.stride(0),
                                   None if softcap is None else float(softcap), inv_t, BLOCK=_block(V),
                                   num_warps=4 if INTERPRET else 8)
    if inv_t == 1.0:
        lse_t = lse
    return RowLse(lse, lse_t, lse_out, arg)


def rows_dz_(z: torch.Tensor, softcap: float | None, temperature: float, support: torch.Tensor | None,
             lse: torch.Tensor, lse_t: torch.Tensor, lse_out: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
             gamma: torch.Tensor) -> None:
    """Overwrite the raw logits chunk z [c, V] with the dense part of dLoss/dz_raw (module doc)."""
    c, V = z.shape
    if not c:
        return
    inv_t = 1.0 / float(temperature)
    if inv_t == 1.0:
        alpha = alpha + beta  # p == q: one exp
    row = [x.to(torch.float32).contiguous() for x in (lse, lse_t, lse_out, alpha, beta, gamma)]
    sup = None if support is None else support.to(torch.int64).contiguous()
    with launching(z.device):
        _rows_dz_kernel[(c,)](z, sup, *row, V, 0 if sup is None else sup.shape[1], z.stride(0),
                              0 if sup is None else sup.stride(0), None if softcap is None else float(softcap), inv_t,
                              BLOCK=_block(V), num_warps=4 if INTERPRET else 8)
