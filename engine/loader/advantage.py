"""Advantage weights: how much each source teaches each example (or each token).

ProFuser's training-mode advantage is FuseLLM's MinCE: among the candidate sources, the one with the
lowest cross-entropy on the gold response teaches the whole example. Sources use different tokenizers,
so the per-token CE of two sources is not comparable (a tokenizer with longer tokens has a larger NLL
per token for the same text); the default metric is therefore the NLL per *byte* of the response
(sum of token NLLs over the R predicted tokens / (len(response in UTF-8) + 1 for the end-of-turn)).
`ce_metric="per_token"` keeps FuseLLM's per-token mean for faithfulness.

Weights of T sources on N examples (candidates c, metric m_t = CE of source t):
    minCE:  w_t = 1 if t = argmin_{t in c} m_t else 0          one-hot; ties go to the student source
                                                               (FuseLLM's "ref model" wins ties), then
                                                               to the first source in config order
    avgCE:  w_t = softmax_{t in c}(-m_t)                       0 outside c
FuseLLM's code takes the softmax over r_t = exp(-CE_t) itself, i.e. w_t ∝ exp(exp(-CE_t)); since r_t is in
(0, 1] its weights never differ by more than a factor e and are near-uniform in practice. We take the
softmax over -CE_t (w_t ∝ exp(-CE_t) = the geometric-mean probability the source gives the text), so a
source that is one nat per byte (or token) better gets e times the weight: the weights follow the CE gap.

Token level (`advantage_level="token"`): at every labelled student position, the metric of source t is
the NLL -log p_t of the teacher token aligned to it (+inf where source t has no aligned token); minCE
picks the lowest aligned NLL, avgCE takes the softmax over the aligned ones. A position that no candidate
covers gets all-zero weights (no KD term there; its CE term still counts).

A metric of +inf or NaN (no record, dropped record) never wins and gets weight 0; an example where no
candidate has a finite metric gets all-zero weights.
"""

from __future__ import annotations

import numpy as np

from ..config import ADVANTAGES, CE_METRICS


def tie_priority(is_student: np.ndarray) -> np.ndarray:
    """The MinCE tie order [T]: the student's own source first (FuseLLM's ref model wins ties), then the
    config order. The loader and `profuser score`'s summary both use it."""
    return np.argsort(~np.asarray(is_student, dtype=bool), kind="stable")


def example_metric(nll_sum: np.ndarray, n_tokens: np.ndarray, n_bytes: np.ndarray,
                   ce_metric: str) -> np.ndarray:
    """CE of each source on each example.

    nll_sum [T, N] float64, n_tokens [T, N] int, n_bytes [T, N] int -> [T, N] float64 (nats per byte or per
    token); +inf where the count is 0 (no record).
    """
    if ce_metric not in CE_METRICS:
        raise ValueError(f"ce_metric must be one of {CE_METRICS}, got {ce_metric!r}")
    denom = np.asarray(n_bytes if ce_metric == "per_byte" else n_tokens, dtype=np.float64)
    nll = np.asarray(nll_sum, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = nll / denom
    return np.where(denom > 0, m, np.inf)


def advantage_weights(metric: np.ndarray, candidates: np.ndarray, advantage: str,
                      priority: np.ndarray | None = None) -> np.ndarray:
    """Weights from a per-source metric (lower is better), along axis 0.

    metric [T, ...] float (NaN / +inf = unavailable), candidates [T] bool (sources allowed to teach),
    priority [T] int: a permutation of range(T), the tie-break order (first wins); default 0..T-1.
    Returns [T, ...] float32: one-hot of the best candidate (minCE) or softmax(-metric) over the available
    candidates (avgCE); all zero where no candidate is available.
    """
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {advantage!r}")
    m = np.asarray(metric, dtype=np.float64)
    T = m.shape[0]
    cand = np.asarray(candidates, dtype=bool).reshape((T,) + (1,) * (m.ndim - 1))
    avail = cand & np.isfinite(m)
    m = np.where(avail, m, np.inf)
    any_avail = avail.any(0)
    if advantage == "minCE":
        order = np.arange(T) if priority is None else np.asarray(priority)
        best = order[np.argmin(m[order], axis=0)]               # argmin keeps the first of ties in `order`
        w = (np.arange(T).reshape((T,) + (1,) * (m.ndim - 1)) == best[None]) & any_avail[None]
        return w.astype(np.float32)
    lo = np.where(any_avail, m.min(0), 0.0)
    e = np.where(avail, np.exp(-(m - lo[None])), 0.0)            # shift by the min: no overflow
    s = e.sum(0)
    return np.where(any_avail[None], e / np.where(s > 0, s, 1.0)[None], 0.0).astype(np.float32)


def position_weights(aligned: np.ndarray, ex_of: np.ndarray, candidates: np.ndarray, advantage: str,
                     priority: np.ndarray | None = None, *, metric: np.ndarray | None = None,
                     token_nll: np.ndarray | None = None, winners: np.ndarray | None = None) -> np.ndarray:
    """Weight of each source at each student predicted token, 0 where the source has no aligned token.

    aligned [T, S] bool; ex_of [S] int: example of each token; candidates [T] bool; exactly one of
    metric [T, N] (example level: CE per example), token_nll [T, S] (token level: aligned teacher NLL) or
    winners [N] int (inference mode: the vote winner teaches, weight 1 if it is a candidate).
    Returns [T, S] float32.
    """
    T = aligned.shape[0]
    if winners is not None:
        w = ((np.arange(T)[:, None] == np.asarray(winners)[None]) & np.asarray(candidates)[:, None])
        return (w.astype(np.float32)[:, ex_of] * aligned).astype(np.float32)
    if token_nll is not None:
        return advantage_weights(np.where(aligned, token_nll, np.inf), candidates, advantage, priority)
    w = advantage_weights(metric, candidates, advantage, priority)
    return (w[:, ex_of] * aligned).astype(np.float32)
