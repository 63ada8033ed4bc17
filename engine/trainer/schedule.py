"""Progressive fusion schedule w(step) -> (w_infer, w_train) and the learning-rate schedule.

ProFuser (arXiv 2408.04998) trains with

    L(step) = w1(step) * L_infer + w2(step) * L_train

where L_infer fuses on the vote winner's generated response (inference mode) and L_train on the gold
response with the MinCE teacher (training mode). With p = step / max_steps in [0, 1) and the two stage
weights s1 = (1, 0), s2 = (0.1, 1) (configurable):

    two_stage   s1 while p < f, then s2                      (ProFuser, the documented version; f = 0.5)
    linear      s1 until the ramp starts, linear to s2, then s2; the ramp has width r centred on f
    simul       (1, 1) from the start                         (SimulFuse ablation)
    reverse     mirrored modes: (0, 1) while p < f, then (1, 0.1)  (ReverseFuse ablation)
    train_only  (0, 1)                                        (FuseLLM / FuseChat: training mode only)
    infer_only  (1, 0)
    sft         (0, 1) with lam = 1                           (plain fine-tuning on the gold answers: the
                                                               baseline every fusion schedule must beat)

Every kind reads the same streams in the same order (a mode's stream advances only on the steps that use
it), so runs of different kinds with one seed see the same training-mode batches; `sft` differs from
`train_only` by the loss alone (effective_lam).

A mode whose weight is 0 is not even loaded that step (the engine skips its loader).

Learning rate: linear warmup from 0 over `warmup_steps`, then cosine or linear decay from lr to
lr * min_lr_ratio at max_steps (or constant). `lr_factor(step)` is the multiplier of the base lr used for
the optimizer step with index `step` (0-based).
"""

from __future__ import annotations

import math

from ..config import MODES, OptimConfig, ScheduleConfig, TrainConfig


def fusion_weights(cfg: ScheduleConfig, step: int, max_steps: int) -> tuple[float, float]:
    """(w_infer, w_train) for optimizer step `step` in [0, max_steps)."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0, got {max_steps}")
    if not 0 <= step < max_steps:
        raise ValueError(f"step must be in [0, {max_steps}), got {step}")
    p = step / max_steps
    s1 = (float(cfg.stage1[0]), float(cfg.stage1[1]))
    s2 = (float(cfg.stage2[0]), float(cfg.stage2[1]))
    f = cfg.switch_fraction
    kind = cfg.kind
    if kind == "two_stage":
        return s1 if p < f else s2
    if kind == "reverse":
        # the same weights with the two modes swapped: training mode first
        return (s1[1], s1[0]) if p < f else (s2[1], s2[0])
    if kind == "linear":
        lo, hi = max(0.0, f - cfg.ramp_fraction / 2), min(1.0, f + cfg.ramp_fraction / 2)
        if hi <= lo:  # zero-width ramp: a hard switch at f
            t = 0.0 if p < f else 1.0
        else:
            t = min(1.0, max(0.0, (p - lo) / (hi - lo)))
        if t <= 0.0 or t >= 1.0:  # exact stage weights outside the ramp
            return s1 if t <= 0.0 else s2
        return (s1[0] + t * (s2[0] - s1[0]), s1[1] + t * (s2[1] - s1[1]))
    if kind == "simul":
        return (1.0, 1.0)
    if kind in ("train_only", "sft"):
        return (0.0, 1.0)
    if kind == "infer_only":
        return (1.0, 0.0)
    raise ValueError(f"schedule.kind: unknown schedule {kind!r}")


def effective_lam(cfg: TrainConfig) -> float:
    """The CE weight of the loss: 1 for `sft` (no teacher term), loss.lam for every fusion schedule."""
    return 1.0 if cfg.schedule.kind == "sft" else float(cfg.loss.lam)


def lr_factor(cfg: OptimConfig, step: int) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    elif cfg.decay == "linear":
        shape = 1.0 - t
    else:
        raise ValueError(f"optim.decay: unknown decay {cfg.decay!r}")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def stage_of(cfg: ScheduleConfig, step: int, max_steps: int) -> str:
    """A short label of the active modes, for logs: 'infer', 'train' or 'infer+train'."""
    w1, w2 = fusion_weights(cfg, step, max_steps)
    return "+".join(m for m, w in (("infer", w1), ("train", w2)) if w > 0) or "none"


def active_modes(cfg: TrainConfig) -> list[str]:
    """Modes with a non-zero weight at some step, in MODES order (the others' stores are never opened)."""
    used = set()
    for s in range(cfg.optim.max_steps):
        used |= {m for m, w in zip(MODES, fusion_weights(cfg.schedule, s, cfg.optim.max_steps)) if w > 0}
    return [m for m in MODES if m in used]
