"""Chain-rule targets where the student's token spans several teacher tokens (docs/alignment.md, issue #24).

A student predicted token s covers the characters [c0, c1) of the response. Offsets alignment gives it the
teacher token a that starts at c0 too. Where a ends before c1 ("spanning" positions: the student's token is
longer, e.g. the student emits " international" where the teacher emits " inter" + "national"), the
teacher's top-k at a describes only the first piece. (A byte-level teacher's piece of a multi-byte character
carries the whole character's span, so a piece followed by the rest of its character spans too.) `span_rule`:

    first_piece   the top-k at a, projected by the vocabulary map (a's own piece lands on a student token
                  that is a strict prefix of what the student emits, or on a byte-fallback piece)
    chain         when the teacher tokens a..b (b: the last one starting before c1) end exactly at c1, the
                  realised student token gets the teacher's probability of the realised string by the chain
                  rule over the store's own log-probs:
                      P(s) = P(t_a) * P(t_a+1 | t_a) * ... * P(t_b | ...) = exp(sum_{i=a..b} own_lp[i])
                  written in place of t_a's slot; the other top-k candidates at a keep their first-step
                  probability, projected as today. The part of P(t_a) that does not continue to the realised
                  string, P(t_a) - P(s), is the loss's missing mass: renormalised over the kept entries
                  (missing_mass=renormalize) or the tail bucket (tail_bucket). When the teacher's tokens
                  straddle c1 (b ends after c1) the realised string has no stored probability: t_a's slot is
                  dropped (its mass is missing mass). When t_a is not in the stored top-k nothing is written.

The chain target names a student id, not a teacher id: slots hold `len(vocab_map) + student id`, and the
loader hands the loss vocabulary maps extended by an identity block (`extend_map`), so the kernels need no
new input. A source with the student's own tokenizer (no map) writes the student id itself.

Byte-fallback guard (part of `chain`; `first_piece` is the behaviour before it, kept for comparison): at a
position where the student's realised token is not a SentencePiece byte-fallback piece (<0xD8>), a candidate
that maps onto one is dropped - the student never emits it there. A byte-level teacher's incomplete UTF-8
piece (b"\xd8") merges with its continuation under `chain`; its other occurrences among the candidates go
to the missing mass, never to <0xXX>.

Counters (loader.stats): span_chain (chain targets written), span_straddle (dropped: no teacher boundary at
c1), span_not_in_topk (t_a outside the stored top-k), fallback_dropped (candidate slots dropped by the guard).
"""

from __future__ import annotations

import numpy as np


def extend_map(vm: np.ndarray, student_size: int) -> np.ndarray:
    """[V_t] teacher -> student map + identity block: [V_t + V_s], entry V_t + s = s (chain-rule targets)."""
    return np.concatenate([vm.astype(np.int32), np.arange(student_size, dtype=np.int32)])


def spanning_ends(student_span: np.ndarray, a: np.ndarray, offsets: np.ndarray, tok_off: np.ndarray) -> tuple:
    """For student spans [c0, c1) aligned to teacher tokens a, the spanning ones and their last teacher token.

    The teacher tokens that make up the student's token are a..b, b the last token of a's row that starts
    before c1. Byte pieces of one character share that character's span, so a piece that ends "at c1" by
    offsets may still be followed by the rest of its character: then b > a too (an incomplete UTF-8 piece
    merges with its continuation). student_span [P, 2] int; a [P] int64 global teacher token indices;
    offsets [N, 2] the teacher's character spans (per row, response-relative); tok_off [n_rows + 1] row
    boundaries. Returns (spanning [P] bool: a starts at c0, ends at or before c1, and b > a; b [P] int64: the
    last teacher token where it ends exactly at c1, -1 where the teacher's tokens cross c1 or the position is
    not spanning).
    """
    P = len(a)
    b = np.full(P, -1, np.int64)
    if P == 0:
        return np.zeros(0, bool), b
    starts, ends = offsets[:, 0].astype(np.int64), offsets[:, 1].astype(np.int64)
    c0, c1 = student_span[:, 0].astype(np.int64), student_span[:, 1].astype(np.int64)
    row = np.repeat(np.arange(len(tok_off) - 1, dtype=np.int64), np.diff(tok_off))     # [N] row of each token
    # starts are non-decreasing within a row; a running maximum of (row, start) keys makes that hold for any
    # stored row, so one searchsorted finds the first token of a's row that starts at or after c1
    key = np.maximum.accumulate((row << 32) | starts)
    ra = row[a]
    last = np.minimum(np.searchsorted(key, (ra << 32) | c1, side="left"), tok_off[ra + 1]) - 1
    spanning = (starts[a] == c0) & (ends[a] <= c1) & (last > a)
    clean = spanning & (ends[np.maximum(last, 0)] == c1)
    b[clean] = last[clean]
    return spanning, b


def complete_tokens(student_span: np.ndarray, pred_off: np.ndarray) -> np.ndarray:
    """[S] bool: the student's predicted token holds its whole span - the next predicted token of its example
    starts at or after its end. False for a byte piece followed by the rest of its character (its span is the
    character's, its bytes a prefix): the string it stands for is not the span's text, so no chain there."""
    S = len(student_span)
    nxt = np.full(S, np.iinfo(np.int64).max, np.int64)
    nxt[:-1] = student_span[1:, 0]
    ends = pred_off[1:] - 1
    nxt[ends[ends >= 0]] = np.iinfo(np.int64).max  # the last token of each example
    return nxt >= student_span[:, 1]


def chain_targets(tids: np.ndarray, tlps: np.ndarray, own_lp: np.ndarray, *, G: np.ndarray,
                  student_span: np.ndarray, student_ids: np.ndarray, complete: np.ndarray, rec,
                  chain_base: int | None, stats: dict) -> None:
    """Apply the chain rule to one teacher's gathered top-k, in place.

    tids [S, K] int32 / tlps [S, K] float16: the teacher's top-k at each student position (-1 / -inf empty);
    own_lp [S] float64: the teacher's own log-prob of its realised token at the position (replaced by the
    chain's at spanning positions, for token-level advantages); G [S] int64 aligned teacher token (-1 none);
    student_span [S, 2], student_ids [S]: the student's predicted tokens; complete [S] (complete_tokens): where
    the student's token stands for its whole span; rec: the teacher's TeacherShard;
    chain_base: len(vocab map) (the chain slot holds chain_base + student id), None: the student's own
    vocabulary (the slot holds the student id).
    """
    pos = np.nonzero((G >= 0) & complete)[0]
    a = G[pos]
    spanning, b = spanning_ends(student_span[pos], a, rec.offsets, rec.tok_off)
    if not spanning.any():
        return
    cs = np.concatenate([[0.0], np.cumsum(np.asarray(rec.token_logprobs, np.float64))])
    realised = np.asarray(rec.token_ids)[a]
    slot_hit = tids[pos] == realised[:, None]                          # [P, K]
    in_topk = slot_hit.any(1)
    slot = slot_hit.argmax(1)
    chain = spanning & (b >= 0)
    write = chain & in_topk
    p, k = pos[write], slot[write]
    lp = cs[b[write] + 1] - cs[a[write]]
    ids = student_ids[p].astype(np.int64) + (0 if chain_base is None else chain_base)
    tids[p, k] = ids
    tlps[p, k] = lp.astype(np.float16)
    own_lp[pos[chain]] = cs[b[chain] + 1] - cs[a[chain]]
    straddle = spanning & (b < 0) & in_topk
    tids[pos[straddle], slot[straddle]] = -1
    tlps[pos[straddle], slot[straddle]] = -np.inf
    stats["span_chain"] = stats.get("span_chain", 0) + int(write.sum())
    stats["span_straddle"] = stats.get("span_straddle", 0) + int((spanning & (b < 0)).sum())
    stats["span_not_in_topk"] = stats.get("span_not_in_topk", 0) + int((chain & ~in_topk).sum())


def drop_fallback_targets(tids: np.ndarray, tlps: np.ndarray, *, vm: np.ndarray, fallback: np.ndarray,
                          student_ids: np.ndarray, stats: dict) -> None:
    """Drop, in place, candidates that map onto a byte-fallback student piece at positions where the student's
    realised token is not one. vm: the (extended) map; fallback [V_s] bool: the student's <0xXX> pieces."""
    if not fallback.any():
        return
    filled = tids >= 0
    mapped = np.where(filled, vm[np.where(filled, tids, 0)], -1)
    on_fallback = (mapped >= 0) & fallback[np.maximum(mapped, 0)]
    bad = on_fallback & ~fallback[student_ids][:, None]
    if bad.any():
        tids[bad] = -1
        tlps[bad] = -np.inf
        stats["fallback_dropped"] = stats.get("fallback_dropped", 0) + int(bad.sum())
