"""Public API of profuser.kernels: `fusion_loss` (validation + backend dispatch) and `FusionLoss`.

Definition (every backend computes exactly this; see the README, "The fusion loss library"), per row i with label y_i !=
ignore_index, z = W h_i + b (softcap s: z = s tanh(z / s)):
    CE_i   = logsumexp(z) - z[y_i]
    M_i    = sum_t w_t / sum_t' w_t' * p_t   over teachers with a kept entry (fused sparse target)
    KD_i   = T^2 sum_j M_j (log M_j - log_softmax(z / T)_j)  [+ r (log r - log(1 - sum_{j in S} q_j))]
    loss_i = lam CE_i + (1 - lam) KD_i;  reduction "mean" divides the sum by num_items (default: the
    count of valid labels; 0 -> loss 0); reduction "sum" with row_weights w: sum_i w_i loss_i.
Backends: "reference" (dense, float64-capable ground truth), "chunked" (plain torch, [chunk x V]
logits at most, cuBLAS GEMMs on CUDA: 6 N H V flops), "triton" (CCE-style kernels, nothing of size
[rows x V]: the least memory; kernels/triton_fusion.py), "auto": chunked. On CUDA that is the path whose
predicted time is lower in docs/kernels.md (GEMM-bound against the triton path's atomics); it is a
prediction until bench/gpu_suite.py has measured both (README, "Which backend").

Validation happens before any compute and raises ValueError naming the argument. Checks that read
tensor values (ids in range, NaN/inf, negative weights, labels in range) need a host sync; validate=False
skips exactly those and keeps the shape / dtype / device / option checks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .params import BACKENDS, LOGPROB_TOL, MISSING_MASS_MODES, REDUCTIONS, TOPK_MASS_TOL, FusionParams

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INTS = (torch.int32, torch.int64)


# which backend "auto" takes on CUDA (docs/kernels.md: chunked is predicted faster at every shape of the suite)
AUTO_CUDA = "chunked"


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"fusion_loss: argument '{name}' {msg}")


def make_params(lam=0.9, temperature=1.0, softcap=None, missing_mass="renormalize", ignore_index=-100,
                reduction="mean", num_items=None) -> FusionParams:
    """Check the scalar options and return a FusionParams (num_items resolved to a float or None)."""
    if not isinstance(lam, (int, float)) or not (0.0 <= float(lam) <= 1.0):
        raise _err("lam", f"must be a number in [0, 1], got {lam!r}")
    if not isinstance(temperature, (int, float)) or not (0.0 < float(temperature) < float("inf")):
        raise _err("temperature", f"must be a finite number > 0, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not (float(softcap) > 0.0)):
        raise _err("softcap", f"must be None or a number > 0, got {softcap!r}")
    if missing_mass not in MISSING_MASS_MODES:
        raise _err("missing_mass", f"must be one of {MISSING_MASS_MODES}, got {missing_mass!r}")
    if missing_mass == "tail_bucket" and float(temperature) != 1.0:
        raise _err("temperature", f"must be 1.0 with missing_mass='tail_bucket', got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise _err("reduction", f"must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise _err("ignore_index", f"must be an int, got {ignore_index!r}")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise _err("num_items", f"must be a number or a 1-element tensor, got shape "
                                        f"{tuple(num_items.shape)}")
            num_items = num_items.item()  # a global count (e.g. all-reduced): one host sync
        if not isinstance(num_items, (int, float)) or not (float(num_items) >= 0.0):
            raise _err("num_items", f"must be a number >= 0, got {num_items!r}")
        num_items = float(num_items)
    return FusionParams(float(lam), float(temperature), None if softcap is None else float(softcap),
                        missing_mass, ignore_index, reduction, num_items)


def _check_tensor(name, x, ndim, dtypes, device):
    if not isinstance(x, torch.Tensor):
        raise _err(name, f"must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise _err(name, f"must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise _err(name, f"has dtype {x.dtype}; expected one of {[str(d) for d in dtypes]}")
    if device is not None and x.device != device:
        raise _err(name, f"is on {x.device} but hidden is on {device}")


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def validate_inputs(hidden, weight, labels, teacher_ids, teacher_logprobs, teacher_weights, vocab_maps, bias,
                    params: FusionParams, check_values: bool = True, row_weights=None) -> None:
    """Raise ValueError naming the offending argument (shapes [N, H], [V, H], [N], [T, N, K], [T, N], [N])."""
    _check_tensor("hidden", hidden, 2, _FLOATS, None)
    dev = hidden.device
    N, H = hidden.shape
    _check_tensor("weight", weight, 2, _FLOATS, dev)
    if weight.dtype != hidden.dtype:
        raise _err("weight", f"has dtype {weight.dtype} but hidden has {hidden.dtype}")
    if weight.shape[1] != H:
        raise _err("weight", f"must be [V, H={H}], got shape {tuple(weight.shape)}")
    V = weight.shape[0]
    if V < 1:
        raise _err("weight", "must have at least one vocabulary row")
    if bias is not None:
        _check_tensor("bias", bias, 1, (hidden.dtype,), dev)
        if bias.shape[0] != V:
            raise _err("bias", f"must be [V={V}], got shape {tuple(bias.shape)}")
    _check_tensor("labels", labels, 1, (torch.int64, torch.int32), dev)
    if labels.shape[0] != N:
        raise _err("labels", f"must be [N={N}], got shape {tuple(labels.shape)}")
    _check_tensor("teacher_ids", teacher_ids, 3, _INTS, dev)
    T, N2, K = teacher_ids.shape
    if N2 != N or T < 1 or K < 1:
        raise _err("teacher_ids", f"must be [T>=1, N={N}, K>=1], got shape {tuple(teacher_ids.shape)}")
    _check_tensor("teacher_logprobs", teacher_logprobs, 3, _FLOATS, dev)
    if teacher_logprobs.shape != teacher_ids.shape:
        raise _err("teacher_logprobs", f"must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
                                       f"got {tuple(teacher_logprobs.shape)}")
    if teacher_weights is not None:
        _check_tensor("teacher_weights", teacher_weights, 2, _FLOATS, dev)
        if tuple(teacher_weights.shape) != (T, N):
            raise _err("teacher_weights", f"must be [T={T}, N={N}], got shape {tuple(teacher_weights.shape)}")
    if vocab_maps is not None:
        if isinstance(vocab_maps, torch.Tensor) or len(vocab_maps) != T:
            n = "a tensor" if isinstance(vocab_maps, torch.Tensor) else f"{len(vocab_maps)} entries"
            raise _err("vocab_maps", f"must be a sequence of T={T} entries (None or int tensor [V_t]), "
                                     f"got {n}")
        for t, vm in enumerate(vocab_maps):
            if vm is None:
                continue
            if not isinstance(vm, torch.Tensor) or vm.dim() != 1 or vm.dtype not in _INTS or vm.numel() < 1:
                raise _err(f"vocab_maps[{t}]", "must be None or a non-empty 1-D int32/int64 tensor")
            if vm.device != dev:
                raise _err(f"vocab_maps[{t}]", f"is on {vm.device} but hidden is on {dev}")
    if row_weights is not None:
        _check_tensor("row_weights", row_weights, 1, _FLOATS, dev)
        if row_weights.shape[0] != N:
            raise _err("row_weights", f"must be [N={N}], got shape {tuple(row_weights.shape)}")
        if params.reduction != "sum":
            raise _err("row_weights", f"needs reduction='sum' (the weights are the normalization), got "
                                      f"reduction={params.reduction!r}")
    if not check_values:
        return

    if row_weights is not None:
        bad = ~torch.isfinite(row_weights)
        if bad.any():
            i = _first_bad(bad)[0]
            raise _err("row_weights", f"[{i}] is {float(row_weights[i])} (NaN/inf)")
    valid = labels != params.ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    if bad.any():
        i = _first_bad(bad)[0]
        raise _err("labels", f"row {i} has id {int(labels[i])} outside [0, V={V}) and != ignore_index")
    bad = (teacher_ids < -1)
    if bad.any():
        t, i, k = _first_bad(bad)
        raise _err("teacher_ids", f"[{t}, {i}, {k}] = {int(teacher_ids[t, i, k])} is < -1")
    for t in range(T):
        vm = None if vocab_maps is None else vocab_maps[t]
        limit = V if vm is None else vm.numel()
        bad = teacher_ids[t] >= limit
        if bad.any():
            i, k = _first_bad(bad)
            what = f"V={V}" if vm is None else f"len(vocab_maps[{t}])={limit}"
            raise _err("teacher_ids", f"[{t}, {i}, {k}] = {int(teacher_ids[t, i, k])} is >= {what}")
        if vm is not None:
            badm = (vm < -1) | (vm >= V)
            if badm.any():
                j = _first_bad(badm)[0]
                raise _err(f"vocab_maps[{t}]", f"entry {j} maps to {int(vm[j])}, outside [-1, V={V})")
    # Empty slots (id -1) carry no entry: their log-prob is never read, so padding them with -inf (what a
    # top-k store or a collator naturally writes) is accepted.
    bad = ~torch.isfinite(teacher_logprobs) & (teacher_ids != -1)
    if bad.any():
        t, i, k = _first_bad(bad)
        raise _err("teacher_logprobs", f"[{t}, {i}, {k}] is {float(teacher_logprobs[t, i, k])} (NaN/inf)")
    # a log-probability above 0 is impossible; a small tolerance admits float16 / fp32 rounding of 0
    bad = (teacher_logprobs > LOGPROB_TOL) & (teacher_ids != -1)
    if bad.any():
        t, i, k = _first_bad(bad)
        raise _err("teacher_logprobs", f"[{t}, {i}, {k}] = {float(teacher_logprobs[t, i, k]):.4g} is a positive "
                                       f"log-probability (> {LOGPROB_TOL}): corrupt or not log-probabilities")
    # the top-k entries of one position are part of one distribution: their probabilities sum to at most 1
    mass = torch.where(teacher_ids != -1, teacher_logprobs.float(), -torch.inf).logsumexp(-1)
    bad = mass > TOPK_MASS_TOL
    if bad.any():
        t, i = _first_bad(bad)
        raise _err("teacher_logprobs", f"[{t}, {i}, :] has probabilities summing to {float(mass[t, i].exp()):.4g} "
                                       f"> 1 (log-sum-exp {float(mass[t, i]):.3g} > {TOPK_MASS_TOL}): not "
                                       "log-probabilities of one distribution (max-shifted logits instead of "
                                       "log_softmax?)")
    if teacher_weights is not None:
        bad = ~torch.isfinite(teacher_weights)
        if bad.any():
            t, i = _first_bad(bad)
            raise _err("teacher_weights", f"[{t}, {i}] is {float(teacher_weights[t, i])} (NaN/inf)")
        bad = teacher_weights < 0
        if bad.any():
            t, i = _first_bad(bad)
            raise _err("teacher_weights", f"[{t}, {i}] = {float(teacher_weights[t, i])} is negative")
        total = teacher_weights.sum(0, dtype=torch.float32)  # what the fused target divides by, per row
        bad = ~torch.isfinite(total)
        if bad.any():
            i = _first_bad(bad)[0]
            raise _err("teacher_weights", f"[:, {i}] sums to {float(total[i])}: the weights overflow float32")


def _triton_backend():
    try:
        from .triton_fusion import triton_fusion_loss
    except ImportError as e:  # triton missing, or the module not installed
        raise ValueError(f"fusion_loss: argument 'backend'='triton' is unavailable: {e}") from e
    return triton_fusion_loss


def fusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_weights: torch.Tensor | None = None,
    *,
    vocab_maps: Sequence[torch.Tensor | None] | None = None,
    bias: torch.Tensor | None = None,
    lam: float = 0.9,
    temperature: float = 1.0,
    softcap: float | None = None,
    missing_mass: str = "renormalize",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items=None,
    row_weights: torch.Tensor | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    validate: bool = True,
    filter_eps: float = 0.0,
    deterministic: bool = False,
):
    """Fused multi-teacher distillation loss lam * CE(gold) + (1 - lam) * KL(fused teachers || student).

    hidden [N, H] float32/bfloat16/float16/float64; weight [V, H] same dtype; labels [N] int64;
    teacher_ids [T, N, K] int32/int64 (-1 = empty); teacher_logprobs [T, N, K] float (log_softmax over the
    teacher's vocabulary); teacher_weights [T, N] float >= 0 or None (= 1); vocab_maps None or T entries
    (None, or int tensor [V_t]: teacher id -> student id, -1 = none); bias [V] or None.
    row_weights [N] float or None: with reduction "sum", loss = sum_i row_weights[i] loss_i; one call then
    serves rows of several groups with their own weight and normalizer (the engine passes w_m / N_m for the
    rows of mode m). Returns the loss ([N] with reduction "none", else 0-dim; float32, or float64 for
    float64 inputs), or (loss, FusionStats) with return_stats (FusionStats.row_ce / row_kd hold the per-row
    terms for group statistics on the device). Gradients flow to hidden, weight and bias only.
    validate=False skips the checks that read tensor values (each one a host sync).
    filter_eps (triton only; reference and chunked are always exact): skip the gradient GEMMs of logit
    tiles whose |dLoss/dz| are all below it (CCE's gradient filtering); 0 = exact, the default.
    deterministic (triton only): gradients without atomics, bitwise reproducible (10 N H V flops, not 8).
    """
    if backend not in BACKENDS:
        raise _err("backend", f"must be one of {BACKENDS}, got {backend!r}")
    params = make_params(lam, temperature, softcap, missing_mass, ignore_index, reduction, num_items)
    if not isinstance(filter_eps, (int, float)) or not (0.0 <= float(filter_eps) < float("inf")):
        raise _err("filter_eps", f"must be a finite number >= 0, got {filter_eps!r}")
    validate_inputs(hidden, weight, labels, teacher_ids, teacher_logprobs, teacher_weights, vocab_maps, bias,
                    params, check_values=validate, row_weights=row_weights)
    labels = labels.to(torch.int64)
    if backend == "auto":
        backend = AUTO_CUDA if hidden.is_cuda and hidden.dtype != torch.float64 else "chunked"
    if backend == "reference":
        from .reference import reference_fusion_loss

        return reference_fusion_loss(hidden, weight, bias, labels, teacher_ids, teacher_logprobs,
                                     teacher_weights, vocab_maps, params, return_stats, row_weights)
    from .targets import build_sparse_target

    tdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    target = build_sparse_target(labels, teacher_ids, teacher_logprobs, teacher_weights, vocab_maps, params,
                                 dtype=tdt, vocab_size=weight.shape[0])
    if backend == "triton":
        from .triton_fusion import TritonConfig

        fn = _triton_backend()
        return fn(hidden, weight, bias, labels, target, params, return_stats,
                  TritonConfig(float(filter_eps), bool(deterministic)), row_weights)
    from .chunked import chunked_fusion_loss

    return chunked_fusion_loss(hidden, weight, bias, labels, target, params, return_stats, None, row_weights)


class FusionLoss(nn.Module):
    """Module form of fusion_loss holding the options; forward(hidden [N, H], weight [V, H], labels [N],
    teacher_ids [T, N, K], teacher_logprobs [T, N, K], teacher_weights [T, N] | None, *, vocab_maps,
    bias, num_items, return_stats)."""

    def __init__(self, lam=0.9, temperature=1.0, softcap=None, missing_mass="renormalize", ignore_index=-100,
                 reduction="mean", backend="auto", validate=True):
        super().__init__()
        if backend not in BACKENDS:
            raise _err("backend", f"must be one of {BACKENDS}, got {backend!r}")
        make_params(lam, temperature, softcap, missing_mass, ignore_index, reduction)  # fail at construction
        self.options = dict(lam=lam, temperature=temperature, softcap=softcap, missing_mass=missing_mass,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            validate=validate)

    def forward(self, hidden, weight, labels, teacher_ids, teacher_logprobs, teacher_weights=None, *,
                vocab_maps=None, bias=None, num_items=None, row_weights=None, return_stats=False):
        return fusion_loss(hidden, weight, labels, teacher_ids, teacher_logprobs, teacher_weights,
                           vocab_maps=vocab_maps, bias=bias, num_items=num_items, row_weights=row_weights,
                           return_stats=return_stats, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
