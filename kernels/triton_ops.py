"""Triton kernels of the fusion loss, Cut-Cross-Entropy style: no [N, V] logits are ever written.

Notation: hidden h [N, H], lm_head weight W [V, H], bias b [V], raw logits z_raw = h W^T + b, and with a
softcap s: z = s * tanh(z_raw / s) (else z = z_raw). Every logit tile [BLOCK_N, BLOCK_V] is built from
tl.dot tiles over H and consumed in registers.

1. `lse_forward` (_lse_fwd_kernel; grid = row blocks, loop over V tiles, inner loop over H):
   online logsumexp, per tile m' = max(m, max_v z), l' = l * exp(m - m') + sum_v exp(z - m'), lse = m + log l,
   once for z and once for z / T (temperature; skipped when T == 1), plus a running argmax in which only a
   strictly larger tile maximum replaces the best, so ties keep the first index (as torch.argmax).
2. `indexed_logits` (_indexed_logits_kernel; grid = rows x slot blocks): z[i, s] = softcap(h_i . W[ids[i, s]]
   + b[ids[i, s]]), 0 where ids[i, s] == -1 (also where it is out of range, so a bad id never reads memory).
3. `fused_grad` (the gradient). rowmath.grad_coefs gives per row alpha, beta and sparse (sp_ids, sp_coef):
       dL/dz[i, v]     = alpha_i p_iv + beta_i q_iv + sum_{s: sp_ids[i, s] == v} sp_coef[i, s]
       p = exp(z - lse), q = exp(z / T - lse_t)       (T == 1: one exp, coefficient alpha + beta)
       dL/dz_raw[i, v] = dL/dz[i, v] * (1 - (z_iv / s)^2)          (tanh' written with tanh = z / s)
       d_hidden = dz_raw @ W,  d_weight = dz_raw^T @ h,  d_bias = sum_i dz_raw[i, :]
   Two kernels, each recomputing the logit tiles once (4NHV flops each; with the forward 10NHV in all,
   against 8NHV for CCE, whose single backward kernel scatters both gradients with atomics):
       _grad_hidden_kernel: grid = row blocks, loop over V tiles; the program owns its rows of d_hidden
       _grad_weight_kernel: grid = V blocks, loop over row blocks; owns its rows of d_weight, d_bias
   Each program read-modify-writes an fp32 scratch that no other program touches: no atomics, so the result is
   bitwise reproducible. The sparse part is added inside the tile by comparing the tile's columns with the S'
   ids of each row (S' cheap compares per tile, instead of gathering an [N, S', H] block of W rows), so the
   softcap derivative at those logits comes with the tile.
   Optional gradient filtering (CCE's trick): with filter_eps > 0 a tile whose |dz_raw| are all below it adds
   nothing (its GEMM is skipped). Off by default, so results are exact.

Kernel rules followed here: offsets of rows of h / W / d_weight are int64 (V * H and N * H pass 2^31 at e.g.
V = 262144, H = 8192; the GEMM operands use block pointers, whose offsets are 64-bit); every load is masked or
boundary-checked for ragged N, V, H; under the CPU interpreter every load is upcast
to fp32 at once (the interpreter computes bf16 arithmetic and bf16 tl.dot wrongly). On CUDA 16-bit operands
feed tl.dot directly with an fp32 accumulator: a bf16 x bf16 product is exact in fp32, so this equals the
upcast result up to summation order, at tensor-core speed; the gradient GEMMs then take dz in the input dtype
(as torch's own bf16 matmul backward does). One fixed config per kernel; PROFUSER_AUTOTUNE=1 autotunes on
CUDA.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Read at import, the same moment @triton.jit reads it: kernels defined without it cannot run on the CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE = os.environ.get("PROFUSER_AUTOTUNE", "0") not in ("", "0") and not INTERPRET


@contextlib.contextmanager
def _launching(device: torch.device):
    """Context of a kernel launch: the tensors' CUDA device made current (Triton launches on the current
    device, so a tensor on cuda:1 would otherwise be read from cuda:0's context), and triton's deprecation
    warning for tl.make_block_ptr silenced (it fires at every interpreted call). Block pointers are kept on
    purpose: on sm_90 they cut these kernels' register spills several-fold against per-element pointer
    tensors, and tensor descriptors need a device-side allocator."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield


# ---------------------------------------------------------------------------------------------------------
# shared device helpers
#
# Under the interpreter a call of a @triton.jit helper re-patches triton.language on every call (a third of
# the run time of these kernels); plain Python functions run identically there, so helpers are jitted only
# for real compilation.
_helper = (lambda fn: fn) if INTERPRET else triton.jit


@_helper
def _softcap(x, SOFTCAP):
    # s * tanh(x / s) with tanh(y) = 2 sigmoid(2y) - 1: tl has no tanh that also runs in the interpreter.
    return SOFTCAP * (2.0 * tl.sigmoid(x * (2.0 / SOFTCAP)) - 1.0)


@_helper
def _logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """z tile [BLOCK_N, BLOCK_V] fp32 for rows n0.. and vocab columns v0.. (softcapped when asked)."""
    # block pointers: 64-bit offsets (N * H and V * H can exceed 2^31 elements), zero padding for ragged
    # edges, and no per-element pointer tensors held across the pipelined H loop (register pressure)
    h_blk = tl.make_block_ptr(H_ptr, (N, D), (stride_hn, 1), (n0, 0), (BLOCK_N, BLOCK_H), (1, 0))
    w_blk = tl.make_block_ptr(W_ptr, (D, V), (1, stride_wv), (0, v0), (BLOCK_H, BLOCK_V), (0, 1))  # W^T
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for _ in range(0, tl.cdiv(D, BLOCK_H)):
        a = tl.load(h_blk, boundary_check=(0, 1), padding_option="zero")
        b = tl.load(w_blk, boundary_check=(0, 1), padding_option="zero")
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_blk = tl.advance(h_blk, (0, BLOCK_H))
        w_blk = tl.advance(w_blk, (BLOCK_H, 0))
    if HAS_BIAS:
        offs_v = v0 + tl.arange(0, BLOCK_V)
        acc += tl.load(Bias_ptr + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = _softcap(acc, SOFTCAP)
    return acc


@_helper
def _dz_tile(z, offs_n, offs_v, mask_n, mask_v, LSE_ptr, LSET_ptr, Alpha_ptr, Beta_ptr, SpIds_ptr, SpCoef_ptr,
             n_sparse, stride_sp, inv_t, SOFTCAP, HAS_TEMP: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """dL/dz_raw tile [BLOCK_N, BLOCK_V] fp32 from the logit tile z (see the module header)."""
    lse = tl.load(LSE_ptr + offs_n, mask=mask_n, other=0.0)
    alpha = tl.load(Alpha_ptr + offs_n, mask=mask_n, other=0.0)
    dz = alpha[:, None] * tl.exp(z - lse[:, None])
    if HAS_TEMP:
        lse_t = tl.load(LSET_ptr + offs_n, mask=mask_n, other=0.0)
        beta = tl.load(Beta_ptr + offs_n, mask=mask_n, other=0.0)
        dz += beta[:, None] * tl.exp(z * inv_t - lse_t[:, None])
    sp_row = SpIds_ptr + offs_n.to(tl.int64) * stride_sp
    sc_row = SpCoef_ptr + offs_n.to(tl.int64) * stride_sp
    for s in range(0, n_sparse):
        ids = tl.load(sp_row + s, mask=mask_n, other=-1)
        coef = tl.load(sc_row + s, mask=mask_n, other=0.0)
        dz += tl.where(ids[:, None] == offs_v[None, :], coef[:, None], 0.0)
    if HAS_SOFTCAP:
        t = z / SOFTCAP
        dz = dz * (1.0 - t * t)
    # padded columns hold z = 0 (not -inf), so exp(z - lse) must be masked out here
    return tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)


# ---------------------------------------------------------------------------------------------------------
# kernels


def _lse_fwd_kernel(H_ptr, W_ptr, Bias_ptr, LSE_ptr, LSET_ptr, Argmax_ptr, N, V, D, stride_hn, stride_wv,
                    SOFTCAP, inv_t, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP,
                        HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        tile_arg = tl.argmax(z, axis=1).to(tl.int64) + v0
        take = tile_max > best
        best_idx = tl.where(take, tile_arg, best_idx)
        best = tl.where(take, tile_max, best)
        m_new = tl.maximum(m, tile_max)
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        if HAS_TEMP:
            zt = z * inv_t
            mt_new = tl.maximum(m_t, tile_max * inv_t)
            l_t = l_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(zt - mt_new[:, None]), axis=1)
            m_t = mt_new
    lse = m + tl.log(l)
    tl.store(LSE_ptr + offs_n, lse, mask=mask_n)
    if HAS_TEMP:
        tl.store(LSET_ptr + offs_n, m_t + tl.log(l_t), mask=mask_n)
    else:
        tl.store(LSET_ptr + offs_n, lse, mask=mask_n)
    tl.store(Argmax_ptr + offs_n, best_idx, mask=mask_n)


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
        acc = _softcap(acc, SOFTCAP)
    tl.store(Out_ptr + row * stride_out + offs_s, tl.where(ok, acc, 0.0), mask=mask_s)


def _grad_hidden_kernel(H_ptr, W_ptr, Bias_ptr, LSE_ptr, LSET_ptr, Alpha_ptr, Beta_ptr, SpIds_ptr, SpCoef_ptr,
                        DH_ptr, N, V, D, n_sparse, stride_hn, stride_wv, stride_sp, stride_dh, SOFTCAP, inv_t,
                        filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP,
                        HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _dz_tile(z, offs_n, offs_v, mask_n, mask_v, LSE_ptr, LSET_ptr, Alpha_ptr, Beta_ptr, SpIds_ptr,
                      SpCoef_ptr, n_sparse, stride_sp, inv_t, SOFTCAP, HAS_TEMP, HAS_SOFTCAP)
        if tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps:
            # a new name: rebinding dz to another dtype inside a runtime `if` breaks scf.if type matching
            dz_op = dz
            if not UPCAST:
                dz_op = dz.to(W_ptr.dtype.element_ty)
            w_blk = tl.make_block_ptr(W_ptr, (V, D), (stride_wv, 1), (v0, 0), (BLOCK_V, BLOCK_H), (1, 0))
            dh_blk = tl.make_block_ptr(DH_ptr, (N, D), (stride_dh, 1), (n0, 0), (BLOCK_N, BLOCK_H), (1, 0))
            for _ in range(0, tl.cdiv(D, BLOCK_H)):
                w = tl.load(w_blk, boundary_check=(0, 1), padding_option="zero")
                if UPCAST:
                    w = w.to(tl.float32)
                acc = tl.load(dh_blk, boundary_check=(0, 1), padding_option="zero")
                acc = tl.dot(dz_op, w, acc, input_precision=DOT_PRECISION)
                tl.store(dh_blk, acc, boundary_check=(0, 1))
                w_blk = tl.advance(w_blk, (0, BLOCK_H))
                dh_blk = tl.advance(dh_blk, (0, BLOCK_H))


def _grad_weight_kernel(H_ptr, W_ptr, Bias_ptr, LSE_ptr, LSET_ptr, Alpha_ptr, Beta_ptr, SpIds_ptr, SpCoef_ptr,
                        DW_ptr, DB_ptr, N, V, D, n_sparse, stride_hn, stride_wv, stride_sp, stride_dw,
                        SOFTCAP, inv_t, filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        HAS_TEMP: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    v0 = tl.program_id(0) * BLOCK_V
    offs_v = v0 + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        z = _logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP,
                        HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _dz_tile(z, offs_n, offs_v, mask_n, mask_v, LSE_ptr, LSET_ptr, Alpha_ptr, Beta_ptr, SpIds_ptr,
                      SpCoef_ptr, n_sparse, stride_sp, inv_t, SOFTCAP, HAS_TEMP, HAS_SOFTCAP)
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        if NEED_DW:
            if tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps:
                dzt = tl.trans(dz)  # [BLOCK_V, BLOCK_N]
                if not UPCAST:
                    dzt = dzt.to(H_ptr.dtype.element_ty)
                h_blk = tl.make_block_ptr(H_ptr, (N, D), (stride_hn, 1), (n0, 0), (BLOCK_N, BLOCK_H), (1, 0))
                dw_blk = tl.make_block_ptr(DW_ptr, (V, D), (stride_dw, 1), (v0, 0), (BLOCK_V, BLOCK_H),
                                           (1, 0))
                for _ in range(0, tl.cdiv(D, BLOCK_H)):
                    h = tl.load(h_blk, boundary_check=(0, 1), padding_option="zero")
                    if UPCAST:
                        h = h.to(tl.float32)
                    acc = tl.load(dw_blk, boundary_check=(0, 1), padding_option="zero")
                    acc = tl.dot(dzt, h, acc, input_precision=DOT_PRECISION)
                    tl.store(dw_blk, acc, boundary_check=(0, 1))
                    h_blk = tl.advance(h_blk, (0, BLOCK_H))
                    dw_blk = tl.advance(dw_blk, (0, BLOCK_H))
    if NEED_DB:
        tl.store(DB_ptr + offs_v, db, mask=mask_v)


# ---------------------------------------------------------------------------------------------------------
# decoration: jit, constexpr flags from the arguments, then one fixed config or (opt-in) autotuning


def _dot_precision(args) -> str:
    # follow torch's own fp32 matmul setting on CUDA ("high"/"medium" allow tf32); the interpreter is exact
    if INTERPRET:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


_FLAGS = {
    "HAS_BIAS": lambda a: a["Bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["SOFTCAP"] is not None and a["SOFTCAP"] != 0,
}
_DENSE_FLAGS = {
    **_FLAGS,
    "UPCAST": lambda a: INTERPRET,
    "DOT_PRECISION": _dot_precision,
}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel (BLOCK_* >= 16: tl.dot's minimum)."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 8
    num_stages: int = 3

    def launch(self) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h,
                    num_warps=self.num_warps, num_stages=self.num_stages)


# H100 defaults. Chosen without a GPU from ptxas -v on sm_90a builds of the bf16 kernels (see
# the README, "Triton backend"): 128 x 128 fp32 logit tiles with BLOCK_H 32 and 8 warps are the largest tiles
# that compile to wgmma without register spills in all three kernels (BLOCK_H 64 spills 0.2-1.4 KB);
# the same tile as CCE's forward default in its BLOCK_D.
CUDA_CONFIGS = {
    "lse": KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    "grad_hidden": KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    "grad_weight": KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
}


def _autotune_configs():
    out = []
    # around the default; BLOCK_H 32 first: the larger K step spills on sm_90 (see CUDA_CONFIGS)
    for bn, bv, bh, w in ((128, 128, 32, 8), (64, 128, 32, 4), (64, 256, 32, 8), (128, 64, 32, 4),
                          (128, 128, 64, 8)):
        out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh), num_warps=w, num_stages=3))
    return out


def _decorate(fn, flags, reset_to_zero=()):
    kernel = triton.heuristics(flags)(triton.jit(fn))
    if AUTOTUNE:
        kernel = triton.autotune(_autotune_configs(), key=["V", "D"],
                                 reset_to_zero=list(reset_to_zero))(kernel)
    return kernel


_TEMP_FLAGS = {**_DENSE_FLAGS, "HAS_TEMP": lambda a: a["inv_t"] != 1.0}
_lse_fwd_kernel = _decorate(_lse_fwd_kernel, _TEMP_FLAGS)
_indexed_logits_kernel = triton.heuristics(_FLAGS)(triton.jit(_indexed_logits_kernel))
_grad_hidden_kernel = _decorate(_grad_hidden_kernel, _TEMP_FLAGS, reset_to_zero=("DH_ptr",))
_grad_weight_kernel = _decorate(_grad_weight_kernel, _TEMP_FLAGS, reset_to_zero=("DW_ptr",))


def _pow2_between(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def kernel_config(kind: str, n: int, v: int, h: int) -> KernelConfig:
    """The config used for `kind` in {"lse", "grad_hidden", "grad_weight"} at this shape.

    Under the interpreter the cost is (programs x loop iterations) of numpy calls, so tiles are as large as
    the shape allows (whole H in one step when H <= 128); on CUDA one fixed, known-good tile per kernel.
    """
    if not INTERPRET:
        return CUDA_CONFIGS[kind]
    return KernelConfig(_pow2_between(n, 16, 64), _pow2_between(v, 16, 2048), _pow2_between(h, 16, 128), 4, 1)


def _launch_kwargs(kind: str, n: int, v: int, h: int) -> dict:
    return {} if AUTOTUNE else kernel_config(kind, n, v, h).launch()


# ---------------------------------------------------------------------------------------------------------
# launchers


def _check_inputs(hidden, weight, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] must share H; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden and weight must be on one device; got {hidden.device} and {weight.device}")
    if hidden.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "importing profuser.kernels to run on the CPU")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    # the kernels index rows with a stride and assume unit stride along H
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return hidden, weight, bias


def _softcap_arg(softcap):
    return None if softcap is None else float(softcap)


def lse_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row statistics of z = softcap(hidden @ weight.T + bias) without writing z.

    hidden [N, H], weight [V, H], bias [V] or None (fp32/bf16/fp16).
    Returns lse [N] f32 (logsumexp_v z), lse_t [N] f32 (logsumexp_v z / T; == lse when T == 1),
    argmax [N] int64 (first index of the maximum).
    """
    hidden, weight, bias = _check_inputs(hidden, weight, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse_t = torch.empty_like(lse)
    argmax = torch.empty(n, dtype=torch.int64, device=hidden.device)
    if n == 0:
        return lse, lse_t, argmax
    if v == 0:
        raise ValueError("weight has V = 0 rows (an empty ZeRO-3 shard? gather the lm_head weight first)")
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with _launching(hidden.device):
        _lse_fwd_kernel[grid](hidden, weight, bias, lse, lse_t, argmax, n, v, h, hidden.stride(0),
                              weight.stride(0), _softcap_arg(softcap), 1.0 / float(temperature),
                              **_launch_kwargs("lse", n, v, h))
    return lse, lse_t, argmax


def indexed_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   softcap: float | None, ids: torch.Tensor) -> torch.Tensor:
    """z at chosen vocabulary ids: out[i, s] = softcap(hidden[i] . weight[ids[i, s]] + bias[ids[i, s]]).

    hidden [N, H], weight [V, H], bias [V] or None, ids [N, S] int32/int64 (-1 = skip).
    Returns [N, S] float32, 0 where ids == -1 (and where ids is out of [0, V): never read).
    """
    hidden, weight, bias = _check_inputs(hidden, weight, bias)
    n, h = hidden.shape
    if ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"ids must be [N, S] with N = {n}; got {tuple(ids.shape)}")
    ids = ids.contiguous()
    s = ids.shape[1]
    out = torch.empty((n, s), dtype=torch.float32, device=hidden.device)
    if n == 0 or s == 0:
        return out
    block_s = _pow2_between(s, 16, 64)
    block_h = _pow2_between(h, 16, 128 if INTERPRET else 64)
    with _launching(hidden.device):
        _indexed_logits_kernel[(n, triton.cdiv(s, block_s))](
            hidden, weight, bias, ids, out, weight.shape[0], h, s, hidden.stride(0), weight.stride(0),
            ids.stride(0), out.stride(0), _softcap_arg(softcap), BLOCK_S=block_s, BLOCK_H=block_h,
            num_warps=4)
    return out


def fused_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
               temperature: float, lse: torch.Tensor, lse_t: torch.Tensor, alpha: torch.Tensor,
               beta: torch.Tensor, sp_ids: torch.Tensor, sp_coef: torch.Tensor, *, need_hidden: bool = True,
               need_weight: bool = True, need_bias: bool | None = None, filter_eps: float = 0.0):
    """Gradients of a loss whose logit gradient has the rowmath form (module header, item 3).

    hidden [N, H], weight [V, H], bias [V] or None; lse, lse_t, alpha, beta [N] (f32); sp_ids [N, S'] int
    (-1 = none), sp_coef [N, S'] (f32). Returns (d_hidden [N, H] in hidden's dtype or None,
    d_weight [V, H] in weight's dtype or None, d_bias [V] in bias's dtype or None); accumulation is fp32.
    """
    hidden, weight, bias = _check_inputs(hidden, weight, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    need_bias = (bias is not None) if need_bias is None else (need_bias and bias is not None)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    inv_t = 1.0 / float(temperature)
    alpha = alpha.to(torch.float32)
    beta = beta.to(torch.float32)
    if inv_t == 1.0:
        # p == q: fold beta into alpha and let the kernels skip the second exp
        alpha, beta = alpha + beta, beta
    lse = lse.to(torch.float32).contiguous()
    lse_t = lse_t.to(torch.float32).contiguous()
    alpha, beta = alpha.contiguous(), beta.contiguous()
    if sp_ids.shape != sp_coef.shape or sp_ids.dim() != 2 or sp_ids.shape[0] != n:
        raise ValueError(f"sp_ids and sp_coef must both be [N, S'] with N = {n}; got "
                         f"{tuple(sp_ids.shape)} and {tuple(sp_coef.shape)}")
    sp_ids = sp_ids.to(torch.int64).contiguous()
    sp_coef = sp_coef.to(torch.float32).contiguous()
    n_sparse = sp_ids.shape[1]
    sc = _softcap_arg(softcap)
    d_hidden = d_weight = d_bias = None
    if n == 0:
        return (torch.zeros_like(hidden) if need_hidden else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    common = (lse, lse_t, alpha, beta, sp_ids, sp_coef)
    if need_hidden:
        dh = torch.zeros((n, h), **f32)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        with _launching(hidden.device):
            _grad_hidden_kernel[grid](hidden, weight, bias, *common, dh, n, v, h, n_sparse,
                                      hidden.stride(0), weight.stride(0), sp_ids.stride(0), dh.stride(0), sc,
                                      inv_t, float(filter_eps), **_launch_kwargs("grad_hidden", n, v, h))
        d_hidden = dh.to(hidden.dtype)
    if need_weight or need_bias:
        # a 1-element placeholder rather than None for an output not asked for: the autotuner's
        # reset_to_zero zeroes it by name (the NEED_* flags keep the kernel from touching it)
        dw = torch.zeros((v, h) if need_weight else (1,), **f32)
        db = torch.empty(v if need_bias else 1, **f32)
        grid = lambda meta: (triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
        with _launching(hidden.device):
            _grad_weight_kernel[grid](hidden, weight, bias, *common, dw, db, n, v, h, n_sparse,
                                      hidden.stride(0), weight.stride(0), sp_ids.stride(0), h, sc, inv_t,
                                      float(filter_eps), NEED_DW=need_weight, NEED_DB=need_bias,
                                      **_launch_kwargs("grad_weight", n, v, h))
        d_weight = dw.to(weight.dtype) if need_weight else None
        d_bias = db.to(bias.dtype) if need_bias else None
    return d_hidden, d_weight, d_bias
