"""The ground truth itself: the reference against hand-computed values, the sparse target builder against
dense sums, and torch.autograd.gradcheck (float64, tiny shapes) for the reference and chunked backends."""

import math

import pytest
import torch

from profuser.kernels import FusionLoss, fusion_loss
from profuser.kernels.fusion_loss import make_params
from profuser.kernels.targets import build_sparse_target


def _tiny():
    """One valid row over V=5, two teachers (ids in student space), hand-checkable numbers."""
    z = torch.tensor([[1.0, -0.5, 2.0, 0.0, 0.3]], dtype=torch.float64)
    hidden = torch.ones(1, 5, dtype=torch.float64)                  # W h = z with W[v, :] = z_v / 5
    weight = torch.diag(z[0]) @ torch.ones(5, 5, dtype=torch.float64) / 5  # z = W h
    ids = torch.tensor([[[2, 0, -1]], [[2, 4, 4]]])                # [T=2, N=1, K=3]; dup across + within
    lp = torch.log(torch.tensor([[[0.5, 0.2, 0.1]], [[0.6, 0.1, 0.1]]], dtype=torch.float64))
    w = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    return z, hidden, weight, torch.tensor([2]), ids, lp, w


def test_tiny_by_hand_renormalize():
    z, h, W, y, ids, lp, w = _tiny()
    assert torch.allclose(h @ W.t(), z)
    lam, T = 0.6, 2.0
    loss = fusion_loss(h, W, y, ids, lp, w, lam=lam, temperature=T, backend="reference")
    # teacher 0 kept {2: .5, 0: .2}; teacher 1 kept {2: .6, 4: .1, 4: .1}; renormalize lp / T
    p0 = torch.tensor([0.5, 0.2], dtype=torch.float64) ** (1 / T)
    p1 = torch.tensor([0.6, 0.1, 0.1], dtype=torch.float64) ** (1 / T)
    p0, p1 = p0 / p0.sum(), p1 / p1.sum()
    M = torch.zeros(5, dtype=torch.float64)
    M[2] += 0.25 * p0[0]; M[0] += 0.25 * p0[1]                                         # noqa: E702
    M[2] += 0.75 * p1[0]; M[4] += 0.75 * (p1[1] + p1[2])                               # noqa: E702
    logq = torch.log_softmax(z[0] / T, 0)
    kd = T * T * sum(float(M[j] * (math.log(M[j]) - logq[j])) for j in range(5) if M[j] > 0)
    ce = float(torch.logsumexp(z[0], 0) - z[0, 2])
    assert abs(float(loss) - (lam * ce + (1 - lam) * kd)) < 1e-12


def test_tiny_by_hand_tail_bucket():
    z, h, W, y, ids, lp, w = _tiny()
    loss = fusion_loss(h, W, y, ids, lp, w, lam=0.0, missing_mass="tail_bucket", backend="reference")
    M = torch.zeros(5, dtype=torch.float64)
    M[2] = 0.25 * 0.5 + 0.75 * 0.6
    M[0] = 0.25 * 0.2
    M[4] = 0.75 * 0.2
    r = 1 - float(M.sum())
    q = torch.softmax(z[0], 0)
    s = float(q[0] + q[2] + q[4])
    kd = sum(float(M[j] * (math.log(M[j]) - math.log(q[j]))) for j in (0, 2, 4))
    kd += r * (math.log(r) - math.log(1 - s))
    assert abs(float(loss) - kd) < 1e-12
    # every backend agrees on the hand case
    for backend in ("chunked", "triton"):  # triton: float32 only
        other = fusion_loss(h.float(), W.float(), y, ids, lp.float(), w.float(), lam=0.0,
                            missing_mass="tail_bucket", backend=backend)
        assert abs(float(other) - kd) < 1e-5, backend


def test_sparse_target_against_dense():
    g = torch.Generator().manual_seed(1)
    T, N, K, V = 3, 40, 6, 23                     # small V: many collisions within and across teachers
    ids = torch.randint(-1, V, (T, N, K), generator=g)
    lp = torch.log_softmax(torch.randn(T, N, K, generator=g), -1).double()
    w = torch.rand(T, N, generator=g).double()
    w[1, ::3] = 0
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    vm = torch.randint(-1, V, (V,), generator=g)
    params = make_params(missing_mass="tail_bucket")
    tg = build_sparse_target(labels, ids, lp, w, [None, vm, None], params)
    mapped = ids.clone()
    mapped[1] = torch.where(ids[1] >= 0, vm[ids[1].clamp_min(0)], -1)
    for i in range(N):
        dense = torch.zeros(V, dtype=torch.float64)
        dense.index_add_(0, tg.ids[i].clamp_min(0), tg.mass[i])
        kept_ids = {int(x) for x in tg.ids[i] if x >= 0}
        assert {int(x) for x in tg.ids[i][tg.first[i]]} == kept_ids                 # first: one per id
        assert int(tg.first[i].sum()) == len(kept_ids)
        if labels[i] == -100:
            assert not tg.has_kd[i] and (tg.ids[i] == -1).all() and tg.label[i] == -1
            continue
        wt = torch.tensor([float(w[t, i]) if (mapped[t, i] >= 0).any() else 0.0 for t in range(T)],
                          dtype=torch.float64)
        assert bool(tg.has_kd[i]) == bool(wt.sum() > 0)
        if wt.sum() == 0:
            continue
        exp = torch.zeros(V, dtype=torch.float64)
        for t in range(T):
            for k in range(K):
                if mapped[t, i, k] >= 0 and wt[t] > 0:
                    exp[mapped[t, i, k]] += wt[t] / wt.sum() * lp[t, i, k].exp()
        torch.testing.assert_close(dense, exp)
        r = max(0.0, 1 - float(exp.sum()))
        ne = float(torch.xlogy(exp, exp).sum()) + (r * math.log(r) if r > 0 else 0.0)
        assert abs(float(tg.neg_entropy[i]) - ne) < 1e-12
        assert abs(float(tg.tail[i]) - r) < 1e-12
    assert float(tg.total) == float(((ids >= 0) & (labels != -100).view(1, N, 1)).sum())
    assert float(tg.kept) == float(((mapped >= 0) & (labels != -100).view(1, N, 1)).sum())


def _gc_inputs(N=5, H=3, V=11, T=2, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=g).requires_grad_()
    b = (0.1 * torch.randn(V, dtype=torch.float64, generator=g)).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = -100
    ids = torch.randint(-1, V, (T, N, K), generator=g)
    ids[1, :, 0] = ids[0, :, 0]
    lp = torch.log_softmax(torch.randn(T, N, K, dtype=torch.float64, generator=g), -1) - 0.5
    w = torch.rand(T, N, dtype=torch.float64, generator=g)
    w[:, 3] = 0
    return h, W, b, y, ids, lp, w


GC = {
    "renorm": dict(),
    "tail": dict(missing_mass="tail_bucket", lam=0.4),
    "softcap": dict(softcap=1.5, lam=0.5),
    "temp": dict(temperature=0.6, lam=0.2),
    "none_temp_cap": dict(temperature=1.7, softcap=2.0, reduction="none"),
}


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("opt", list(GC))
def test_gradcheck(backend, opt):
    h, W, b, y, ids, lp, w = _gc_inputs(seed=list(GC).index(opt))

    def f(h, W, b):
        return fusion_loss(h, W, y, ids, lp, w, bias=b, backend=backend, **GC[opt])

    assert torch.autograd.gradcheck(f, (h, W, b), eps=1e-6, atol=1e-7)


def test_module_matches_functional():
    h, W, b, y, ids, lp, w = _gc_inputs()
    mod = FusionLoss(lam=0.7, temperature=2.0, backend="chunked")
    assert "temperature=2.0" in repr(mod)
    a = mod(h, W, y, ids, lp, w, bias=b)
    c = fusion_loss(h, W, y, ids, lp, w, bias=b, lam=0.7, temperature=2.0, backend="reference")
    torch.testing.assert_close(a, c)
