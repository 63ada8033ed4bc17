"""Build the sparse fused-teacher target of the fusion loss (shared by the chunked and triton backends).

For row i (label != ignore_index) and teacher t with top-k slots k:
    kept[t,i,k]  = teacher_ids[t,i,k] != -1 and (vocab_maps[t] is None or vocab_maps[t][id] != -1)
    student id   = vocab_maps[t][id] (or id itself when vocab_maps[t] is None)
    renormalize: p_t = softmax over the kept slots of logprob / temperature
    tail_bucket: p_t = exp(logprob) on the kept slots (temperature is 1)
    w'_t = w_t if teacher t has a kept slot at i else 0;  has_kd_i = sum_t w'_t > 0
    mass[i, t*K + k] = w'_t / sum_t w'_t * p_t[k]   (0 on slots that are not kept)
The fused distribution M over student ids is the scatter-add of `mass` on `ids`: an id that appears
several times (within one teacher through a many-to-one map, or across teachers) adds up. Backends never
need M densely: sum_s mass_s * f(ids_s) = sum_u M_u f(u) for any f, and sums over the distinct support
use `first` (the first slot of each id in the row).

    neg_entropy_i = sum_u M_u log M_u  (+ r_i log r_i with tail_bucket; 0 log 0 = 0)
    tail_i        = r_i = clamp(1 - sum_u M_u, 0, 1) with tail_bucket, else 0; and 0 where the support
                    covers the whole student vocabulary (vocab_size distinct ids): the tail has nowhere
                    to go, so the row has no tail term at all (defined so, identically in every backend)

Duplicates are found by a stable sort of each row's ids (O(N*S log S), no [N, S, S] tensor): in sorted
order a group starts where the id changes, and stable sorting makes the group's first element the id's
first slot in the original order.

Everything here is data (no gradient). Computed in float32 (float64 on request, see build_sparse_target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .params import FusionParams


@dataclass
class SparseTarget:
    """Sparse fused-teacher target for N rows, S = T*K slots per row (see module doc).

    ids         [N, S] int64   student ids, -1 = no entry (empty slot, unmapped id, ignored row, no KD,
                               teacher weight 0 at that row)
    mass        [N, S] float   mixture mass of each slot, 0 where ids == -1
    first       [N, S] bool    slot holds the first occurrence of its id in the row (False where -1)
    neg_entropy [N] float      sum_u M_u log M_u (+ r log r with tail_bucket)
    tail        [N] float      r, the tail-bucket mass (0 with renormalize)
    has_kd      [N] bool       row has a KD term (valid, some kept entry, weight sum > 0)
    valid       [N] bool       label != ignore_index
    label       [N] int64      label where valid, -1 elsewhere
    kept, total []  float      kept slots after mapping / non-empty slots, over valid rows
    """

    ids: torch.Tensor
    mass: torch.Tensor
    first: torch.Tensor
    neg_entropy: torch.Tensor
    tail: torch.Tensor
    has_kd: torch.Tensor
    valid: torch.Tensor
    label: torch.Tensor
    kept: torch.Tensor
    total: torch.Tensor

    def rows(self, start: int, stop: int) -> "SparseTarget":
        """The target restricted to rows [start, stop) (views; kept/total unchanged)."""
        sl = slice(start, stop)
        return SparseTarget(self.ids[sl], self.mass[sl], self.first[sl], self.neg_entropy[sl],
                            self.tail[sl], self.has_kd[sl], self.valid[sl], self.label[sl],
                            self.kept, self.total)


def _map_ids(ids: torch.Tensor, vocab_map: torch.Tensor | None) -> torch.Tensor:
    """[N, K] teacher ids (-1 empty) -> student ids (-1 empty or unmapped)."""
    if vocab_map is None:
        return ids
    vm = vocab_map.to(device=ids.device, dtype=torch.int64)
    mapped = vm[ids.clamp_min(0)]
    return torch.where(ids >= 0, mapped, torch.full_like(mapped, -1))


@torch.no_grad()
def build_sparse_target(
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_weights: torch.Tensor | None,
    vocab_maps: Sequence[torch.Tensor | None] | None,
    params: FusionParams,
    *,
    dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
) -> SparseTarget:
    """Fuse the T teachers' top-k entries into one sparse target per row.

    labels [N] int64; teacher_ids [T, N, K] int32/int64 (-1 empty); teacher_logprobs [T, N, K] float;
    teacher_weights [T, N] float >= 0 or None (= 1); vocab_maps None or T entries of None / int [V_t].
    Inputs are assumed validated (fusion_loss does it). Returns a SparseTarget with S = T*K.
    dtype: float dtype of mass / neg_entropy / tail; None = float64 if teacher_logprobs is float64 else
    float32 (fusion_loss passes float64 for float64 hidden states).
    vocab_size: the student's V, for the full-support rule of tail_bucket (None: never full).
    """
    T, N, K = teacher_ids.shape
    dev = teacher_ids.device
    cdt = dtype or (torch.float64 if teacher_logprobs.dtype == torch.float64 else torch.float32)
    valid = labels != params.ignore_index

    raw = teacher_ids.to(torch.int64)
    nonempty = (raw >= 0) & valid.view(1, N, 1)
    if vocab_maps is None:
        ids = raw
    else:
        ids = torch.stack([_map_ids(raw[t], vocab_maps[t]) for t in range(T)])
    kept = (ids >= 0) & valid.view(1, N, 1)                      # [T, N, K]
    ids = torch.where(kept, ids, torch.full_like(ids, -1))

    lp = teacher_logprobs.to(cdt)
    if params.tail_bucket:
        p = torch.where(kept, lp.exp(), torch.zeros((), dtype=cdt, device=dev))
    else:
        x = torch.where(kept, lp / params.temperature, torch.full((), -torch.inf, dtype=cdt, device=dev))
        xmax = x.amax(-1, keepdim=True)
        xmax = torch.where(torch.isfinite(xmax), xmax, torch.zeros_like(xmax))
        e = (x - xmax).exp()                                      # exp(-inf) = 0 on dropped slots
        p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(cdt).tiny)

    if teacher_weights is None:
        w = torch.ones((T, N), dtype=cdt, device=dev)
    else:
        w = teacher_weights.to(device=dev, dtype=cdt)
    w = w * kept.any(-1)
    wsum = w.sum(0)                                               # [N]
    has_kd = valid & (wsum > 0)
    wn = torch.where(has_kd, w / wsum.clamp_min(torch.finfo(cdt).tiny), torch.zeros_like(w))

    # A teacher with weight 0 at a row contributes no mass and no support ids there.
    ids = ids.masked_fill(~(wn > 0).unsqueeze(-1), -1)
    mass = (wn.unsqueeze(-1) * p).permute(1, 0, 2).reshape(N, T * K)
    ids = ids.permute(1, 0, 2).reshape(N, T * K)
    mass = mass.masked_fill(ids < 0, 0.0)

    # Distinct support: stable sort, group starts where the id changes (see module doc).
    sid, perm = torch.sort(ids, dim=1, stable=True)
    smass = mass.gather(1, perm)
    start = torch.ones_like(sid, dtype=torch.bool)
    start[:, 1:] = sid[:, 1:] != sid[:, :-1]
    group = start.to(torch.int64).cumsum(1) - 1                  # group index of each sorted slot
    gmass = torch.zeros_like(smass).scatter_add_(1, group, smass)  # total mass of the group
    first_sorted = start & (sid >= 0)
    first = torch.zeros_like(first_sorted).scatter_(1, perm, first_sorted)
    m_group = torch.where(first_sorted, gmass.gather(1, group), torch.zeros_like(smass))
    neg_entropy = torch.xlogy(m_group, m_group).sum(1)

    if params.tail_bucket:
        open_tail = has_kd if vocab_size is None else has_kd & (first.sum(1) < vocab_size)
        tail = torch.where(open_tail, (1.0 - mass.sum(1)).clamp(0.0, 1.0), torch.zeros_like(wsum))
        neg_entropy = neg_entropy + torch.xlogy(tail, tail)
    else:
        tail = torch.zeros_like(wsum)

    label = torch.where(valid, labels.to(torch.int64), torch.full_like(labels, -1, dtype=torch.int64))
    return SparseTarget(
        ids=ids, mass=mass, first=first, neg_entropy=neg_entropy, tail=tail, has_kd=has_kd, valid=valid,
        label=label, kept=kept.sum().to(torch.float32), total=nonempty.sum().to(torch.float32),
    )
