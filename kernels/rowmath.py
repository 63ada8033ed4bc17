"""Per-row loss and gradient coefficients of the fusion loss, shared by the chunked and triton backends.

A backend reduces each row of logits z_i (after softcap) to a few statistics, and this module turns them
into the loss and into the coefficients of dLoss/dz. Rows are independent, so it works on any chunk.

Inputs per row i (S = T*K slots of the SparseTarget; the support S_i = the row's distinct kept ids):
    lse    = logsumexp_v z_iv          lse_t = logsumexp_v z_iv / T   (== lse when T == 1)
    z_label = z_i[label_i]             z_sup[s] = z_i[ids_is] (anything where ids == -1, it is masked)
    lse_out = logsumexp_{v not in S_i} z_iv   (tail_bucket only; -inf for an empty complement)

Loss (M = fused mixture, Msum = sum_u M_u, q = softmax(z), qT = softmax(z / T), r = target.tail):
    CE_i = lse - z_label
    KD_i = T^2 * (neg_entropy - sum_s mass_s * (z_sup_s / T - lse_t))            [renormalize]
         = neg_entropy - sum_s mass_s * (z_sup_s - lse) - r log(1 - q(S))      [tail_bucket, T == 1]
      where neg_entropy already holds r log r, and log(1 - q(S)) = lse_out - lse: the complement's own
      log-sum-exp, never 1 minus a sum (a confident student has q(S) = 1 - 1e-6, which fp32 cannot
      subtract). Rows whose support is the whole vocabulary have r = 0 (targets.py): no tail term. When
      the complement underflows, log(1 - q(S)) is clamped to log(tiny(dtype)) (a loss of at most ~87 r).
    loss_i = lam * CE_i + (1 - lam) * KD_i on rows with a KD term, lam * CE_i on other valid rows, 0 on
    ignored rows.

Gradient, with g_i the upstream gradient of loss_i (reduction scale times grad_output):
    dLoss/dz_iv = alpha_i q_iv + beta_i qT_iv + [v not in S_i] gamma_i exp(z_iv - lse_out_i)
                  + sum_{s: sp_ids[i,s] == v} sp_coef[i,s]
    CE part: alpha += g lam,                sp(label) -= g lam
    KD part: beta  = g (1-lam) T Msum,      sp(ids_s) -= g (1-lam) T mass_s
    tail:    d[-r log(1 - q(S))]/dz_v = r q_v for v in S, -r q(S) q_v / (1 - q(S)) outside, so with
             gk = g (1-lam): gamma = -gk r q(S) (exp(z_v - lse_out) = q_v / (1 - q(S)) <= 1: no huge
             factor, no cancellation), sp(first distinct ids_s) += gk r q(ids_s)
The softcap chain rule dz/dz_raw = 1 - tanh(z_raw/cap)^2 = 1 - (z/cap)^2 is the backend's job.
sp_ids [N, S+1]: column 0 is the label (-1 on ignored rows), columns 1.. are target.ids.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .params import FusionParams, FusionStats
from .targets import SparseTarget


class RowTerms(NamedTuple):
    """Per-row values [N] in the compute dtype: loss (0 on ignored rows), ce, kd, sup_mass (s_sup)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    sup_mass: torch.Tensor


class GradCoefs(NamedTuple):
    """Coefficients of dLoss/dz (module doc): alpha, beta, gamma, lse_out [N]; sp_ids int64 / sp_coef [N, S+1]
    (-1 / 0 = none). lse_out is finite where gamma != 0 (lse elsewhere, so exp(z - lse_out) <= 1)."""

    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    lse_out: torch.Tensor
    sp_ids: torch.Tensor
    sp_coef: torch.Tensor


def support_ids(target: SparseTarget) -> torch.Tensor:
    """[N, S] int64: each distinct support id once (at its first slot), -1 elsewhere."""
    return torch.where(target.first, target.ids, torch.full_like(target.ids, -1))


def _support_mass(target: SparseTarget, lse: torch.Tensor,
                  z_sup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_sup [N, S] = softmax(z)_ids on first distinct slots else 0, s_sup [N])."""
    q = torch.where(target.first, (z_sup - lse.unsqueeze(1)).exp(), torch.zeros_like(z_sup))
    return q, q.sum(1)


def _log_complement(target: SparseTarget, lse: torch.Tensor, lse_out: torch.Tensor | None) -> torch.Tensor:
    """log(1 - q(S)) [N] = lse_out - lse, clamped to log(tiny); 0 on rows without a tail (unused there)."""
    if lse_out is None:
        raise ValueError("missing_mass='tail_bucket' needs lse_out (the complement's logsumexp) from the backend")
    log1m = torch.clamp(lse_out - lse, min=math.log(torch.finfo(lse.dtype).tiny))
    return torch.where(target.tail > 0, log1m, torch.zeros_like(log1m))


def row_loss(
    target: SparseTarget,
    lse: torch.Tensor,
    lse_t: torch.Tensor,
    z_label: torch.Tensor,
    z_sup: torch.Tensor,
    params: FusionParams,
    lse_out: torch.Tensor | None = None,
) -> RowTerms:
    """Loss terms per row. lse, lse_t, z_label, lse_out [N]; z_sup [N, S]; all in the compute dtype."""
    dt = lse.dtype
    T = params.temperature
    mass = target.mass.to(dt)
    zero = torch.zeros((), dtype=dt, device=lse.device)
    ce = torch.where(target.valid, lse - z_label, zero)
    logq = torch.where(target.ids >= 0, z_sup / T - lse_t.unsqueeze(1), zero)
    kd = (T * T) * (target.neg_entropy.to(dt) - (mass * logq).sum(1))
    _, s_sup = _support_mass(target, lse, z_sup)
    if params.tail_bucket:
        kd = kd - target.tail.to(dt) * _log_complement(target, lse, lse_out)
    kd = torch.where(target.has_kd, kd, zero)
    s_sup = torch.where(target.has_kd, s_sup, zero)
    loss = params.lam * ce + (1.0 - params.lam) * kd
    return RowTerms(loss, ce, kd, s_sup)


def grad_coefs(
    target: SparseTarget,
    lse: torch.Tensor,
    lse_t: torch.Tensor,
    z_label: torch.Tensor,
    z_sup: torch.Tensor,
    params: FusionParams,
    g: torch.Tensor,
    lse_out: torch.Tensor | None = None,
) -> GradCoefs:
    """Coefficients of dLoss/dz (see module doc). g: [N] or 0-dim upstream gradient per row."""
    dt = lse.dtype
    T = params.temperature
    N = lse.shape[0]
    g = torch.broadcast_to(g.to(dt), (N,))
    zero = torch.zeros((), dtype=dt, device=lse.device)
    gv = torch.where(target.valid, g, zero)
    gk = torch.where(target.has_kd, g * (1.0 - params.lam), zero)
    mass = target.mass.to(dt)

    alpha = gv * params.lam
    beta = gk * T * mass.sum(1)
    sp_kd = -(gk * T).unsqueeze(1) * mass
    gamma = torch.zeros_like(alpha)
    out = lse
    if params.tail_bucket:
        r = target.tail.to(dt)
        log1m = _log_complement(target, lse, lse_out)
        q_sup, _ = _support_mass(target, lse, z_sup)
        gamma = torch.where(r > 0, -gk * r * -torch.expm1(log1m), zero)  # -gk r q(S), q(S) = 1 - e^log1m
        sp_kd = sp_kd + (gk * r).unsqueeze(1) * q_sup
        out = torch.where(r > 0, lse + log1m, lse)
    sp_ids = torch.cat([target.label.unsqueeze(1), target.ids], dim=1)
    sp_coef = torch.cat([(-gv * params.lam).unsqueeze(1), sp_kd], dim=1)
    sp_coef = torch.where(sp_ids >= 0, sp_coef, zero)
    return GradCoefs(alpha, beta, gamma, out, sp_ids, sp_coef)


def make_stats(target: SparseTarget, terms: RowTerms, argmax: torch.Tensor) -> FusionStats:
    """FusionStats from the per-row terms of all N rows and argmax [N] (argmax_v z_iv)."""
    def mean_over(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = mask.sum()
        s = torch.where(mask, x.to(torch.float32), torch.zeros((), device=x.device)).sum()
        return torch.where(n > 0, s / n.clamp_min(1), torch.zeros_like(s))

    correct = (argmax.to(torch.int64) == target.label).to(torch.float32)
    kept_frac = torch.where(target.total > 0, target.kept / target.total.clamp_min(1),
                            torch.zeros_like(target.total))
    return FusionStats(
        ce=mean_over(terms.ce, target.valid),
        kd=mean_over(terms.kd, target.has_kd),
        accuracy=mean_over(correct, target.valid),
        kept_fraction=kept_frac,
        student_mass_on_support=mean_over(terms.sup_mass, target.has_kd),
        row_ce=terms.ce.detach().to(torch.float32),
        row_kd=terms.kd.detach().to(torch.float32),
        row_mass=torch.where(target.has_kd, terms.sup_mass.detach().to(torch.float32),
                             torch.zeros((), device=terms.sup_mass.device)),
    )
