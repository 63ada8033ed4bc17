"""Options and statistics shared by every fusion-loss backend (reference, chunked, triton).

`FusionParams` carries the non-tensor options of `fusion_loss` into a backend as one frozen dataclass
(the CCE `CCEParams` habit): an autograd.Function then takes only tensors positionally.

Reduction scale (applied identically in every backend, so it lives here):
    reduction "none": loss_i per row, upstream gradient g_i = grad_output[i]
    reduction "sum" : loss = sum_i loss_i,            g_i = grad_output
                      with row_weights w [N]: loss = sum_i w_i loss_i, g_i = w_i grad_output (one call for
                      rows of several groups, each with its own weight / normalizer, e.g. w_m / N_m per mode)
    reduction "mean": loss = sum_i loss_i / num_items, g_i = grad_output / num_items
num_items is `FusionParams.num_items` when given (a float: a global token count under gradient
accumulation / data parallelism), else the number of rows whose label != ignore_index, counted on the
device as a tensor (no host sync). A count of 0 gives scale 0, so the loss is 0, never NaN.
Call `reduction_scale(params, valid)` to get that scale as a 0-dim tensor.

FusionStats: 0-dim float tensors from the same pass as the loss, no gradient:
    ce                       mean CE_i over non-ignored rows
    kd                       mean KD_i over rows that have a KD term
    accuracy                 mean of (argmax_v z_iv == label_i) over non-ignored rows
    kept_fraction            teacher entries kept after vocab mapping / non-empty entries (non-ignored rows)
    student_mass_on_support  mean over KD rows of sum_{distinct teacher ids j} softmax(z_i)_j
    row_ce, row_kd           [N] per row: CE_i (0 on ignored rows), KD_i (0 on rows without KD); group
                             sums (per mode, per source) stay on the device: no host sync to log them
    row_mass                 [N] per row: the student's mass on the teachers' support (0 on rows without KD)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MISSING_MASS_MODES = ("renormalize", "tail_bucket")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "chunked", "triton")
# The largest teacher log-probability accepted anywhere (the loss's validation, the teacher store's value
# checks): 0 plus rounding (float16 rounds a tiny positive fp32 log_softmax to at most ~1e-7).
LOGPROB_TOL = 1e-3
# The most the top-k probabilities of one position may sum to above 1, in log space (log-sum-exp of the
# filled slots <= TOPK_MASS_TOL): float16 storage moves each log-prob by at most half an ulp, which moves the
# sum by < 1e-3 (bf16: < 4e-3); max-shifted logits instead of log_softmax sum to e.g. 1.3-30 and are refused.
TOPK_MASS_TOL = 1e-2


def softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The logit soft-cap, the one definition every torch path uses (reference, chunked, the engine's
    LogitTransform): z -> cap * tanh(z / cap); None = no cap. Its chain-rule factor is 1 - (softcap(z)/cap)^2.
    (The Triton kernels write it with a sigmoid: tl has no tanh that also runs in the interpreter.)"""
    return z if cap is None else cap * torch.tanh(z / cap)


@dataclass(frozen=True)
class FusionParams:
    """Non-tensor options of the fusion loss (see fusion_loss for their meaning).

    num_items: None = count the non-ignored labels; else the float divisor of reduction "mean".
    """

    lam: float = 0.9
    temperature: float = 1.0
    softcap: float | None = None
    missing_mass: str = "renormalize"
    ignore_index: int = -100
    reduction: str = "mean"
    num_items: float | None = None

    @property
    def tail_bucket(self) -> bool:
        return self.missing_mass == "tail_bucket"


@dataclass
class FusionStats:
    """Statistics of one fusion-loss call; every field is a 0-dim float32 tensor (see module doc)."""

    ce: torch.Tensor
    kd: torch.Tensor
    accuracy: torch.Tensor
    kept_fraction: torch.Tensor
    student_mass_on_support: torch.Tensor
    row_ce: torch.Tensor | None = None
    row_kd: torch.Tensor | None = None
    row_mass: torch.Tensor | None = None

    def as_dict(self) -> dict[str, float]:
        """Python floats (one host sync), for logging."""
        return {k: float(getattr(self, k)) for k in ("ce", "kd", "accuracy", "kept_fraction",
                                                    "student_mass_on_support")}


def reduction_scale(params: FusionParams, valid: torch.Tensor, dtype: torch.dtype = torch.float32,
                    row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """s such that loss = sum_i s_i loss_i for reductions "mean" / "sum": a 0-dim tensor, or [N] with
    row_weights (reduction "sum"); 1 for "none".

    valid: [N] bool, rows whose label != ignore_index (only counted for "mean" without num_items).
    """
    if row_weights is not None:
        return row_weights.to(dtype)
    if params.reduction != "mean":
        return torch.ones((), dtype=dtype, device=valid.device)
    if params.num_items is not None:
        n = float(params.num_items)
        return torch.tensor(1.0 / n if n > 0 else 0.0, dtype=dtype, device=valid.device)
    n = valid.sum().to(dtype)
    return torch.where(n > 0, 1.0 / n.clamp_min(1), torch.zeros_like(n))
