"""Progressive schedule weights per step and the warmup + decay learning-rate factor."""

import math

import pytest

from profuser.engine.config import OptimConfig, ScheduleConfig, TrainConfig
from profuser.engine.trainer.schedule import effective_lam, fusion_weights, lr_factor, stage_of


def weights(kind, n=10, **kw):
    cfg = ScheduleConfig(kind=kind, **kw)
    return [fusion_weights(cfg, s, n) for s in range(n)]


def test_two_stage_default_switches_at_half():
    w = weights("two_stage")
    assert w[:5] == [(1.0, 0.0)] * 5 and w[5:] == [(0.1, 1.0)] * 5


def test_two_stage_fraction_and_custom_stages():
    w = weights("two_stage", switch_fraction=0.3, stage1=[1.0, 0.0], stage2=[0.2, 0.8])
    assert w[:3] == [(1.0, 0.0)] * 3 and w[3:] == [(0.2, 0.8)] * 7


def test_reverse_mirrors_modes():
    w = weights("reverse")
    assert w[:5] == [(0.0, 1.0)] * 5 and w[5:] == [(1.0, 0.1)] * 5


@pytest.mark.parametrize("kind, pair", [("simul", (1.0, 1.0)), ("train_only", (0.0, 1.0)), ("infer_only", (1.0, 0.0)),
                                        ("sft", (0.0, 1.0))])
def test_constant_schedules(kind, pair):
    assert weights(kind) == [pair] * 10


def test_linear_ramp_full_width():
    w = weights("linear", n=11)  # p = s/11; ramp over [0, 1]
    for s, (w1, w2) in enumerate(w):
        t = s / 11
        assert w1 == pytest.approx(1.0 + t * (0.1 - 1.0)) and w2 == pytest.approx(t)
    assert all(a[1] < b[1] for a, b in zip(w, w[1:]))  # strictly increasing training weight


def test_linear_ramp_narrow_and_zero_width():
    w = weights("linear", n=10, ramp_fraction=0.2)  # ramp over p in [0.4, 0.6]
    assert w[:5] == [(1.0, 0.0)] * 5 and w[6:] == [(0.1, 1.0)] * 4 and w[5] == pytest.approx((0.55, 0.5))
    assert weights("linear", ramp_fraction=0.0) == weights("two_stage")


def test_bad_step_rejected():
    with pytest.raises(ValueError, match="step"):
        fusion_weights(ScheduleConfig(), 10, 10)
    with pytest.raises(ValueError, match="max_steps"):
        fusion_weights(ScheduleConfig(), 0, 0)


def test_stage_labels():
    cfg = ScheduleConfig()
    assert stage_of(cfg, 0, 10) == "infer" and stage_of(cfg, 9, 10) == "infer+train"


def test_lr_warmup_then_cosine():
    cfg = OptimConfig(max_steps=12, warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
    f = [lr_factor(cfg, s) for s in range(12)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert lr_factor(cfg, 12) == pytest.approx(0.1)


def test_lr_linear_and_constant():
    cfg = OptimConfig(max_steps=10, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert [lr_factor(cfg, s) for s in (0, 5)] == [pytest.approx(1.0), pytest.approx(0.5)]
    assert lr_factor(OptimConfig(decay="constant"), 30) == 1.0


@pytest.mark.parametrize("kind, lam", [("sft", 1.0), ("train_only", 0.7), ("two_stage", 0.7), ("reverse", 0.7)])
def test_sft_is_the_only_kind_without_the_teacher_term(kind, lam):
    cfg = TrainConfig()
    cfg.schedule.kind, cfg.loss.lam = kind, 0.7
    assert effective_lam(cfg) == lam
