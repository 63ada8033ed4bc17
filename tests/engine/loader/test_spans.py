"""span_rule=chain with real tokenizers (issue #24): chain-rule targets where the student's token spans several
teacher tokens, no byte-fallback target the student does not emit, covering positions unchanged.

Each case is a (student, teacher) pair and a text where the spanning positions arise for real:
multi-byte characters (Arabic, Hindi: a byte-level teacher spells a character in several pieces), digits
(a digit-splitting teacher, a digit-grouping student), whitespace runs, a SentencePiece teacher's dummy
prefix at the response start, and spans of 4+ teacher tokens. The stores are synthetic only in their
numbers: real token ids and offsets, the realised token in the first top-k slot, chosen candidates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import helpers as rt
from profuser.engine import store
from profuser.engine.text import chat
from profuser.engine.text.vocab_map import vocab_info
from profuser.engine.tools import synthetic as fx
from profuser.kernels.params import FusionParams
from profuser.kernels.targets import build_sparse_target

CASES = {  # name: (student, teacher, response)
    "arabic": ("gemma3", "gpt2", "اللغة العربية جميلة جدا"),
    "hindi_4plus": ("gemma3", "gpt2", "नमस्ते दुनिया, यह परीक्षण है"),
    "digits": ("llama3", "gemma3", "Revenue rose 123456 to 7890 units"),
    "whitespace_runs": ("gemma3", "llama3", "x =  1\n\n\n    y  z"),
    # GPT-2 spells "    return" as " ", " ", " ", " return": the student's "    " has no teacher boundary at its end
    "whitespace_straddle": ("gemma3", "gpt2", "def f():\n    return  1\n        x"),
    "dummy_prefix": ("smollm2", "mistral-sp", "Internationalization is antidisestablishmentarian."),
}
K = 6
PROMPTS = ["Say it.", "Again, please."]


def build(tmp_path, student: str, teacher: str, text: str, leads: bool = True):
    s_tok, t_tok = rt.tokenizer(student), rt.tokenizer(teacher)
    ex = [{"example_id": f"e{i}", "prompt": p, "response": text, "system": None}
          for i, p in enumerate(PROMPTS)]
    pm = fx.write_prepared(tmp_path, ex, 2)
    # candidates the map sends to byte pieces: the teacher's lone UTF-8 lead bytes (incomplete sequences)
    lead_ids = [i for i, b in enumerate(vocab_info(t_tok).bytes) if len(b) == 1 and b[0] in (0xD8, 0xE0, 0xF0)]

    def edit(shard):
        if leads:
            shard.topk_ids[:, 1:1 + len(lead_ids)] = lead_ids
        shard.token_logprobs[:] = shard.topk_logprobs[:, 0]  # the realised token is the first slot

    fx.write_teacher(tmp_path, "t", "train", t_tok, f"{teacher}-model", ex, pm, k=K, seed=3, true_top=1.0,
                     edit=edit)
    fx.write_teacher(tmp_path, "self", "train", s_tok, f"{student}-model", ex, pm, k=K, seed=4)
    return s_tok, t_tok


def loader(tmp_path, s_tok, t_tok, student, span_rule):
    return rt.fusion_loader(tmp_path, s_tok, sources=["t", "self"], student=f"{student}-model", k=K,
                            shuffle_buffer=1, span_rule=span_rule, advantage="avgCE",
                            teacher_tokenizers={"t": t_tok})


def teacher_rows(ld):
    """{example_id: the teacher's stored rows as (offsets, token_ids, token_logprobs)}."""
    out = {}
    for j in range(ld.n_shards):
        prep = store.read_prepared_shard(ld.root, j, ld.prepared)
        rec = ld.stores[0].shard(j, prep)
        for i, eid in enumerate(prep["example_id"].to_pylist()):
            a, z = int(rec.tok_off[i]), int(rec.tok_off[i + 1])
            out[eid] = (rec.offsets[a:z], rec.token_ids[a:z], rec.token_logprobs[a:z].astype(np.float64))
    return out


def expected_span(toff, s_off, complete=True):
    """(a, b) of the teacher tokens a..b that make up the student span s_off: a the clean token starting with
    it, b the last one starting before it ends, b > a; (a, None) when b ends past the student's end; None when
    the position is not spanning (no such a, a reaching past the student's end, b == a, or the student's token
    a byte piece followed by the rest of its character: complete False)."""
    a = next((r for r in range(len(toff)) if toff[r][0] == s_off[0]
              and all(toff[q][0] != s_off[0] for q in range(r)) and (r == 0 or toff[r - 1][1] <= s_off[0])), None)
    if not complete or a is None or toff[a][1] > s_off[1]:
        return None
    b = max(q for q in range(a, len(toff)) if q == a or toff[q][0] < s_off[1])
    if b == a:
        return None
    return (a, b) if toff[b][1] == s_off[1] else (a, None)


@pytest.mark.parametrize("case", list(CASES))
def test_chain_targets_with_real_tokenizers(tmp_path, case):
    student, teacher, text = CASES[case]
    s_tok, t_tok = build(tmp_path, student, teacher, text)
    chain = loader(tmp_path, s_tok, t_tok, student, "chain")
    first = loader(tmp_path, s_tok, t_tok, student, "first_piece")
    rows = teacher_rows(chain)
    fallback = np.asarray(vocab_info(s_tok).byte_fallback, bool)
    vm_c, vm_f = chain.vocab_maps[0].long(), first.vocab_maps[0].long()
    n_chain = n_straddle = longest = covering = 0
    for bc, bf in zip(chain, first):
        for b, eid in enumerate(bc["example_ids"]):
            toff, tids, tlp = rows[eid]
            toff = toff.tolist()
            pos = np.nonzero(bc["labels"][b].numpy() != -100)[0]
            s_ids = bc["labels"][b, pos].numpy()
            e = chat.encode_example(s_tok, PROMPTS[int(eid[1:])], text)
            so = e.pred_offsets.tolist()
            for i, (p, sid, s_off) in enumerate(zip(pos.tolist(), s_ids.tolist(), so)):
                ids_c, ids_f = bc["teacher_ids"][0, b, p].long(), bf["teacher_ids"][0, b, p].long()
                lp_c = bc["teacher_logprobs"][0, b, p].float()
                span = expected_span(toff, s_off, i + 1 == len(so) or so[i + 1][0] >= s_off[1])
                mapped = torch.where(ids_c >= 0, vm_c[ids_c.clamp_min(0)], -1)
                # never a byte-fallback target where the student emits a regular token
                if not fallback[sid]:
                    assert not fallback[mapped[mapped >= 0].numpy()].any(), (case, s_off)
                if span is None:  # covering (or unaligned) positions: the first_piece result minus the guard
                    keep = ids_f >= 0
                    mf = torch.where(keep, vm_f[ids_f.clamp_min(0)], -1)
                    guard = (mf >= 0) & torch.from_numpy(fallback)[mf.clamp_min(0)] & (not fallback[sid])
                    assert ids_c.tolist() == torch.where(guard, -1, ids_f).tolist(), (case, s_off)
                    covering += int(keep.any())
                    continue
                a, last = span
                if last is None:  # the teacher straddles the student's end: the realised slot is emptied
                    assert int(tids[a]) not in ids_c.tolist() and int(tids[a]) in ids_f.tolist()
                    n_straddle += 1
                    continue
                n_chain += 1
                longest = max(longest, last - a + 1)
                slot = int(np.nonzero((mapped == sid).numpy() & (ids_c >= len(vm_f)).numpy())[0][0])
                want = float(tlp[a:last + 1].astype(np.float16).astype(np.float64).sum())
                assert lp_c[slot].item() == pytest.approx(want, rel=1e-3, abs=2e-3), (case, s_off)
                assert (ids_f == int(tids[a])).any() and not (ids_c == int(tids[a])).any()
    assert covering > 0 and (n_straddle if case == "whitespace_straddle" else n_chain) > 0, case
    if case == "hindi_4plus":
        assert longest >= 4
    if student == "gemma3":  # first_piece put mass on <0xD8>-like pieces where Gemma emits whole characters
        assert chain.stats["fallback_dropped"] > 0
    assert (chain.stats["span_chain"], chain.stats["span_straddle"]) == (n_chain, n_straddle)


def test_fused_target_gives_the_chain_probability_and_leaves_covering_rows_alone(tmp_path):
    """Through the kernels' target builder (tail_bucket: p = exp(log-prob)): at a spanning row the student's
    realised token carries exp(sum of the teacher's own log-probs over the span); every covering row's
    target is the first_piece one."""
    student, teacher, text = CASES["hindi_4plus"]
    s_tok, t_tok = build(tmp_path, student, teacher, text, leads=False)
    out = {}
    for rule in ("chain", "first_piece"):
        ld = loader(tmp_path, s_tok, t_tok, student, rule)
        batch = next(iter(ld))
        N = batch["labels"].numel()
        tgt = build_sparse_target(batch["labels"].flatten(), batch["teacher_ids"][:1].flatten(1, 2),
                                  batch["teacher_logprobs"][:1].flatten(1, 2).float(),
                                  batch["teacher_weights"][:1].flatten(1, 2), [ld.vocab_maps[0]],
                                  FusionParams(missing_mass="tail_bucket"))
        out[rule] = (tgt, batch, N)
    (tc, bc, N), (tf, _, _) = out["chain"], out["first_piece"]
    changed = ~((tc.ids == tf.ids).all(1) & torch.isclose(tc.mass, tf.mass).all(1))
    assert 0 < int(changed.sum()) < int(tc.has_kd.sum())  # some rows span, most cover
    raw = bc["teacher_ids"][0].flatten(0, 1).long()
    V_t = len(t_tok)
    checked = 0
    for i in torch.nonzero(changed).flatten().tolist():
        chain_slots = raw[i] >= V_t
        if not chain_slots.any():
            continue  # a straddling row or a guarded candidate: mass left to the tail
        lp = bc["teacher_logprobs"][0].flatten(0, 1)[i][chain_slots].float()
        label = int(bc["labels"].flatten()[i])
        m = tc.mass[i][tc.ids[i] == label].sum()
        assert m.item() == pytest.approx(math.exp(lp.item()), rel=1e-5)
        checked += 1
    assert checked > 0  # the batch has chain-rule rows (the loop above is not vacuous)
