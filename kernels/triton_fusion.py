"""Triton fusion loss: the autograd.Function over the kernels of triton_lse.py / triton_grad.py
(backend="triton"; the lowest-memory path: nothing of size [rows x V] is ever allocated).

Forward, for hidden h [N, H], weight W [V, H], bias b [V] and a SparseTarget with S = T*K slots:
    lse, lse_t, lse_out, argmax = lse_forward(h, W, b)         one pass over V split across the GPU
    z_sp [N, S+1]      = indexed_logits at [label | target.ids]  (the ids rowmath.grad_coefs uses)
    loss_i, CE, KD     = rowmath.row_loss(target, lse, lse_t, z_sp[:, 0], z_sp[:, 1:], lse_out)
Gradient (rowmath.grad_coefs gives the coefficients; triton_grad.fused_grad recomputes the logit tiles):
    reduction "mean"/"sum": computed during the forward with g = reduction scale (per row with row_weights);
        backward only multiplies by grad_output. The lm_head weight is then read only while the forward runs
        (ZeRO-3 may release it right after), and the saved state is the three gradients.
    reduction "none": g = grad_output [N] is only known in backward, so the forward saves h, W, b and the
        row statistics ([N] and [N, S+1]: small) and backward runs fused_grad.
Statistics (return_stats) come from the same forward pass (rowmath.make_stats) and carry no gradient.
float64 is not a kernel dtype here (use backend "reference" or "chunked"); outputs are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import FusionParams, FusionStats, reduction_scale
from .rowmath import grad_coefs, make_stats, row_loss, support_ids
from .targets import SparseTarget
from .triton_grad import fused_grad
from .triton_lse import indexed_logits, lse_forward

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TritonConfig:
    """Backend options.

    filter_eps: skip the gradient GEMMs of a logit tile whose |dLoss/dz| are all below this (CCE's gradient
        filtering; 0 = exact, the default). A value such as 2**-12 speeds up bf16 training, where such
        contributions vanish in the bf16 gradient anyway.
    deterministic: the two-kernel gradient without atomics (bitwise reproducible, 10 N H V flops instead of
        8 N H V).
    """

    filter_eps: float = 0.0
    deterministic: bool = False


def _row_stats(hidden, weight, bias, target: SparseTarget, params: FusionParams, want_argmax: bool):
    """lse, lse_t, lse_out (tail bucket, else None), argmax (or None), z_sp [N, S+1] (z at [label | ids])."""
    sup = support_ids(target) if params.tail_bucket else None
    rs = lse_forward(hidden, weight, bias, params.softcap, params.temperature, support=sup, argmax=want_argmax)
    sp_ids = torch.cat([target.label.unsqueeze(1), target.ids], dim=1)
    z_sp = indexed_logits(hidden, weight, bias, params.softcap, sp_ids)
    return rs, z_sp


def _grads(hidden, weight, bias, target, params, rs, z_sp, g, need, cfg: TritonConfig):
    """(d_hidden, d_weight, d_bias) for upstream per-row gradient g ([N] or 0-dim); None where not needed."""
    gc = grad_coefs(target, rs.lse, rs.lse_t, z_sp[:, 0], z_sp[:, 1:], params, g, rs.lse_out)
    sup = support_ids(target) if params.tail_bucket else None
    return fused_grad(hidden, weight, bias, params.softcap, params.temperature, rs.lse, rs.lse_t, gc, z_sp, sup,
                      need_hidden=need[0], need_weight=need[1], need_bias=need[2], filter_eps=cfg.filter_eps,
                      deterministic=cfg.deterministic)


class _TritonFusionLoss(torch.autograd.Function):
    """Outputs: loss (0-dim, or [N] for reduction "none"), then the 7 FusionStats fields (no grad; zeros when
    want_stats is False)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_weights, target: SparseTarget, params: FusionParams,
                cfg: TritonConfig, want_stats: bool, grad_enabled: bool):
        # needs_input_grad stays True under torch.no_grad(); without the caller's grad mode an evaluation
        # pass would pay for the gradient kernels (3x the forward)
        need = tuple(ctx.needs_input_grad[:3]) if grad_enabled else (False, False, False)
        rs, z_sp = _row_stats(hidden, weight, bias, target, params, want_stats)
        terms = row_loss(target, rs.lse, rs.lse_t, z_sp[:, 0], z_sp[:, 1:], params, rs.lse_out)
        if params.reduction == "none":
            loss = terms.loss
            ctx.save_for_backward(hidden, weight, bias, z_sp)
            ctx.rs = rs
        else:
            scale = reduction_scale(params, target.valid, torch.float32, row_weights)
            loss = (terms.loss * scale).sum() if scale.dim() else terms.loss.sum() * scale
            grads = (None, None, None)
            if any(need):  # gradient in forward (module doc)
                grads = _grads(hidden, weight, bias, target, params, rs, z_sp, scale, need, cfg)
            ctx.save_for_backward(*grads)
        ctx.target, ctx.params, ctx.cfg, ctx.need = target, params, cfg, need
        if want_stats:
            st = make_stats(target, terms, rs.argmax)
            extra = (st.ce, st.kd, st.accuracy, st.kept_fraction, st.student_mass_on_support, st.row_ce,
                     st.row_kd, st.row_mass)
        else:
            extra = tuple(torch.zeros((), device=hidden.device) for _ in range(8))
        ctx.mark_non_differentiable(*extra)
        return (loss,) + extra

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.params.reduction == "none":
            hidden, weight, bias, z_sp = ctx.saved_tensors
            dh, dw, db = _grads(hidden, weight, bias, ctx.target, ctx.params, ctx.rs, z_sp,
                                grad_loss.to(torch.float32), ctx.need, ctx.cfg)
        else:
            dh, dw, db = ctx.saved_tensors
            # always multiply (cheap, elementwise): testing grad_output == 1 on the host would sync the
            # device every step
            dh = None if dh is None else dh * grad_loss.to(dh.dtype)
            dw = None if dw is None else dw * grad_loss.to(dw.dtype)
            db = None if db is None else db * grad_loss.to(db.dtype)
        return dh, dw, db, None, None, None, None, None, None


def triton_fusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    target: SparseTarget,
    params: FusionParams,
    return_stats: bool = False,
    cfg: TritonConfig | None = None,
    row_weights: torch.Tensor | None = None,
):
    """Fusion loss on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    hidden [N, H] and weight [V, H] float32/bfloat16/float16 (same dtype), bias [V] | None, labels [N] int64
    (already folded into target.label), target: SparseTarget from targets.build_sparse_target, row_weights
    [N] | None (reduction "sum"). Returns the float32 loss ([N] for reduction "none", else 0-dim), or
    (loss, FusionStats).
    """
    if hidden.dtype not in KERNEL_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(f"backend 'triton' takes hidden and weight of one dtype in float32/bfloat16/"
                         f"float16; got hidden {hidden.dtype}, weight {weight.dtype} (use backend 'chunked' "
                         f"or 'reference')")
    if bias is not None and bias.dtype not in KERNEL_DTYPES:
        raise ValueError(f"backend 'triton': bias dtype {bias.dtype} is not float32/bfloat16/float16")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}]; got {tuple(labels.shape)}")
    res = _TritonFusionLoss.apply(hidden, weight, bias, row_weights, target, params, cfg or TritonConfig(),
                                  return_stats, torch.is_grad_enabled())
    if not return_stats:
        return res[0]
    return res[0], FusionStats(*res[1:])
