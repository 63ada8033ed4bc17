"""Every fusion-loss backend against the dense float64 reference (loss, d_hidden, d_weight, d_bias).

Tolerance (the flash-attention / CCE habit): gt = reference on float64 copies of the inputs; torch =
the reference run in the test dtype (what a user gets from plain torch); a backend passes when
err_backend <= 2 * err_torch + atol for the loss and every gradient. Backends: "chunked" (one row chunk),
"chunked_rows" (many row chunks), "chunked_vblock" (vocabulary split into blocks: the two-pass path),
"chunked_lowp" (dz rounded to bf16/fp16 inputs' dtype for the gradient GEMMs, forced on the CPU),
"chunked_fused" (the CUDA GEMM path: logits in the input dtype, the Triton row kernels of triton_rows.py
under the interpreter, several row chunks) and "triton" (its own file tests it in depth).
"""

import math

import pytest
import torch

from profuser.kernels import fusion_loss
from profuser.kernels.chunked import ChunkConfig, chunked_fusion_loss
from profuser.kernels.fusion_loss import make_params
from profuser.kernels.targets import build_sparse_target

BACKENDS = ["chunked", "chunked_rows", "chunked_vblock", "chunked_lowp", "chunked_fused", "triton"]


def make_case(N=97, H=32, V=1271, T=3, K=8, dtype=torch.float32, seed=0, ignore_frac=0.2, scale=1.0,
              with_bias=True, maps=False):
    """Random inputs: hidden [N, H], weight [V, H], bias [V], labels [N], ids / logprobs [T, N, K],
    weights [T, N], optional vocab maps (teacher vocab 2V with -1 and many-to-one entries)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g) * scale
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    bias = torch.randn(V, generator=g) * 0.1 if with_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    tv = 2 * V if maps else V
    ids = torch.randint(0, tv, (T, N, K), generator=g)
    ids[torch.rand(T, N, K, generator=g) < 0.15] = -1                    # empty slots
    ids[:, :, -1] = ids[:, :, 0]                                          # duplicates within a teacher
    if T > 1:
        ids[1, :, 0] = ids[0, :, 0]                                       # same id from several teachers
    lp = torch.log_softmax(torch.randn(T, N, K, generator=g) * 2, -1) - torch.rand(T, N, 1, generator=g)
    lp = lp.sort(-1, descending=True).values
    w = torch.rand(T, N, generator=g)
    w[0, ::4] = 0.0                                                       # zero weights
    w[:, ::11] = 0.0                                                      # rows without KD
    vmaps = None
    if maps:
        vmaps = []
        for t in range(T):
            m = torch.randint(0, V, (tv,), generator=g)                   # many-to-one
            m[torch.rand(tv, generator=g) < 0.2] = -1                     # no counterpart
            vmaps.append(m if t != T - 1 else None)
        ids[T - 1] = ids[T - 1] % V
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(bias), labels=labels,
                teacher_ids=ids.to(torch.int32), teacher_logprobs=lp.to(torch.float16), teacher_weights=w,
                vocab_maps=vmaps)


def run(backend, case, grad_out=None, **opts):
    """Loss and grads (d_hidden, d_weight, d_bias) of one backend; inputs are cloned leaves."""
    h = case["hidden"].detach().clone().requires_grad_()
    w = case["weight"].detach().clone().requires_grad_()
    b = None if case["bias"] is None else case["bias"].detach().clone().requires_grad_()
    args = (h, w, case["labels"], case["teacher_ids"], case["teacher_logprobs"], case["teacher_weights"])
    if backend.startswith("chunked_"):
        params = make_params(**{k: v for k, v in opts.items() if k not in ("return_stats", "row_weights")})
        tdt = torch.float64 if h.dtype == torch.float64 else torch.float32
        target = build_sparse_target(case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                                     case["teacher_weights"], case["vocab_maps"], params, dtype=tdt,
                                     vocab_size=w.shape[0])
        V = w.shape[0]
        budget = {"chunked_rows": 8 * V * 4 * 3, "chunked_vblock": 64 * 4 * 3 * max(1, V // 7),
                  "chunked_fused": 16 * V * 4}.get(backend)
        cfg = ChunkConfig(budget_bytes=budget, lowp_grad=backend == "chunked_lowp", fused=backend == "chunked_fused")
        out = chunked_fusion_loss(h, w, b, case["labels"], target, params, opts.get("return_stats", False), cfg,
                                  opts.get("row_weights"))
    else:
        out = fusion_loss(*args, vocab_maps=case["vocab_maps"], bias=b, backend=backend, **opts)
    loss = out[0] if isinstance(out, tuple) else out
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    (loss * go).sum().backward()
    grads = (h.grad, w.grad, None if b is None else b.grad)
    return loss.detach(), grads, (out[1] if isinstance(out, tuple) else None)


def to64(case):
    return {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() and
                k in ("hidden", "weight", "bias") else v) for k, v in case.items()}


def assert_close_to_gt(backend, case, atol, grad_out=None, **opts):
    gt_loss, gt_grads, _ = run("reference", to64(case), grad_out, **opts)
    pt_loss, pt_grads, _ = run("reference", case, grad_out, **opts)
    be_loss, be_grads, _ = run(backend, case, grad_out, **opts)
    names = ["loss", "d_hidden", "d_weight", "d_bias"]
    for name, gt, pt, be in zip(names, (gt_loss,) + gt_grads, (pt_loss,) + pt_grads, (be_loss,) + be_grads):
        if gt is None:
            assert be is None, name
            continue
        assert be is not None and be.shape == gt.shape, name
        assert torch.isfinite(be).all(), f"{name}: non-finite"
        e_be = (be.double() - gt).abs().max().item()
        e_pt = (pt.double() - gt).abs().max().item()
        tol = 2 * e_pt + atol * max(1.0, gt.abs().max().item())
        print(f"{backend} {name}: err_backend={e_be:.3e} err_torch={e_pt:.3e} tol={tol:.3e}")
        assert e_be <= tol, f"{backend} {name}: {e_be:.3e} > {tol:.3e} (torch {e_pt:.3e})"


OPTS = {
    "renorm": dict(),
    "temp": dict(temperature=2.0, lam=0.5),
    "tail": dict(missing_mass="tail_bucket", lam=0.3),
    "softcap": dict(softcap=5.0, temperature=0.7),
    "tail_softcap": dict(missing_mass="tail_bucket", softcap=3.0, lam=0.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(backend, opt, dtype):
    case = make_case(dtype=dtype, maps=(opt == "temp"), seed=list(OPTS).index(opt))
    assert_close_to_gt(backend, case, atol=1e-6 if dtype == torch.float32 else 1e-3, **OPTS[opt])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_grad_output(backend, reduction):
    case = make_case(N=41, V=517, seed=3)
    go = torch.rand(41) * 3 if reduction == "none" else torch.tensor(2.5)
    assert_close_to_gt(backend, case, atol=1e-6, grad_out=go, reduction=reduction, temperature=1.5)


@pytest.mark.parametrize("N,V,K,T", [(1, 1271, 1, 1), (97, 1271, 16, 3), (1, 50257, 16, 1),
                                     pytest.param(97, 50257, 8, 3, marks=pytest.mark.slow)])
def test_awkward_shapes_float64(N, V, K, T):
    case = make_case(N=N, V=V, K=K, T=T, H=24, dtype=torch.float64, seed=N + K, maps=(T == 3))
    gt_loss, gt_grads, _ = run("reference", case, missing_mass="tail_bucket")
    for backend in ("chunked", "chunked_vblock"):
        loss, grads, _ = run(backend, case, missing_mass="tail_bucket")
        torch.testing.assert_close(loss, gt_loss, rtol=1e-10, atol=1e-12)
        for g, r in zip(grads, gt_grads):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored(backend, reduction):
    case = make_case(N=13, V=300, ignore_frac=1.0)
    loss, grads, stats = run(backend, case, reduction=reduction, return_stats=True)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()
    for k in ("ce", "kd", "accuracy", "kept_fraction", "student_mass_on_support"):
        assert float(getattr(stats, k)) == 0.0, k


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_num_items(backend):
    case = make_case(N=29, V=300)
    n_valid = int((case["labels"] != -100).sum())
    s_loss, s_grads, _ = run(backend, case, reduction="sum")
    m_loss, m_grads, _ = run(backend, case, reduction="mean")
    n_loss, n_grads, _ = run(backend, case, reduction="mean", num_items=50)
    z_loss, z_grads, _ = run(backend, case, reduction="mean", num_items=0)
    torch.testing.assert_close(m_loss, s_loss / n_valid)
    torch.testing.assert_close(n_loss, s_loss / 50)
    for sg, ng, mg in zip(s_grads, n_grads, m_grads):
        torch.testing.assert_close(ng, sg / 50)
        torch.testing.assert_close(mg, sg / n_valid)
    assert float(z_loss) == 0.0 and all((g == 0).all() for g in z_grads)


@pytest.mark.parametrize("backend", ["chunked", "chunked_vblock", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_finite(backend, dtype):
    # |z| ~ 1e4: the student is certain; q underflows to exact 0/1 and 1 - s_sup underflows (clamped).
    case = make_case(N=17, V=300, H=16, dtype=dtype, scale=1.0)
    case["weight"] = (case["weight"].float() * 1e3).to(dtype)
    case["hidden"] = (case["hidden"].float() * 1e1).to(dtype)
    for opt in ("renorm", "tail", "softcap"):
        loss, grads, stats = run(backend, case, return_stats=True, **OPTS[opt])
        assert torch.isfinite(loss).all(), opt
        for g in grads:
            assert torch.isfinite(g.float()).all(), opt
        assert all(math.isfinite(float(v)) for v in stats.as_dict().values())
        gt_loss, _, _ = run("reference", to64(case), **OPTS[opt])
        assert abs(float(loss) - float(gt_loss)) <= 2e-2 * abs(float(gt_loss)) + 1e-2, opt


@pytest.mark.parametrize("backend", ["chunked", "chunked_vblock", "triton"])
def test_stats_independent(backend):
    """Stats recomputed here from dense torch, without the library."""
    case = make_case(N=61, V=400, maps=True, seed=7)
    case["labels"][:5] = -100
    _, _, st = run(backend, case, return_stats=True)
    h, w, b, y = case["hidden"].double(), case["weight"].double(), case["bias"].double(), case["labels"]
    z = h @ w.t() + b
    valid = y != -100
    ce = torch.logsumexp(z, 1) - z.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
    acc = (z.argmax(1) == y).double()
    q = torch.softmax(z, 1)
    ids, vm = case["teacher_ids"].long(), case["vocab_maps"]
    T = ids.shape[0]
    mapped = torch.stack([ids[t] if vm[t] is None else
                          torch.where(ids[t] >= 0, vm[t][ids[t].clamp_min(0)], -1) for t in range(T)])
    nonempty = (ids >= 0) & valid.view(1, -1, 1)
    kept = (mapped >= 0) & valid.view(1, -1, 1)
    wt = case["teacher_weights"].double() * kept.any(-1)
    has_kd = valid & (wt.sum(0) > 0)
    mass_sup = torch.zeros(len(y), dtype=torch.float64)
    for i in torch.nonzero(has_kd).flatten().tolist():
        sup = {int(mapped[t, i, k]) for t in range(T) for k in range(ids.shape[2])
               if kept[t, i, k] and wt[t, i] > 0}
        mass_sup[i] = q[i, sorted(sup)].sum()
    assert abs(float(st.ce) - float(ce[valid].mean())) < 1e-4
    assert abs(float(st.accuracy) - float(acc[valid].mean())) < 1e-6
    assert abs(float(st.kept_fraction) - float(kept.sum() / nonempty.sum())) < 1e-6
    assert abs(float(st.student_mass_on_support) - float(mass_sup[has_kd].mean())) < 1e-5
    torch.testing.assert_close(st.row_mass.double(), mass_sup, rtol=1e-5, atol=1e-6)  # per row, 0 without KD
    ref_loss, _, ref_st = run("reference", to64(case), return_stats=True)
    assert abs(float(st.kd) - float(ref_st.kd)) < 1e-4


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_vblock", "triton"])
def test_row_weights_equal_separate_calls(backend):
    """One call with row_weights = w_m / N_m on the rows of group m equals sum_m w_m * mean over group m
    (the engine's one-call step for both modes): loss and every gradient."""
    case = make_case(N=53, V=611, maps=True, seed=4)
    group = torch.arange(53) % 3 == 0
    wts, n = {True: 0.7, False: 1.9}, {True: 40.0, False: 77.0}
    rw = torch.where(group, wts[True] / n[True], wts[False] / n[False])
    loss, grads, st = run(backend, dict(case), reduction="sum", row_weights=rw, return_stats=True)
    total, want = 0.0, [torch.zeros_like(g) if g is not None else None for g in grads]
    for g_val in (True, False):
        part = dict(case)
        sel = torch.nonzero(group == g_val).squeeze(1)
        part["labels"] = torch.where(group == g_val, case["labels"], torch.full_like(case["labels"], -100))
        l_m, g_m, _ = run(backend, part, num_items=n[g_val])
        total = total + wts[g_val] * l_m
        want = [None if a is None else a + wts[g_val] * b for a, b in zip(want, g_m)]
        assert sel.numel() > 0
    torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # per-row terms in the stats: group sums on the device, no per-group call needed
    assert st.row_ce.shape == (53,) and st.row_kd.shape == (53,)
    ce_g = st.row_ce[group & (case["labels"] != -100)].sum() / (group & (case["labels"] != -100)).sum()
    _, _, st_g = run(backend, dict(case, labels=torch.where(group, case["labels"], -100)), return_stats=True)
    torch.testing.assert_close(ce_g, st_g.ce, rtol=1e-5, atol=1e-6)


def test_row_weights_need_reduction_sum():
    case = make_case(N=5, V=50)
    with pytest.raises(ValueError, match="row_weights' needs reduction='sum'"):
        fusion_loss(case["hidden"], case["weight"], case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                    row_weights=torch.ones(5))
    with pytest.raises(ValueError, match=r"row_weights' must be \[N=5\]"):
        fusion_loss(case["hidden"], case["weight"], case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                    row_weights=torch.ones(4), reduction="sum")


def test_gradient_in_forward_saves_no_weight():
    """mean/sum: backward only scales precomputed grads (the ZeRO-3 property: weight unused in backward)."""
    case = make_case(N=20, V=200)
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    loss = fusion_loss(h, w, case["labels"], case["teacher_ids"], case["teacher_logprobs"], backend="chunked")
    with torch.no_grad():
        w.mul_(0.0)  # changing the weight after forward must not change the gradients
    (3 * loss).backward()
    w2 = case["weight"].clone().requires_grad_()
    h2 = case["hidden"].clone().requires_grad_()
    (3 * fusion_loss(h2, w2, case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                     backend="chunked")).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_no_grad_forward_matches():
    case = make_case(N=33, V=350)
    with torch.no_grad():
        a = fusion_loss(case["hidden"], case["weight"], case["labels"], case["teacher_ids"],
                        case["teacher_logprobs"], case["teacher_weights"], bias=case["bias"],
                        backend="chunked")
    b, _, _ = run("chunked", case)
    torch.testing.assert_close(a, b)


def test_no_grad_skips_gradient_work(monkeypatch):
    """Under torch.no_grad() (evaluation) the forward must not compute gradients even though the inputs
    require grad (ctx.needs_input_grad stays True under no_grad)."""
    import profuser.kernels.chunked as ch

    seen = []
    real_run = ch._run
    monkeypatch.setattr(ch, "_run", lambda *a, **k: seen.append(a[5]) or real_run(*a, **k))
    case = make_case(N=12, V=90)
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    with torch.no_grad():
        fusion_loss(h, w, case["labels"], case["teacher_ids"], case["teacher_logprobs"], backend="chunked")
    assert seen == [None]                      # g is None: stats/loss only
    fusion_loss(h, w, case["labels"], case["teacher_ids"], case["teacher_logprobs"], backend="chunked")
    assert seen[1] is not None                 # with grad mode on, gradients come from the forward


def test_second_backward_recomputes():
    """The first backward hands over the forward-computed grads; a retained-graph second one recomputes."""
    case = make_case(N=10, V=100)
    h = case["hidden"].clone().requires_grad_()
    loss = fusion_loss(h, case["weight"], case["labels"], case["teacher_ids"], case["teacher_logprobs"],
                       backend="chunked", temperature=1.4)
    (g1,) = torch.autograd.grad(2 * loss, h, retain_graph=True)
    (g2,) = torch.autograd.grad(3 * loss, h)
    torch.testing.assert_close(g2, 1.5 * g1)


def test_auto_is_chunked_on_cpu():
    case = make_case(N=20, V=150)
    a, ga, _ = run("auto", case, temperature=1.3)
    b, gb, _ = run("chunked", case, temperature=1.3)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("backend", ["chunked", "chunked_vblock", "triton"])
def test_float16_matches_reference(backend):
    case = make_case(N=50, V=700, dtype=torch.float16, seed=11)
    assert_close_to_gt(backend, case, atol=1e-3, temperature=1.2)


@pytest.mark.parametrize("N,V,n_buf", [(4096, 49152, 1), (4096, 262144, 3), (100, 5_000_000, 2), (1, 10**8, 1)])
def test_chunk_plan_respects_budget(N, V, n_buf):
    from profuser.kernels.chunked import MIN_ROWS, _plan

    budget = ChunkConfig().budget(torch.empty(V, 8, device="meta"))  # the CPU default: 256 MiB
    rows, vblock = _plan(N, V, n_buf, 4, budget)
    assert 1 <= rows <= N and 1 <= vblock <= V
    assert rows * vblock * 4 * n_buf <= budget == 256 * 2**20
    if vblock < V:  # the vocabulary is split only when MIN_ROWS full rows would not fit
        assert min(N, MIN_ROWS) * V * 4 * n_buf > budget
