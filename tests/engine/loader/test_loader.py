"""profuser.engine.data: alignment against a brute-force reference, advantage weights, inference mode.

One store (real text, real SmolLM2 / Gemma-3 / GPT-2 tokenizers, random top-k) is built per module;
every expectation is recomputed here from the store files with plain Python loops, independently of the
loader's vectorized code.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import helpers as rt
from profuser.engine import store
from profuser.engine.config import MODE_ID
from profuser.engine.text import chat
from profuser.engine.tools import synthetic as fx

SOURCES = ["smollm2", "gemma3", "gpt2"]
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m", "gpt2": "gpt2-local"}
STUDENT = "smollm2-135m-instruct"
N, SHARD = 36, 8


@pytest.fixture(scope="module")
def toks():
    return {"smollm2": rt.load("smollm2"), "gemma3": rt.load("gemma3"), "gpt2": rt.load("gpt2")}


@pytest.fixture(scope="module")
def data(tmp_path_factory, toks):
    root = tmp_path_factory.mktemp("store")
    ex = fx.corpus(N, history_every=5)  # some rows are second turns: context from the history, aligned per turn
    pm = fx.write_prepared(root, ex, SHARD)
    for s, src in enumerate(SOURCES):
        fx.write_teacher(root, src, "train", toks[src], MODELS[src], ex, pm, seed=10 + s)
        fx.write_teacher(root, src, "infer", toks[src], MODELS[src], ex, pm, seed=20 + s,
                         responses=[fx.infer_response(src, e) for e in ex])
    winners = [SOURCES[i % 3] for i in range(N)]
    fx.write_votes(root, [e["example_id"] for e in ex], winners)
    return root, ex, dict(zip([e["example_id"] for e in ex], winners))


def store_rows(root, mode):
    """{source: {example_id: record dict}} read back with pyarrow (the reference side)."""
    out = {}
    for src in SOURCES:
        d = store.teacher_dir(root, src, mode)
        rows = {}
        for f in sorted(d.glob("part-*.parquet")):
            for r in pq.read_table(f).to_pylist():
                rows[r["example_id"]] = r
        out[src] = rows
    return out


def loader(root, toks, **kw):
    return rt.fusion_loader(root, toks["smollm2"], sources=SOURCES, student=STUDENT,
                            teacher_tokenizers={s: toks[s] for s in SOURCES[1:]}, **kw)


def brute_force_align(student_off, teacher_off) -> list[int]:
    """Contract rule, literally: s takes r iff both start at c, each is the first token starting at c on
    its side, and the previous token on each side ends at or before c."""
    def clean(off, i):
        c = off[i][0]
        first = all(off[q][0] != c for q in range(i))
        return first and (i == 0 or off[i - 1][1] <= c)

    out = []
    for s in range(len(student_off)):
        found = -1
        if clean(student_off, s):
            for r in range(len(teacher_off)):
                if teacher_off[r][0] == student_off[s][0] and clean(teacher_off, r):
                    found = r
                    break
        out.append(found)
    return out


def iterate(ld):
    """(batch, b, example_id, student EncodedExample-like) for every example of one epoch."""
    for batch in ld:
        for b, eid in enumerate(batch["example_ids"]):
            yield batch, b, eid


def chain_rule(topk_ids, topk_lps, rec, r, s_off, student_id, base, complete):
    """issue #24's rule, literally, at a student token with span s_off aligned to teacher token r: b is the
    last teacher token starting before the student's token ends; when b > r (and r does not reach past it),
    the slot of r's realised token gets the sum of the own log-probs of r..b and the id base + student id if
    b ends exactly there, else that slot is emptied. Other slots are untouched. Not where the student's token
    is a byte piece followed by the rest of its character (complete False: it does not stand for its span)."""
    toff = np.asarray(rec["pred_offsets"]).reshape(-1, 2).tolist()
    ids, lps = list(topk_ids), list(topk_lps)
    b = max(q for q in range(r, len(toff)) if q == r or toff[q][0] < s_off[1])
    if not complete or b == r or toff[r][1] > s_off[1] or rec["token_ids"][r] not in ids:
        return ids, lps, False
    j = ids.index(rec["token_ids"][r])
    if toff[b][1] == s_off[1]:
        ids[j] = base + student_id
        lps[j] = sum(float(np.float16(x)) for x in rec["token_logprobs"][r:b + 1])
    else:
        ids[j], lps[j] = -1, -math.inf
    return ids, lps, True


@pytest.mark.parametrize("span_rule", ["first_piece", "chain"])
@pytest.mark.parametrize("max_length", [64, 96])  # 64 cuts some responses and every history; 96 keeps most histories
def test_alignment_matches_brute_force(data, toks, span_rule, max_length):
    root, ex, _ = data
    by_id = {e["example_id"]: e for e in ex}
    rows = store_rows(root, "train")
    ld = loader(root, toks, micro_batch_size=5, max_length=max_length, span_rule=span_rule)
    seen, aligned, total, spanning, in_context = set(), 0, 0, 0, 0
    for batch, b, eid in iterate(ld):
        seen.add(eid)
        e = by_id[eid]
        enc = chat.encode_example(toks["smollm2"], e["prompt"], e["response"], system=e["system"],
                                  history=e["history"], max_length=max_length)
        L = enc.input_ids.shape[0]
        assert batch["input_ids"][b, :L].tolist() == enc.input_ids.tolist()
        if e["history"] is not None:  # a second turn: the first exchange is in its context (when it fits)
            in_context += e["history"][1]["content"] in toks["smollm2"].decode(enc.input_ids[:enc.pred_pos[0]])
        assert batch["attention_mask"][b].sum().item() == L
        labels = batch["labels"][b]
        pos = np.nonzero(labels.numpy() != -100)[0]
        assert pos.tolist() == enc.pred_pos.tolist()
        assert labels[pos].tolist() == batch["input_ids"][b, pos + 1].tolist() == enc.pred_ids.tolist()
        for t, src in enumerate(SOURCES):
            rec = rows[src][eid]
            toff = np.asarray(rec["pred_offsets"]).reshape(-1, 2).tolist()
            ref = brute_force_align(enc.pred_offsets.tolist(), toff)
            if src == "smollm2":  # the student's own tokenizer: identity, byte pieces included
                assert rec["token_ids"][:len(ref)] == enc.pred_ids.tolist()
                assert all(r in (s, -1) for s, r in enumerate(ref))
                ref = list(range(len(ref)))
            K = 8
            so = enc.pred_offsets.tolist()
            complete = [i + 1 == len(so) or so[i + 1][0] >= so[i][1] for i in range(len(so))]
            for r_s, p, s_off, sid, whole in zip(ref, enc.pred_pos.tolist(), so, enc.pred_ids.tolist(), complete):
                got = batch["teacher_ids"][t, b, p].tolist()
                total += 1
                if r_s < 0:
                    assert got == [-1] * K
                    assert batch["teacher_weights"][t, b, p] == 0
                    continue
                aligned += 1
                want_ids = rec["topk_ids"][r_s * K:(r_s + 1) * K]
                want_lps = rec["topk_logprobs"][r_s * K:(r_s + 1) * K]
                if span_rule == "chain":
                    want_ids, want_lps, span = chain_rule(want_ids, want_lps, rec, r_s, s_off, sid,
                                                          len(toks[src]), whole)
                    spanning += span
                assert got == want_ids
                lp = batch["teacher_logprobs"][t, b, p].float().tolist()
                assert lp == pytest.approx(want_lps, rel=1e-3, abs=2e-3)  # a chain sum rounded to float16
        # nothing outside the labelled positions
        off = np.ones(batch["input_ids"].shape[1], bool)
        off[pos] = False
        assert (batch["teacher_ids"][:, b, off] == -1).all()
        assert (batch["teacher_weights"][:, b, off] == 0).all()
    assert seen == set(by_id) and (in_context > 0 or max_length == 64)
    assert 0.5 < aligned / total < 1.0  # real cross-tokenizer text: most but not all positions align
    if span_rule == "chain":  # the texts have spanning positions, and the loader counted what it did there
        assert spanning > 0 and ld.stats["span_chain"] + ld.stats["span_straddle"] > 0
        assert len(ld.vocab_maps[1]) == len(toks["gemma3"]) + len(toks["smollm2"])


def expected_metric(rec, ce_metric):
    denom = rec["n_bytes"] if ce_metric == "per_byte" else rec["n_tokens"]
    return rec["nll_sum"] / denom


@pytest.mark.parametrize("advantage,ce_metric,student_cand", [
    ("minCE", "per_byte", True), ("minCE", "per_token", True), ("minCE", "per_byte", False),
    ("avgCE", "per_byte", True), ("avgCE", "per_token", False)])
def test_example_weights(data, toks, advantage, ce_metric, student_cand):
    root, _, _ = data
    rows = store_rows(root, "train")
    ld = loader(root, toks, micro_batch_size=6, advantage=advantage, ce_metric=ce_metric,
                student_as_candidate=student_cand)
    assert ld.is_student.tolist() == [True, False, False]
    wins = set()
    for batch, b, eid in iterate(ld):
        cands = [t for t in range(3) if student_cand or t != 0]
        m = {t: expected_metric(rows[SOURCES[t]][eid], ce_metric) for t in cands}
        if advantage == "minCE":
            best = min(cands, key=lambda t: (m[t], t))
            want = {t: float(t == best) for t in range(3)}
            wins.add(best)
        else:
            z = sum(math.exp(-m[t]) for t in cands)
            want = {t: (math.exp(-m[t]) / z if t in cands else 0.0) for t in range(3)}
        for t in range(3):
            hit = (batch["teacher_ids"][t, b] >= 0).any(-1)  # aligned (span_rule=chain may empty one slot)
            w = batch["teacher_weights"][t, b]
            assert w[hit].numpy() == pytest.approx(np.full(int(hit.sum()), want[t]), rel=1e-5, abs=1e-7)
            assert (w[~hit] == 0).all()
    if advantage == "minCE":
        assert len(wins) >= 2  # the random scales make several sources win


@pytest.mark.parametrize("advantage", ["minCE", "avgCE"])
def test_token_weights(data, toks, advantage):
    root, _, _ = data
    rows = store_rows(root, "train")
    ld = loader(root, toks, micro_batch_size=6, advantage=advantage, advantage_level="token",
                student_as_candidate=False, span_rule="first_piece")  # rows found by their stored top-k
    checked = 0
    for batch, b, eid in iterate(ld):
        pos = np.nonzero(batch["labels"][b].numpy() != -100)[0]
        for p in pos.tolist():
            nll = {}
            for t in (1, 2):  # the student source (0) is not a candidate
                top = batch["teacher_ids"][t, b, p].tolist()
                if top[0] < 0:
                    continue
                rec = rows[SOURCES[t]][eid]
                # find the teacher row by its top-k (unique with random ids) and read its token NLL
                K = 8
                r = next(r for r in range(rec["n_tokens"]) if rec["topk_ids"][r * K:(r + 1) * K] == top)
                nll[t] = -float(np.float16(rec["token_logprobs"][r]))
            w = batch["teacher_weights"][:, b, p].tolist()
            assert w[0] == 0
            if not nll:
                assert w == [0, 0, 0]
                continue
            if advantage == "minCE":
                best = min(nll, key=lambda t: (nll[t], t))
                assert w == [0.0] + [float(t == best) for t in (1, 2)]
            else:
                z = sum(math.exp(-v) for v in nll.values())
                want = [math.exp(-nll[t]) / z if t in nll else 0.0 for t in (1, 2)]
                assert w[1:] == pytest.approx(want, rel=1e-5)
            checked += 1
    assert checked > 100


def test_infer_mode_uses_the_vote_winner(data, toks):
    root, ex, winners = data
    by_id = {e["example_id"]: e for e in ex}
    rows = store_rows(root, "infer")
    ld = loader(root, toks, mode="infer", micro_batch_size=4, student_as_candidate=False)
    seen = set()
    for batch, b, eid in iterate(ld):
        seen.add(eid)
        assert batch["mode"][b] == MODE_ID["infer"]
        win = SOURCES.index(winners[eid])
        e = by_id[eid]
        resp = rows[winners[eid]][eid]["response"]
        assert resp == fx.infer_response(winners[eid], e)
        enc = chat.encode_example(toks["smollm2"], e["prompt"], resp, system=e["system"], history=e["history"],
                                  max_length=2048)
        assert batch["input_ids"][b, :enc.input_ids.shape[0]].tolist() == enc.input_ids.tolist()
        for t in range(3):
            has = batch["teacher_ids"][t, b, :, 0] >= 0
            if t != win:
                assert not has.any() and (batch["teacher_weights"][t, b] == 0).all()
            else:
                assert has.any()
                # the student source is not a candidate here: its win teaches nothing (pure SFT)
                want = 0.0 if win == 0 else 1.0
                assert (batch["teacher_weights"][t, b][has] == want).all()
    assert seen == set(by_id)


@pytest.mark.parametrize("align_method", ["offsets", "mined"])
def test_same_tokenizer_source_aligns_every_position(data, toks, align_method):
    """The student's own source (same tokenizer, same gold text) aligns 1:1 at every predicted token."""
    root, _, _ = data
    rows = store_rows(root, "train")
    ld = loader(root, toks, micro_batch_size=6, align_method=align_method)
    for batch, b, eid in iterate(ld):
        rec = rows["smollm2"][eid]
        pos = np.nonzero(batch["labels"][b].numpy() != -100)[0]
        assert len(pos) == rec["n_tokens"]
        got = batch["teacher_ids"][0, b, pos].reshape(-1).tolist()
        assert got == rec["topk_ids"]
        assert (batch["teacher_ids"][0, b, pos, 0] >= 0).all()
        if align_method == "mined":  # the other sources: the DTW's rows, gathered at the right positions
            from profuser.engine.text.align import align_mined, token_strings

            stu = token_strings(toks["smollm2"], batch["labels"][b, pos].tolist())
            for t in (1, 2):
                r2 = rows[SOURCES[t]][eid]
                found = align_mined(stu, token_strings(toks[SOURCES[t]], r2["token_ids"]))
                for p, r in zip(pos.tolist(), found.tolist()):
                    want = [-1] * 8 if r < 0 else r2["topk_ids"][r * 8:(r + 1) * 8]
                    assert batch["teacher_ids"][t, b, p].tolist() == want


def test_vocab_maps(data, toks):
    from profuser.engine.text.align import build_vocab_map

    root, _, _ = data
    ld = loader(root, toks, vocab_map="exact", span_rule="chain")
    maps = ld.vocab_maps
    assert maps[0] is None  # SmolLM2 source: the student's own vocabulary
    for t in (1, 2):
        tok = toks[SOURCES[t]]
        want = build_vocab_map(tok, toks["smollm2"], method="exact", cache_dir=False)
        base = ld.base_vocab_maps[t]
        assert base.dtype == torch.int32 and base.shape[0] >= len(tok)
        assert base.numpy().tolist() == want.tolist()
        # what the loss gets under span_rule=chain: the map, then an identity block for chain-rule targets
        V_s = len(toks["smollm2"])
        assert maps[t].dtype == torch.int32 and maps[t].shape[0] == len(base) + V_s
        assert maps[t][:len(base)].equal(base) and maps[t][len(base):].equal(torch.arange(V_s, dtype=torch.int32))
    assert ld.vocab_maps is maps and ld.base_vocab_maps is ld.base_vocab_maps  # built once
    assert loader(root, toks, vocab_map="exact").vocab_maps[1].equal(ld.base_vocab_maps[1])  # first_piece


def test_training_streams_use_the_configured_vocab_map(data, toks):
    """data.vocab_map reaches the loader of every mode (default: projection)."""
    from profuser.engine.config import load_config
    from profuser.engine.loader.stream import build_streams

    root, _, _ = data
    base = [f"data.data_dir={root}", f"data.sources=[{', '.join(SOURCES)}]", f"model.student={STUDENT}", "data.k=8"]
    for extra, want in (([], "projection"), (["data.vocab_map=exact+mined"], "exact+mined")):
        streams = build_streams(load_config(None, base + extra), toks["smollm2"], ["train", "infer"], 0, 1)
        assert {m: s.loader.cfg.vocab_map for m, s in streams.items()} == {"train": want, "infer": want}


@pytest.mark.parametrize("span_rule", ["first_piece", "chain"])
def test_the_first_answer_token_and_the_end_of_turn_map_onto_the_targets(tmp_path, toks, span_rule):
    """Issue #26 diagnostics: SmolLM2 teaching Gemma-3 (the demo's pair), real tokenizers. At the answer's first
    token and at the end of turn the teacher's realised token (its top slot here) reaches the target as the
    target's own realised token: 'A' -> 'A', <|im_end|> -> <end_of_turn> (a wrong map there would make KD push
    the target's first word and end of turn away from the gold). Where the target's first token spans several
    of the teacher's ('Tokyo' = 'To' + 'kyo'), first_piece maps the first piece ('To'), chain the whole token."""
    ex = fx.corpus(12)
    pm = fx.write_prepared(tmp_path, ex, 4)
    fx.write_teacher(tmp_path, "smollm2", "train", toks["smollm2"], MODELS["smollm2"], ex, pm, seed=3, true_top=1.0)
    gemma, smol = toks["gemma3"], toks["smollm2"]
    ld = rt.fusion_loader(tmp_path, gemma, sources=["smollm2"], student="gemma3-270m", span_rule=span_rule,
                          teacher_tokenizers={"smollm2": smol}, shuffle_buffer=1)
    vm = ld.vocab_maps[0].long()
    eot = gemma.convert_tokens_to_ids("<end_of_turn>")
    by_id = {e["example_id"]: e for e in ex}
    spanning = one_to_one = 0
    for batch in ld:
        for b, eid in enumerate(batch["example_ids"]):
            e = by_id[eid]
            pos = (batch["labels"][b] != -100).nonzero().squeeze(1)
            first, last = int(pos[0]), int(pos[-1])
            s_span = chat.encode_example(gemma, e["prompt"], e["response"]).pred_offsets[0].tolist()
            t_span = chat.encode_example(smol, e["prompt"], e["response"]).pred_offsets[0].tolist()
            top = int(batch["teacher_ids"][0, b, first, 0])
            if s_span == t_span or span_rule == "chain":
                assert int(vm[top]) == int(batch["labels"][b, first]), eid
            else:  # first_piece: the slot holds the teacher's first piece, mapped to the target's own id for it
                assert gemma.convert_ids_to_tokens(int(vm[top])) == smol.convert_ids_to_tokens(top).lstrip("Ġ")
            spanning += s_span != t_span
            one_to_one += s_span == t_span
            assert int(batch["labels"][b, last]) == eot and int(vm[int(batch["teacher_ids"][0, b, last, 0])]) == eot
            assert smol.convert_ids_to_tokens(int(batch["teacher_ids"][0, b, last, 0])) == "<|im_end|>"
    assert spanning >= 1 and one_to_one >= 8
