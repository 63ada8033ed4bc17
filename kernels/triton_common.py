"""Shared pieces of the Triton kernels (triton_lse.py, triton_grad.py): the launch context, the logit tile,
the dense part of dLoss/dz, tile configs and the constexpr flags derived from the arguments.

Notation: hidden h [N, H], lm_head weight W [V, H], bias b [V], raw logits z_raw = h W^T + b, and with a
softcap s: z = s * tanh(z_raw / s) (else z = z_raw). A logit tile [BLOCK_N, BLOCK_V] is built from tl.dot
tiles over H and consumed in registers; no [N, V] logits are ever written.

Rules every kernel follows: row offsets of h / W / gradients are int64 (N * H and V * H pass 2^31 at e.g.
V = 262144, H = 8192; the GEMM operands use block pointers, whose offsets are 64-bit); every load is masked
or boundary-checked for ragged N, V, H; under the CPU interpreter every load is upcast to fp32 at once (the
interpreter computes bf16 arithmetic and bf16 tl.dot wrongly). On CUDA 16-bit operands feed tl.dot directly
with an fp32 accumulator (bf16 x bf16 is exact in fp32: the upcast result up to summation order, at
tensor-core speed). Every option that changes the code is a tl.constexpr (bias, softcap, temperature, tail
bucket, argmax, filtering, atomics), so each specialisation compiles without the others' branches.
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
NUM_SMS_DEFAULT = 132  # H100 SXM; the real count is read from the device at launch


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_conflict() -> str | None:
    """Why the CPU interpreter cannot run these kernels with the installed triton and numpy, or None.

    The interpreter of triton < 3.7 turns a scalar kernel argument used as a loop bound into a Python int
    with int() of a 1-element array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"): every kernel fails. Measured here (tests/kernels, `make test-floors`): triton 3.4-3.6
    fail with numpy 2.4.6 and pass with numpy 2.3.5 and 1.24.4; triton 3.7.1 passes with numpy 2.4.6. On a GPU
    numpy plays no part: this is the interpreter's problem only."""
    import numpy

    if _version(numpy.__version__) >= (2, 4) and _version(triton.__version__) < (3, 7):
        return (f"TRITON_INTERPRET=1 with triton {triton.__version__} and numpy {numpy.__version__}: the interpreter "
                "of triton < 3.7 cannot run kernels under numpy >= 2.4; install triton>=3.7 or numpy<2.4")
    return None


@contextlib.contextmanager
def launching(device: torch.device):
    """Context of a kernel launch: the tensors' CUDA device made current (Triton launches on the current
    device, so a tensor on cuda:1 would otherwise be read from cuda:0's context), and triton's deprecation
    warning for tl.make_block_ptr silenced (it fires at every interpreted call). Block pointers are kept on
    purpose: on sm_90 they cut these kernels' register spills several-fold against per-element pointer
    tensors, and tensor descriptors need a device-side allocator. On the CPU, a triton / numpy pair whose
    interpreter cannot run the kernels is one named RuntimeError (interpreter_conflict)."""
    if device.type != "cuda" and INTERPRET:
        conflict = interpreter_conflict()
        if conflict:
            raise RuntimeError(conflict)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_DEFAULT


# Under the interpreter a call of a @triton.jit helper re-patches triton.language on every call (a third of
# the run time of these kernels); plain Python functions run identically there, so helpers are jitted only
# for real compilation.
helper = (lambda fn: fn) if INTERPRET else triton.jit


@helper
def softcap_tile(x, SOFTCAP):
    # s * tanh(x / s) with tanh(y) = 2 sigmoid(2y) - 1: tl has no tanh that also runs in the interpreter.
    return SOFTCAP * (2.0 * tl.sigmoid(x * (2.0 / SOFTCAP)) - 1.0)


@helper
def logit_tile(H_ptr, W_ptr, Bias_ptr, n0, v0, N, V, D, stride_hn, stride_wv, SOFTCAP,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """z tile [BLOCK_N, BLOCK_V] fp32 for rows n0.. and vocab columns v0.. (softcapped when asked)."""
    # block pointers: 64-bit offsets, zero padding for ragged edges, and no per-element pointer tensors held
    # across the pipelined H loop (register pressure)
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
        acc = softcap_tile(acc, SOFTCAP)
    return acc


@helper
def in_support(Sup_ptr, offs_n, mask_n, offs_v, n_sup, stride_sup):
    """bool [BLOCK_N, BLOCK_V]: column offs_v is one of row offs_n's support ids (Sup [N, n_sup], -1 = none).
    Only the tail bucket needs it: n_sup compares per tile, compiled in only under TAIL."""
    sup_row = Sup_ptr + offs_n.to(tl.int64) * stride_sup
    hit = (offs_n[:, None] < 0) & (offs_v[None, :] < 0)  # all False, in the tile's shape
    for s in range(0, n_sup):
        ids = tl.load(sup_row + s, mask=mask_n, other=-1)
        hit = hit | (ids[:, None] == offs_v[None, :])
    return hit


@helper
def dense_dz_tile(z, offs_n, offs_v, mask_n, mask_v, LSE_ptr, LSET_ptr, LSEO_ptr, Alpha_ptr, Beta_ptr,
                  Gamma_ptr, Sup_ptr, n_sup, stride_sup, inv_t, SOFTCAP, HAS_TEMP: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, TAIL: tl.constexpr):
    """Dense part of dL/dz_raw [BLOCK_N, BLOCK_V] fp32 from the logit tile z (rowmath: alpha p + beta q +
    gamma exp(z - lse_out) outside the support), times the softcap factor. The sparse part is added apart."""
    lse = tl.load(LSE_ptr + offs_n, mask=mask_n, other=0.0)
    alpha = tl.load(Alpha_ptr + offs_n, mask=mask_n, other=0.0)
    dz = alpha[:, None] * tl.exp(z - lse[:, None])
    if HAS_TEMP:
        lse_t = tl.load(LSET_ptr + offs_n, mask=mask_n, other=0.0)
        beta = tl.load(Beta_ptr + offs_n, mask=mask_n, other=0.0)
        dz += beta[:, None] * tl.exp(z * inv_t - lse_t[:, None])
    if TAIL:
        lse_out = tl.load(LSEO_ptr + offs_n, mask=mask_n, other=0.0)
        gamma = tl.load(Gamma_ptr + offs_n, mask=mask_n, other=0.0)
        outside = ~in_support(Sup_ptr, offs_n, mask_n, offs_v, n_sup, stride_sup)
        dz += tl.where(outside, gamma[:, None] * tl.exp(z - lse_out[:, None]), 0.0)
    if HAS_SOFTCAP:
        t = z / SOFTCAP
        dz = dz * (1.0 - t * t)
    # padded columns hold z = 0 (not -inf), so exp(z - lse) must be masked out here
    return tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)


# ---------------------------------------------------------------------------------------------------------
# configs and decoration


def dot_precision(args) -> str:
    # follow torch's own fp32 matmul setting on CUDA ("high"/"medium" allow tf32); the interpreter is exact
    if INTERPRET:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


FLAGS = {
    "HAS_BIAS": lambda a: a["Bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["SOFTCAP"] is not None and a["SOFTCAP"] != 0,
}
DENSE_FLAGS = {
    **FLAGS,
    "UPCAST": lambda a: INTERPRET,
    "DOT_PRECISION": dot_precision,
    "HAS_TEMP": lambda a: a["inv_t"] != 1.0,
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


# H100 defaults, chosen without a GPU from ptxas -v on sm_90a builds of the bf16 kernels (docs/kernels.md,
# "Register reports"): 128 x 128 fp32 logit tiles with BLOCK_H 32 and 8 warps are the largest tiles that
# compile to wgmma without spills in the GEMM kernels (BLOCK_H 64 spills); CCE's forward default too.
CUDA_CONFIGS = {
    "lse": KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    "grad": KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    "grad_hidden": KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    "grad_weight": KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
}
# the tail bucket's support compares hold a [BLOCK_N, BLOCK_V] mask more: 64-row tiles keep it in registers
# (128-row tiles spill 0.3-1.5 KB there; docs/kernels.md)
CUDA_CONFIGS_TAIL = {k: KernelConfig(64, 128, 32, num_warps=8, num_stages=3) for k in CUDA_CONFIGS}


def autotune_configs():
    out = []
    # around the default; BLOCK_H 32 first: the larger K step spills on sm_90 (see CUDA_CONFIGS)
    for bn, bv, bh, w in ((128, 128, 32, 8), (64, 128, 32, 4), (64, 256, 32, 8), (128, 64, 32, 4),
                          (128, 128, 64, 8)):
        out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh), num_warps=w, num_stages=3))
    return out


def decorate(fn, flags, key=("V", "D"), reset_to_zero=()):
    kernel = triton.heuristics(flags)(triton.jit(fn))
    if AUTOTUNE:
        kernel = triton.autotune(autotune_configs(), key=list(key), reset_to_zero=list(reset_to_zero))(kernel)
    return kernel


def pow2_between(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def kernel_config(kind: str, n: int, v: int, h: int, tail: bool = False) -> KernelConfig:
    """The config used for `kind` (a CUDA_CONFIGS key) at this shape (tail: the tail bucket's variant).

    Under the interpreter the cost is (programs x loop iterations) of numpy calls, so tiles are as large as
    the shape allows (whole H in one step when H <= 128); on CUDA one fixed, known-good tile per kernel.
    """
    if not INTERPRET:
        return (CUDA_CONFIGS_TAIL if tail else CUDA_CONFIGS)[kind]
    return KernelConfig(pow2_between(n, 16, 64), pow2_between(v, 16, 2048), pow2_between(h, 16, 128), 4, 1)


def launch_kwargs(kind: str, n: int, v: int, h: int, tail: bool = False) -> dict:
    return {} if AUTOTUNE else kernel_config(kind, n, v, h, tail).launch()


def check_inputs(hidden, weight, bias):
    """Shape / device checks shared by the launchers; returns the tensors with unit stride along H."""
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
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return hidden, weight, bias


def softcap_arg(softcap):
    return None if softcap is None else float(softcap)
