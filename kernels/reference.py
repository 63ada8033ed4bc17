"""Reference fusion loss: plain torch, materializes logits [N, V] and the dense teacher mixture [N, V].

It is the ground truth of the test suite, so on purpose it shares no code with targets.py / rowmath.py:
the mixture is built densely with scatter_add (duplicate ids add up by construction), renormalization
uses logsumexp over the kept entries, and autograd differentiates it (no hand-written gradient).

    z = W h + b (in the input dtype, like a model's lm_head), then upcast: float64 inputs stay float64,
    anything else is computed in float32 (like `logits.float()` in HF models); softcap z = c tanh(z / c)
    CE_i   = logsumexp(z_i) - z_i[y_i]
    P_t    = dense teacher distribution on student ids (renormalized over kept entries, or exp(logprob))
    M_i    = sum_t w_t / sum_{t kept} w_t * P_t  over teachers with a kept entry
    KD_i   = T^2 sum_v M log M - M log_softmax(z / T)
             + tail_bucket: r (log r - log(1 - sum_{v in support} softmax(z)_v)), r = clamp(1 - sum M, 0, 1)
    loss_i = lam CE_i + (1 - lam) KD_i  (KD only where some entry is kept and the weight sum is > 0)
log(1 - q(support)) is the log-sum-exp of the logits outside the support minus lse (no subtraction from
1), clamped below at log(tiny(dtype)); a row whose support is the whole vocabulary has no tail term.
Memory: O(N * V * T); use it on small shapes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .params import FusionParams, FusionStats, softcap


def reference_fusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_weights: torch.Tensor | None,
    vocab_maps: Sequence[torch.Tensor | None] | None,
    params: FusionParams,
    return_stats: bool = False,
    row_weights: torch.Tensor | None = None,
):
    """Dense fusion loss. hidden [N, H], weight [V, H], bias [V] | None, labels [N],
    teacher_ids / teacher_logprobs [T, N, K], teacher_weights [T, N] | None,
    vocab_maps None | T x ([V_t] | None).

    Returns loss ([N] for reduction "none", else 0-dim), or (loss, FusionStats).
    """
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    T_, N, K = teacher_ids.shape
    V = weight.shape[0]
    dev = hidden.device
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.to(cdt)
    z = softcap(z, params.softcap)

    valid = labels != params.ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    logq1 = torch.log_softmax(z, dim=-1)
    ce = -logq1.gather(1, safe_labels.unsqueeze(1)).squeeze(1)

    temp = params.temperature
    # pass 1 (sparse): each teacher's kept entries, probabilities and weight; pass 2 scatters them densely
    per_teacher = []
    wsum = torch.zeros(N, dtype=cdt, device=dev)
    kept_total = torch.zeros((), dtype=cdt, device=dev)
    nonempty_total = torch.zeros((), dtype=cdt, device=dev)
    for t in range(T_):
        ids = teacher_ids[t].long()
        nonempty = ids != -1
        if vocab_maps is not None and vocab_maps[t] is not None:
            vm = vocab_maps[t].to(dev).long()
            sid = torch.where(nonempty, vm[ids.clamp_min(0)], torch.full_like(ids, -1))
        else:
            sid = ids
        kept = (sid != -1) & valid.unsqueeze(1)
        kept_total = kept_total + kept.sum()
        nonempty_total = nonempty_total + (nonempty & valid.unsqueeze(1)).sum()
        lp = teacher_logprobs[t].to(cdt)
        if params.missing_mass == "tail_bucket":
            p = torch.where(kept, lp.exp(), torch.zeros_like(lp))
        else:
            x = torch.where(kept, lp / temp, torch.full_like(lp, float("-inf")))
            norm = torch.logsumexp(x, dim=1, keepdim=True)
            norm = torch.where(kept, norm, torch.zeros_like(norm))   # rows with nothing kept: -inf -> 0
            p = torch.where(kept, (x - norm).exp(), torch.zeros_like(lp))
        w = torch.ones(N, dtype=cdt, device=dev) if teacher_weights is None else teacher_weights[t].to(cdt)
        w = torch.where(kept.any(1), w, torch.zeros_like(w))
        wsum = wsum + w
        per_teacher.append((torch.where(kept, sid, torch.zeros_like(sid)), kept, p, w))
    has_kd = valid & (wsum > 0)
    M = torch.zeros((N, V), dtype=cdt, device=dev)
    in_support = torch.zeros((N, V), dtype=torch.bool, device=dev)
    rows = torch.arange(N, device=dev).unsqueeze(1)
    for col, kept, p, w in per_teacher:
        wn = torch.where(has_kd, w / torch.where(has_kd, wsum, torch.ones_like(wsum)), torch.zeros_like(w))
        M.scatter_add_(1, col, wn.unsqueeze(1) * p)                 # duplicate ids add up
        on = kept & (wn > 0).unsqueeze(1)
        in_support[rows.expand_as(col)[on], col[on]] = True

    logqT = torch.log_softmax(z / temp, dim=-1)
    kd = temp * temp * (torch.xlogy(M, M) - M * logqT).sum(1)
    q1 = logq1.exp()
    s_sup = (q1 * in_support).sum(1)
    if params.missing_mass == "tail_bucket":
        full = in_support.all(1)  # the tail has nowhere to go: no tail term
        r = torch.where(full, torch.zeros_like(wsum), (1.0 - M.sum(1)).clamp(0.0, 1.0))
        outside = torch.logsumexp(z.masked_fill(in_support, float("-inf")), dim=1)
        log1m = (outside - torch.logsumexp(z, dim=1)).clamp_min(math.log(torch.finfo(cdt).tiny))
        kd = kd + torch.xlogy(r, r) - torch.where(r > 0, r * log1m, torch.zeros_like(r))
    zero = torch.zeros((), dtype=cdt, device=dev)
    kd = torch.where(has_kd, kd, zero)
    ce = torch.where(valid, ce, zero)
    loss_rows = torch.where(valid, params.lam * ce + (1.0 - params.lam) * kd, zero)

    if params.reduction == "none":
        loss = loss_rows
    elif row_weights is not None:
        loss = (loss_rows * row_weights.to(cdt)).sum()
    else:
        loss = loss_rows.sum()
        if params.reduction == "mean":
            n = float(params.num_items) if params.num_items is not None else valid.sum().to(cdt)
            n = torch.as_tensor(n, dtype=cdt, device=dev)
            loss = torch.where(n > 0, loss / torch.where(n > 0, n, torch.ones_like(n)), zero)
    if not return_stats:
        return loss

    with torch.no_grad():
        def mean(x, m):
            n = m.sum()
            return (torch.where(m, x, zero).sum() / n if n > 0 else zero).to(torch.float32)

        acc = (z.argmax(1) == labels).to(cdt)
        stats = FusionStats(
            ce=mean(ce.detach(), valid), kd=mean(kd.detach(), has_kd), accuracy=mean(acc, valid),
            kept_fraction=(kept_total / nonempty_total if nonempty_total > 0 else zero).to(torch.float32),
            student_mass_on_support=mean(s_sup.detach(), has_kd),
            row_ce=ce.detach().to(torch.float32), row_kd=kd.detach().to(torch.float32),
            row_mass=torch.where(has_kd, s_sup.detach(), zero).to(torch.float32),
        )
    return loss, stats
