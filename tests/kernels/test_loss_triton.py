"""Triton backend of the fusion loss: kernels vs plain torch, the full loss and gradients vs the reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (conftest.py), so shapes are small (N <= 64, H <= 64,
V <= 300) and ragged (no dimension a multiple of the tiles). Tolerances follow the project rule (CCE /
flash-attention habit): the kernel's error against a float64 ground truth may be at most twice torch's own
error in the same input dtype, plus a small absolute slack.
GPU: the `gpu` class runs only with CUDA and PROFUSER_TEST_REAL_TRITON=1 (otherwise conftest turns the
interpreter on, which cannot drive CUDA at a useful speed).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from profuser.kernels import triton_common
from profuser.kernels.params import FusionParams
from profuser.kernels.reference import reference_fusion_loss
from profuser.kernels.rowmath import GradCoefs
from profuser.kernels.targets import build_sparse_target
from profuser.kernels.triton_fusion import TritonConfig, triton_fusion_loss
from profuser.kernels.triton_grad import fused_grad, sparse_grad
from profuser.kernels.triton_lse import indexed_logits, lse_forward


@pytest.fixture(autouse=True)
def _cpu_tests_need_the_interpreter(request):
    """With PROFUSER_TEST_REAL_TRITON=1 (a GPU run) the CPU-tensor tests cannot launch: skip them there."""
    if not triton_common.INTERPRET and request.node.get_closest_marker("gpu") is None \
            and "sm90" not in request.node.name:
        pytest.skip("CPU tests of the triton backend run under TRITON_INTERPRET=1")


# ----------------------------------------------------------------------------------------------------------
# helpers


def dense_logits(h, w, b, softcap):
    """float64 z = softcap(h w^T + b) [N, V]."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def assert_no_worse(name, out, gt, torch_out, rel_slack=1e-6):
    """max |out - gt| <= 2 max |torch_out - gt| + rel_slack * max |gt| (printed, so a CI log diagnoses)."""
    out, gt, torch_out = out.double(), gt.double(), torch_out.double()
    err = (out - gt).abs().max().item() if gt.numel() else 0.0
    ref_err = (torch_out - gt).abs().max().item() if gt.numel() else 0.0
    slack = rel_slack * (gt.abs().max().item() if gt.numel() else 0.0) + 1e-12
    print(f"{name}: err {err:.3e} torch err {ref_err:.3e} slack {slack:.1e}")
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= 2 * ref_err + slack, f"{name}: err {err:.3e} > 2 x torch err {ref_err:.3e} + {slack:.1e}"


def make_case(N=48, H=40, V=300, T=2, K=5, dtype=torch.float32, bias=False, vocab_maps=False, ignore_frac=0.2,
              empty_frac=0.2, zero_weight_frac=0.1, scale=1.0, seed=0):
    """Random inputs of fusion_loss (as a dict of tensors), with ignored labels, empty teacher slots, zero
    teacher weights, repeated ids across teachers and optional vocab maps with -1 and many-to-one entries."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 2).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    Vt = V + 37 if vocab_maps else V
    tids = torch.randint(0, Vt, (T, N, K), generator=g)
    tids[:, :, 0] = labels.clamp_min(0)  # teachers often agree with the gold token: repeated ids
    tids[torch.rand(T, N, K, generator=g) < empty_frac] = -1
    tlp = torch.log_softmax(torch.randn(T, N, K, generator=g) * 2, -1) - 0.3  # leaves a tail mass
    tw = torch.rand(T, N, generator=g)
    tw[torch.rand(T, N, generator=g) < zero_weight_frac] = 0.0
    maps = None
    if vocab_maps:
        maps = []
        for t in range(T):
            m = torch.randint(0, V, (Vt,), generator=g)          # many-to-one by construction
            m[torch.rand(Vt, generator=g) < 0.15] = -1
            maps.append(m if t % 2 == 0 else None)
        if T == 1:
            maps = [maps[0]]
        # unmapped teacher ids of the identity teachers must be valid student ids
        for t in range(T):
            if maps[t] is None:
                tids[t] = torch.where(tids[t] >= V, tids[t] % V, tids[t])
    return dict(hidden=hidden, weight=weight, bias=b, labels=labels, teacher_ids=tids.to(torch.int32),
                teacher_logprobs=tlp.to(torch.float16), teacher_weights=tw, vocab_maps=maps)


def run_triton(case, params, *, grad_out=None, return_stats=False, cfg=None):
    """(loss, grads dict, stats) of the triton backend; grads of hidden, weight and bias (when present)."""
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    b = None if case["bias"] is None else case["bias"].clone().requires_grad_()
    target = build_sparse_target(case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                                 case["teacher_weights"], case["vocab_maps"], params,
                                 vocab_size=case["weight"].shape[0])
    res = triton_fusion_loss(h, w, b, case["labels"], target, params, return_stats=return_stats, cfg=cfg)
    loss, stats = (res if return_stats else (res, None))
    go = torch.ones_like(loss) if grad_out is None else grad_out
    loss.backward(go)
    grads = dict(hidden=h.grad, weight=w.grad, bias=None if b is None else b.grad)
    return loss.detach(), grads, stats


def run_reference(case, params, *, dtype=None, grad_out=None, return_stats=False):
    """Same through the reference backend, with the float inputs cast to dtype (float64 = ground truth)."""
    cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    h = cast(case["hidden"]).detach().clone().requires_grad_()
    w = cast(case["weight"]).detach().clone().requires_grad_()
    b = None if case["bias"] is None else cast(case["bias"]).detach().clone().requires_grad_()
    res = reference_fusion_loss(h, w, b, case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                                case["teacher_weights"], case["vocab_maps"], params,
                                return_stats=return_stats)
    loss, stats = (res if return_stats else (res, None))
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(go)
    grads = dict(hidden=h.grad, weight=w.grad, bias=None if b is None else b.grad)
    return loss.detach(), grads, stats


def check_against_reference(case, params, grad_out=None):
    """Triton (input dtype) vs float64 ground truth, with torch's own error in the input dtype as the bar."""
    loss, grads, _ = run_triton(case, params, grad_out=grad_out)
    gt_loss, gt_grads, _ = run_reference(case, params, dtype=torch.float64, grad_out=grad_out)
    rf_loss, rf_grads, _ = run_reference(case, params, grad_out=grad_out)
    assert loss.dtype == torch.float32 and loss.shape == gt_loss.shape
    assert_no_worse("loss", loss, gt_loss, rf_loss)
    for k, gt in gt_grads.items():
        if gt is None:
            continue
        assert grads[k].dtype == case[k].dtype and grads[k].shape == gt.shape
        assert_no_worse(f"d_{k}", grads[k], gt, rf_grads[k])


# ----------------------------------------------------------------------------------------------------------
# primitives vs plain torch


@pytest.mark.parametrize("has_bias,softcap,temperature,splits",
                         [(False, None, 1.0, None), (True, None, 2.0, 3), (True, 5.0, 1.0, None),
                          (False, 3.0, 0.5, 2)])
def test_lse_forward_matches_torch(has_bias, softcap, temperature, splits):
    """Also with the vocabulary split across programs (splits > 1): partial sums merged in torch."""
    N, H, V = 37, 40, 301
    h = torch.randn(N, H)
    w = torch.randn(V, H) * 0.5
    b = torch.randn(V) if has_bias else None
    rs = lse_forward(h, w, b, softcap, temperature, splits=splits)
    z = dense_logits(h, w, b, softcap)
    z32 = h @ w.T + (0 if b is None else b)  # torch's own fp32 result: the error bar
    z32 = z32 if softcap is None else softcap * torch.tanh(z32 / softcap)
    assert rs.lse.dtype == torch.float32 and rs.argmax.dtype == torch.int64 and rs.lse_out is None
    assert_no_worse("lse", rs.lse, z.logsumexp(1), z32.logsumexp(1))
    torch.testing.assert_close(rs.lse_t.double(), (z / temperature).logsumexp(1), rtol=1e-6, atol=1e-5)
    assert torch.equal(rs.argmax, z.argmax(1))


@pytest.mark.parametrize("splits", [None, 4])
def test_lse_forward_complement_of_the_support(splits):
    """lse_out = logsumexp over the columns outside each row's support, accumulated apart (no 1 - q(S))."""
    N, H, V, S = 29, 24, 150, 6
    h, w = torch.randn(N, H), torch.randn(V, H)
    sup = torch.randint(-1, V, (N, S))
    sup[3] = -1  # a row without support: lse_out == lse
    rs = lse_forward(h, w, None, None, support=sup, argmax=False, splits=splits)
    z = dense_logits(h, w, None, None)
    inside = torch.zeros(N, V + 1, dtype=torch.bool).scatter_(1, torch.where(sup >= 0, sup, V), True)[:, :V]
    want = z.masked_fill(inside, float("-inf")).logsumexp(1)
    torch.testing.assert_close(rs.lse_out.double(), want, rtol=1e-6, atol=1e-5)
    assert rs.argmax is None and torch.allclose(rs.lse_out[3], rs.lse[3])


def test_lse_forward_argmax_ties_and_ragged_tiles():
    # duplicate weight rows in different V tiles (and splits): ties must resolve to the first index
    N, H, V = 20, 16, 530
    h = torch.randn(N, H)
    w = torch.randn(V, H) * 0.1
    w[300] = h[0] * 3
    w[5] = h[0] * 3
    w[520] = h[0] * 3
    z = dense_logits(h, w, None, None)
    for splits in (None, 3):
        rs = lse_forward(h, w, None, None, splits=splits)
        assert rs.argmax[0].item() == 5
        assert torch.equal(rs.argmax, z.float().argmax(1))
        torch.testing.assert_close(rs.lse.double(), z.logsumexp(1), rtol=1e-6, atol=1e-5)


def test_lse_forward_extreme_logits_finite():
    # |z| ~ 1e4: the online logsumexp must not overflow; bf16 inputs are upcast in the kernel
    N, H, V = 16, 32, 200
    h = torch.randn(N, H) * 100
    w = torch.randn(V, H) * 10
    for dt in (torch.float32, torch.bfloat16):
        rs = lse_forward(h.to(dt), w.to(dt), None, None, 2.0, splits=2)
        z = dense_logits(h.to(dt), w.to(dt), None, None)
        assert z.abs().max() > 5e3
        torch.testing.assert_close(rs.lse.double(), z.logsumexp(1), rtol=1e-6, atol=1e-2)
        torch.testing.assert_close(rs.lse_t.double(), (z / 2).logsumexp(1), rtol=1e-6, atol=1e-2)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_indexed_logits_matches_torch(id_dtype):
    N, H, V, S = 33, 72, 257, 11
    h, w, b = torch.randn(N, H), torch.randn(V, H), torch.randn(V)
    ids = torch.randint(-1, V, (N, S))
    ids[0, :3] = torch.tensor([V, V + 5, -1])  # out of range: must read nothing and give 0
    z = indexed_logits(h, w, b, 4.0, ids.to(id_dtype))
    dz = dense_logits(h, w, b, 4.0)
    ok = (ids >= 0) & (ids < V)
    want = torch.where(ok, dz.gather(1, ids.clamp(0, V - 1)), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5)
    assert z.shape == (N, S) and z.dtype == torch.float32


def _coefs(N, V, S, seed, tail):
    """Random gradient coefficients (GradCoefs) with repeated sparse ids; with `tail`, gamma and a support."""
    g = torch.Generator().manual_seed(seed)
    alpha, beta = torch.randn(N, generator=g), torch.randn(N, generator=g)
    sp_ids = torch.randint(-1, V, (N, S), generator=g)
    sp_ids[:, 1] = sp_ids[:, 0]  # a repeated id adds up
    sp_coef = torch.randn(N, S, generator=g)
    sup = torch.randint(-1, V, (N, 4), generator=g) if tail else None
    gamma = torch.randn(N, generator=g) if tail else torch.zeros(N)
    return alpha, beta, gamma, sp_ids, sp_coef, sup


@pytest.mark.parametrize("softcap,temperature,has_bias,tail,deterministic",
                         [(None, 1.0, False, False, False), (5.0, 2.0, True, False, False),
                          (None, 0.7, True, False, True), (4.0, 1.0, True, True, False),
                          (None, 1.0, False, True, True)])
def test_fused_grad_matches_autograd(softcap, temperature, has_bias, tail, deterministic):
    N, H, V, S = 41, 40, 301, 7
    h, w = torch.randn(N, H), torch.randn(V, H) * 0.3
    b = torch.randn(V) if has_bias else None
    alpha, beta, gamma, sp_ids, sp_coef, sup = _coefs(N, V, S, 0, tail)
    rs = lse_forward(h, w, b, softcap, temperature, support=sup)
    lse_out = rs.lse_out if tail else rs.lse
    gc = GradCoefs(alpha, beta, gamma, lse_out, sp_ids, sp_coef)
    z_sp = indexed_logits(h, w, b, softcap, sp_ids)
    dh, dw, db = fused_grad(h, w, b, softcap, temperature, rs.lse, rs.lse_t, gc, z_sp, sup,
                            deterministic=deterministic)
    # autograd of sum(z * G) with G the (detached) logit gradient gives G's chain rule through softcap
    hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
    bb = None if b is None else b.double().requires_grad_()
    z = dense_logits(hh, ww, bb, softcap)
    with torch.no_grad():
        G = (alpha.double()[:, None] * torch.softmax(z, 1)
             + beta.double()[:, None] * torch.softmax(z / temperature, 1))
        if tail:
            inside = torch.zeros(N, V + 1, dtype=torch.bool).scatter_(1, torch.where(sup >= 0, sup, V), True)[:, :V]
            G += torch.where(inside, 0.0, gamma.double()[:, None] * torch.exp(z - lse_out.double()[:, None]))
        G += torch.zeros(N, V + 1, dtype=torch.float64).scatter_add_(
            1, torch.where(sp_ids >= 0, sp_ids, V), sp_coef.double())[:, :V]
    (z * G).sum().backward()
    torch.testing.assert_close(dh.double(), hh.grad, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dw.double(), ww.grad, rtol=1e-5, atol=2e-5)
    if b is not None:
        torch.testing.assert_close(db.double(), bb.grad, rtol=1e-5, atol=2e-5)
    else:
        assert db is None
    # partial requests
    dh2, dw2, _ = fused_grad(h, w, b, softcap, temperature, rs.lse, rs.lse_t, gc, z_sp, sup, need_hidden=False,
                             deterministic=deterministic)
    assert dh2 is None and torch.allclose(dw2, dw, rtol=1e-6, atol=1e-6)
    dh3, dw3, _ = fused_grad(h, w, b, softcap, temperature, rs.lse, rs.lse_t, gc, z_sp, sup, need_weight=False,
                             need_bias=False, deterministic=deterministic)
    assert dw3 is None and torch.allclose(dh3, dh, rtol=1e-6, atol=1e-6)


def test_sparse_grad_kernels_match_torch():
    """The sparse part's Triton kernels (per-row gather, per-id runs of a stable sort) equal torch's
    index_add_ / einsum, repeated ids and -1 slots included."""
    N, H, V, S = 23, 40, 97, 9
    h, w = torch.randn(N, H), torch.randn(V, H)
    ids = torch.randint(-1, V, (N, S))
    ids[:, 2] = ids[:, 1]
    ids[5:9, 0] = 7  # one id over many rows: one program sums its run
    coef = torch.randn(N, S)
    out = {}
    for impl in ("torch", "triton"):
        dh, dw, db = torch.zeros(N, H), torch.zeros(V, H), torch.zeros(V)
        sparse_grad(h, w, ids, coef, dh, dw, db, impl=impl)
        out[impl] = (dh, dw, db)
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert out["torch"][1][7].abs().sum() > 0


def test_fused_grad_filter_skips_only_tiny_tiles():
    N, H, V = 32, 32, 256
    h, w = torch.randn(N, H), torch.randn(V, H) * 0.3
    rs = lse_forward(h, w, None, None)
    sp_ids, sp_coef = torch.full((N, 1), -1), torch.zeros(N, 1)
    z_sp = torch.zeros(N, 1)
    tiny = GradCoefs(torch.full((N,), 1e-9), torch.zeros(N), torch.zeros(N), rs.lse, sp_ids, sp_coef)
    for det in (False, True):
        exact = fused_grad(h, w, None, None, 1.0, rs.lse, rs.lse_t, tiny, z_sp, deterministic=det)
        filt = fused_grad(h, w, None, None, 1.0, rs.lse, rs.lse_t, tiny, z_sp, filter_eps=1e-3, deterministic=det)
        assert exact[0].abs().max() > 0 and filt[0].abs().max() == 0 and filt[1].abs().max() == 0
        big = tiny._replace(alpha=tiny.alpha * 1e9)
        a = fused_grad(h, w, None, None, 1.0, rs.lse, rs.lse_t, big, z_sp, filter_eps=1e-12, deterministic=det)
        r = fused_grad(h, w, None, None, 1.0, rs.lse, rs.lse_t, big, z_sp, deterministic=det)
        assert torch.equal(a[0], r[0])


def test_primitives_reject_bad_shapes():
    h, w = torch.randn(4, 16), torch.randn(20, 17)
    with pytest.raises(ValueError, match="share H"):
        lse_forward(h, w, None, None)
    with pytest.raises(ValueError, match="bias"):
        lse_forward(h, torch.randn(20, 16), torch.randn(19), None)
    with pytest.raises(ValueError, match="ids"):
        indexed_logits(h, torch.randn(20, 16), None, None, torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="V = 0"):
        lse_forward(h, torch.randn(0, 16), None, None)


# ----------------------------------------------------------------------------------------------------------
# full loss vs the reference backend


LOSS_CASES = [
    # id, case kwargs, params kwargs
    ("renorm-mean", dict(), dict()),
    ("renorm-T2-softcap-bias", dict(bias=True), dict(temperature=2.0, softcap=8.0)),
    ("tail-bucket-maps", dict(vocab_maps=True, T=3, K=4), dict(missing_mass="tail_bucket", lam=0.5)),
    ("tail-bucket-softcap-bias", dict(bias=True),
     dict(missing_mass="tail_bucket", softcap=5.0, reduction="sum")),
    ("renorm-maps-T07-sum", dict(vocab_maps=True, K=1, T=1), dict(temperature=0.7, reduction="sum", lam=0.2)),
    ("renorm-num-items", dict(T=3, K=3), dict(num_items=100.0, lam=0.0)),
    ("lam1-ce-only", dict(bias=True), dict(lam=1.0)),
]


@pytest.mark.parametrize("case_kw,params_kw", [c[1:] for c in LOSS_CASES], ids=[c[0] for c in LOSS_CASES])
def test_loss_and_grads_match_reference(case_kw, params_kw):
    check_against_reference(make_case(**case_kw), FusionParams(**params_kw))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_grad_output_not_one(reduction):
    case = make_case(bias=True, vocab_maps=True, T=2, K=3, seed=3)
    params = FusionParams(reduction=reduction, temperature=1.5, softcap=6.0)
    N = case["labels"].shape[0]
    go = torch.randn(N) if reduction == "none" else torch.tensor(-2.5)
    check_against_reference(case, params, grad_out=go)


def test_stats_match_reference():
    case = make_case(vocab_maps=True, T=3, K=4, seed=5, scale=3.0)
    for mm in ("renormalize", "tail_bucket"):
        params = FusionParams(missing_mass=mm)
        _, _, st = run_triton(case, params, return_stats=True)
        _, _, rst = run_reference(case, params, dtype=torch.float64, return_stats=True)
        for k in ("ce", "kd", "accuracy", "kept_fraction", "student_mass_on_support"):
            a, r = getattr(st, k), getattr(rst, k)
            assert a.dim() == 0 and not a.requires_grad
            torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-5, msg=k)
        for k in ("row_ce", "row_kd", "row_mass"):
            torch.testing.assert_close(getattr(st, k).double(), getattr(rst, k).double(), rtol=1e-5, atol=1e-5,
                                       msg=k)
    assert 0 < float(st.kept_fraction) < 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored(reduction):
    case = make_case(ignore_frac=1.1, bias=True)
    loss, grads, st = run_triton(case, FusionParams(reduction=reduction), return_stats=True)
    assert torch.all(loss == 0)
    for k, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and torch.all(g == 0), k
    assert all(torch.isfinite(getattr(st, k)) for k in ("ce", "kd", "accuracy", "kept_fraction"))


def test_all_teacher_slots_empty_is_ce_only():
    case = make_case(empty_frac=1.1)
    params = FusionParams(lam=0.3)
    check_against_reference(case, params)
    loss, _, st = run_triton(case, params, return_stats=True)
    assert float(st.kd) == 0.0
    ce_only = run_reference(case, FusionParams(lam=1.0), dtype=torch.float64)[0]
    torch.testing.assert_close(loss.double(), 0.3 * ce_only, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    case = make_case(N=0)
    loss, grads, _ = run_triton(case, FusionParams())
    assert float(loss) == 0.0 and grads["hidden"].shape == (0, 40) and torch.all(grads["weight"] == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_inputs(reduction):
    # the interpreter computes bf16 arithmetic wrongly: the kernels must upcast every load (module doc)
    case = make_case(dtype=torch.bfloat16, bias=True, T=2, K=4, seed=7)
    params = FusionParams(reduction=reduction, temperature=2.0, softcap=10.0)
    check_against_reference(case, params)


def test_fp16_extreme_logits_no_nan():
    case = make_case(dtype=torch.float16, scale=400.0, seed=11)
    loss, grads, _ = run_triton(case, FusionParams(temperature=2.0))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_gradient_in_forward_frees_inputs():
    """mean/sum: forward saves only the gradients, so backward never reads weight (ZeRO-3 may free it)."""
    case = make_case(T=1, K=2)
    params = FusionParams()
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    target = build_sparse_target(case["labels"], case["teacher_ids"], case["teacher_logprobs"], None, None,
                                 params)
    loss = triton_fusion_loss(h, w, None, case["labels"], target, params)
    want = torch.autograd.grad(loss, w, retain_graph=True)[0].clone()
    with torch.no_grad():
        w.zero_()  # a released / resharded weight: gradient must not change
    assert torch.equal(torch.autograd.grad(loss, w)[0], want)


def test_no_grad_skips_gradient_kernels(monkeypatch):
    """Under torch.no_grad() (evaluation) the forward must not run the gradient kernels."""
    from profuser.kernels import triton_fusion

    case = make_case(T=1, K=2)
    params = FusionParams()
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    target = build_sparse_target(case["labels"], case["teacher_ids"], case["teacher_logprobs"], None, None,
                                 params)
    want = triton_fusion_loss(h, w, None, case["labels"], target, params).detach()

    def fail(*a, **k):
        raise AssertionError("gradient kernels ran under no_grad")

    monkeypatch.setattr(triton_fusion, "fused_grad", fail)
    with torch.no_grad():
        got = triton_fusion_loss(h, w, None, case["labels"], target, params)
    assert torch.equal(got, want)


def test_rejects_float64_and_bad_labels():
    case = make_case(T=1, K=2)
    params = FusionParams()
    target = build_sparse_target(case["labels"], case["teacher_ids"], case["teacher_logprobs"], None, None,
                                 params)
    with pytest.raises(ValueError, match="float64"):
        triton_fusion_loss(case["hidden"].double(), case["weight"].double(), None, case["labels"], target,
                           params)
    with pytest.raises(ValueError, match="labels"):
        triton_fusion_loss(case["hidden"], case["weight"], None, case["labels"][:-1], target, params)


def test_public_api_dispatches_to_triton():
    from profuser.kernels.fusion_loss import fusion_loss

    case = make_case(bias=True, vocab_maps=True, T=3, K=2, seed=19)
    out = {}
    for backend in ("triton", "reference"):
        h = case["hidden"].clone().requires_grad_()
        w = case["weight"].clone().requires_grad_()
        loss, st = fusion_loss(h, w, case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                               case["teacher_weights"], vocab_maps=case["vocab_maps"], bias=case["bias"],
                               temperature=2.0, softcap=7.0, backend=backend, return_stats=True)
        loss.backward()
        out[backend] = (loss.detach(), h.grad, w.grad, st.kd)
    for a, b in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mm,T,K,N,H,V", [
    ("renormalize", 3, 16, 97, 96, 1271), ("tail_bucket", 3, 8, 97, 96, 1271),
    ("renormalize", 1, 1, 1, 96, 1271), ("renormalize", 3, 8, 97, 64, 50257)])
def test_larger_shapes_match_reference(mm, T, K, N, H, V):
    case = make_case(N=N, H=H, V=V, T=T, K=K, bias=True, vocab_maps=True, seed=13)
    params = FusionParams(missing_mass=mm, temperature=1.0 if mm == "tail_bucket" else 1.3, softcap=20.0)
    check_against_reference(case, params)


# ----------------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: the interpreter runs Python, so errors that only the compiler sees
# (scf.if type mismatches, dot shape / dtype rules, constexpr misuse) would otherwise reach users first.

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("dtype", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_kernels_compile_for_sm90(dtype):
    """Every kernel config the backend launches compiles for sm_90a; the GEMM kernels lower to wgmma
    (bench/kernel_report.py, the source of docs/kernels.md's register table; no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "kernel_report.py"), "--dtype", dtype],
                       capture_output=True, text=True, env=env, timeout=600)
    print(r.stdout[-4000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" ok regs=") == 19


# ----------------------------------------------------------------------------------------------------------
# CUDA (real Triton, no interpreter): PROFUSER_TEST_REAL_TRITON=1 pytest -m gpu tests/kernels/test_loss_triton.py


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton_common.INTERPRET,
                    reason="needs CUDA and PROFUSER_TEST_REAL_TRITON=1 (no interpreter)")
class TestCuda:
    def _case(self, dtype, N=16384, H=1024, V=32003, T=3, K=8):
        case = make_case(N=N, H=H, V=V, T=T, K=K, dtype=dtype, vocab_maps=True, seed=17)
        return {k: (v.cuda() if torch.is_tensor(v) else
                    [m if m is None else m.cuda() for m in v] if isinstance(v, list) else v)
                for k, v in case.items()}

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_matches_chunked(self, dtype):
        from profuser.kernels.chunked import chunked_fusion_loss

        case = self._case(dtype)
        params = FusionParams(temperature=1.5, softcap=30.0)
        loss, grads, _ = run_triton(case, params)
        h = case["hidden"].float().requires_grad_()
        w = case["weight"].float().requires_grad_()
        target = build_sparse_target(case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                                     case["teacher_weights"], case["vocab_maps"], params)
        ref = chunked_fusion_loss(h, w, None, case["labels"], target, params)
        ref.backward()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(loss, ref.detach(), rtol=tol, atol=tol)
        for k, r in (("hidden", h.grad), ("weight", w.grad)):
            scale = r.abs().max().item()
            err = (grads[k].float() - r).abs().max().item()
            assert err <= tol * scale + 1e-6, (k, err, scale)

    def test_never_allocates_logits(self):
        case = self._case(torch.bfloat16)
        N, V = case["hidden"].shape[0], case["weight"].shape[0]
        run_triton(case, FusionParams(temperature=2.0))  # compile outside the measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_triton(case, FusionParams(temperature=2.0))
        extra = torch.cuda.max_memory_allocated() - base
        logits = N * V * 4
        assert extra < 0.25 * logits, f"peak {extra / 2**20:.0f} MiB vs [N, V] fp32 {logits / 2**20:.0f} MiB"

    def test_deterministic_and_filtered(self):
        case = self._case(torch.bfloat16, N=4096, H=512, V=50257)
        params = FusionParams()
        det = TritonConfig(deterministic=True)
        a = run_triton(case, params, cfg=det)
        b = run_triton(case, params, cfg=det)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["weight"], b[1]["weight"])
        fast = run_triton(case, params)  # atomics: equal up to the order of the fp32 adds
        scale = a[1]["weight"].float().abs().max()
        assert (fast[1]["weight"].float() - a[1]["weight"].float()).abs().max() <= 1e-3 * scale
        f = run_triton(case, params, cfg=TritonConfig(filter_eps=2.0 ** -16))
        assert (f[1]["weight"].float() - a[1]["weight"].float()).abs().max() <= 1e-2 * scale
