"""Every bad input to fusion_loss raises a ValueError naming the argument, before any compute."""

import pytest
import torch

from profuser.kernels import FusionLoss, fusion_loss


def good(N=6, H=4, V=10, T=2, K=3):
    return dict(
        hidden=torch.randn(N, H), weight=torch.randn(V, H), labels=torch.randint(0, V, (N,)),
        teacher_ids=torch.randint(0, V, (T, N, K)),
        teacher_logprobs=torch.log_softmax(torch.randn(T, N, K), -1),
        teacher_weights=torch.rand(T, N),
    )


def call(**over):
    kw = good()
    opts = {k: over.pop(k) for k in list(over) if k not in kw}
    kw.update(over)
    args = [kw.pop(k) for k in ("hidden", "weight", "labels", "teacher_ids", "teacher_logprobs")]
    return fusion_loss(*args, kw.pop("teacher_weights"), backend=opts.pop("backend", "chunked"), **opts)


def test_good_inputs_pass():
    assert torch.isfinite(call())


def _nan_at(x, idx, val=float("nan")):
    x = x.clone()
    x[idx] = val
    return x


g = good()
CASES = {
    # name: (overrides, argument named in the message, fragment)
    "hidden_1d": (dict(hidden=torch.randn(6)), "hidden", "2 dimensions"),
    "hidden_int": (dict(hidden=torch.ones(6, 4, dtype=torch.int64)), "hidden", "dtype"),
    "weight_H": (dict(weight=torch.randn(10, 5)), "weight", "H=4"),
    "weight_dtype": (dict(weight=torch.randn(10, 4, dtype=torch.float64)), "weight", "dtype"),
    "bias_shape": (dict(bias=torch.randn(9)), "bias", "V=10"),
    "labels_shape": (dict(labels=torch.zeros(5, dtype=torch.int64)), "labels", "N=6"),
    "labels_float": (dict(labels=torch.zeros(6)), "labels", "dtype"),
    "labels_range": (dict(labels=torch.tensor([0, 1, 10, 2, 3, 4])), "labels", "row 2"),
    "labels_negative": (dict(labels=torch.tensor([0, 1, 2, -5, 3, 4])), "labels", "row 3"),
    "ids_shape": (dict(teacher_ids=torch.zeros(2, 5, 3, dtype=torch.int64)), "teacher_ids", "N=6"),
    "ids_float": (dict(teacher_ids=torch.zeros(2, 6, 3)), "teacher_ids", "dtype"),
    "ids_too_big": (dict(teacher_ids=_nan_at(g["teacher_ids"], (1, 2, 0), 10)), "teacher_ids", "[1, 2, 0]"),
    "ids_below_minus1": (dict(teacher_ids=_nan_at(g["teacher_ids"], (0, 1, 1), -2)), "teacher_ids", "< -1"),
    "logprobs_shape": (dict(teacher_logprobs=torch.zeros(2, 6, 4)), "teacher_logprobs", "shape"),
    "logprobs_nan": (dict(teacher_logprobs=_nan_at(g["teacher_logprobs"], (1, 0, 2))), "teacher_logprobs",
                     "[1, 0, 2]"),
    "logprobs_inf": (dict(teacher_logprobs=_nan_at(g["teacher_logprobs"], (0, 0, 0), -float("inf"))),
                     "teacher_logprobs", "NaN/inf"),
    "logprobs_positive": (dict(teacher_logprobs=_nan_at(g["teacher_logprobs"], (1, 3, 0), 0.01)),
                          "teacher_logprobs", "[1, 3, 0] = 0.01"),
    "logprobs_shifted": (dict(teacher_logprobs=g["teacher_logprobs"] + 5.0), "teacher_logprobs", "positive"),
    # max-shifted logits (z - max z) instead of log_softmax: every value <= 0, the probabilities sum above 1
    "logprobs_max_shifted": (dict(teacher_logprobs=g["teacher_logprobs"] - g["teacher_logprobs"].amax(-1, True)),
                             "teacher_logprobs", "[0, 0, :] has probabilities summing to"),
    "logprobs_max_shifted_tail": (dict(teacher_logprobs=g["teacher_logprobs"] - g["teacher_logprobs"].amax(-1, True),
                                       missing_mass="tail_bucket"), "teacher_logprobs", "> 1"),
    "weights_overflow": (dict(teacher_weights=torch.full((2, 6), 3e38)), "teacher_weights", "overflow"),
    "weights_shape": (dict(teacher_weights=torch.rand(3, 6)), "teacher_weights", "T=2"),
    "weights_negative": (dict(teacher_weights=_nan_at(g["teacher_weights"], (1, 4), -0.5)), "teacher_weights",
                         "negative"),
    "weights_nan": (dict(teacher_weights=_nan_at(g["teacher_weights"], (0, 3))), "teacher_weights", "[0, 3]"),
    "lam_high": (dict(lam=1.5), "lam", "[0, 1]"),
    "lam_negative": (dict(lam=-0.1), "lam", "[0, 1]"),
    "temperature_zero": (dict(temperature=0.0), "temperature", "> 0"),
    "temperature_negative": (dict(temperature=-1.0), "temperature", "> 0"),
    "softcap_zero": (dict(softcap=0.0), "softcap", "> 0"),
    "tail_with_temperature": (dict(missing_mass="tail_bucket", temperature=2.0), "temperature",
                              "tail_bucket"),
    "missing_mass": (dict(missing_mass="drop"), "missing_mass", "renormalize"),
    "reduction": (dict(reduction="avg"), "reduction", "mean"),
    "backend": (dict(backend="cuda"), "backend", "chunked"),
    "num_items_negative": (dict(num_items=-1), "num_items", ">= 0"),
    "vocab_maps_length": (dict(vocab_maps=[None]), "vocab_maps", "T=2"),
    "vocab_map_dtype": (dict(vocab_maps=[None, torch.zeros(10)]), "vocab_maps[1]", "int"),
    "vocab_map_range": (dict(vocab_maps=[torch.full((10,), 10), None]), "vocab_maps[0]", "V=10"),
    "vocab_map_below": (dict(vocab_maps=[None, torch.full((10,), -3)]), "vocab_maps[1]", "[-1, V=10)"),
    "ids_beyond_map": (dict(vocab_maps=[torch.zeros(5, dtype=torch.int64), None]), "teacher_ids",
                       "len(vocab_maps[0])=5"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name):
    over, arg, frag = CASES[name]
    if name == "ids_beyond_map":
        over = dict(over, teacher_ids=_nan_at(g["teacher_ids"], (0, 0, 0), 7))
    with pytest.raises(ValueError) as ei:
        call(**over)
    msg = str(ei.value)
    assert f"'{arg}'" in msg and frag in msg, msg


def test_validate_false_skips_value_checks_only():
    # a value problem passes with validate=False (no device sync) ...
    kw = good()
    lp = _nan_at(kw["teacher_logprobs"], (0, 0, 0), 5.0)   # finite but positive: only the value checks see it
    fusion_loss(kw["hidden"], kw["weight"], kw["labels"], kw["teacher_ids"], lp, validate=False)
    bad = _nan_at(kw["teacher_weights"], (0, 0), -1.0)
    fusion_loss(kw["hidden"], kw["weight"], kw["labels"], kw["teacher_ids"], kw["teacher_logprobs"], bad,
                validate=False, backend="reference")
    # ... while shape and option checks still run
    with pytest.raises(ValueError, match="'weight'"):
        fusion_loss(kw["hidden"], torch.randn(10, 3), kw["labels"], kw["teacher_ids"], kw["teacher_logprobs"],
                    validate=False)
    with pytest.raises(ValueError, match="'lam'"):
        fusion_loss(kw["hidden"], kw["weight"], kw["labels"], kw["teacher_ids"], kw["teacher_logprobs"],
                    lam=2.0, validate=False)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="'reduction'"):
        FusionLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="'temperature'"):
        FusionLoss(missing_mass="tail_bucket", temperature=0.5)
    with pytest.raises(ValueError, match="'backend'"):
        FusionLoss(backend="liger")


def test_teacher_tensors_get_no_gradient():
    kw = good()
    lp = kw["teacher_logprobs"].requires_grad_()
    h = kw["hidden"].requires_grad_()
    loss = fusion_loss(h, kw["weight"], kw["labels"], kw["teacher_ids"], lp)
    loss.backward()
    assert h.grad is not None and lp.grad is None


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("missing_mass", ["renormalize", "tail_bucket"])
def test_empty_slots_may_hold_inf(backend, missing_mass):
    """An empty slot (id -1) is never read: -inf or NaN padding there is accepted and changes nothing."""
    kw = good()
    ids = kw["teacher_ids"].clone()
    ids[0, :, -1] = -1
    ids[1, 2, :] = -1                                     # a teacher with no entry at row 2
    lp0 = kw["teacher_logprobs"].masked_fill(ids == -1, 0.0)
    lp_inf = kw["teacher_logprobs"].masked_fill(ids == -1, -float("inf"))
    args = (kw["hidden"], kw["weight"], kw["labels"], ids)
    a = fusion_loss(*args, lp0, kw["teacher_weights"], missing_mass=missing_mass, backend=backend)
    b = fusion_loss(*args, lp_inf, kw["teacher_weights"], missing_mass=missing_mass, backend=backend)
    assert torch.isfinite(b)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="teacher_logprobs"):   # a non-empty slot still may not be inf
        fusion_loss(*args, _nan_at(lp_inf, (0, 0, 0), -float("inf")), kw["teacher_weights"], backend=backend)


def test_an_interpreter_that_cannot_run_the_kernels_is_one_named_error(monkeypatch):
    """triton < 3.7's CPU interpreter fails every kernel under numpy >= 2.4 (a cryptic TypeError per launch): the
    launch says which versions conflict and what to install instead (kernels/triton_common.py)."""
    import numpy
    import triton

    from profuser.kernels import triton_common as tc

    if not tc.INTERPRET:
        pytest.skip("the conflict is the CPU interpreter's")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    with pytest.raises(RuntimeError, match=r"triton 3\.6\.0 and numpy 2\.4\.6.*install triton>=3\.7 or numpy<2\.4"):
        call(backend="triton")
    for t, n in (("3.7.1", "2.4.6"), ("3.4.0", "2.3.5"), ("3.4.0", "1.24.4"), ("3.10.0+git1", "2.10.0")):
        monkeypatch.setattr(numpy, "__version__", n)
        monkeypatch.setattr(triton, "__version__", t)
        assert tc.interpreter_conflict() is None, (t, n)
    assert torch.isfinite(call(backend="triton"))
