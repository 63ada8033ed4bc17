"""profuser.kernels: the multi-teacher fusion loss library.

    from profuser.kernels import fusion_loss, FusionLoss
    loss = fusion_loss(hidden, lm_head.weight, labels, teacher_ids, teacher_logprobs, teacher_weights)

Layout (one job per file): params.py (options, stats, reduction scale), targets.py (sparse fused target),
rowmath.py (per-row loss and gradient coefficients), reference.py (dense ground truth), chunked.py (plain
torch backend; the GEMM path on CUDA), triton_common.py / triton_lse.py / triton_grad.py / triton_fusion.py
(Triton backend: shared tiles and configs, forward kernels, gradient kernels, autograd.Function),
fusion_loss.py (API, validation, dispatch).
"""

from .fusion_loss import FusionLoss, fusion_loss
from .params import FusionParams, FusionStats
from .targets import SparseTarget, build_sparse_target

__all__ = ["fusion_loss", "FusionLoss", "FusionParams", "FusionStats", "SparseTarget", "build_sparse_target"]
