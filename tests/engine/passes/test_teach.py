"""`profuser teach`: stored top-k equal a direct full forward; resume; sharding; bad inputs.

Tiny random-weight Llamas with the REAL SmolLM2 and Gemma-3 tokenizers (models.tiny_model_dir), so the
chat templates, offsets and vocabulary sizes are the real ones; one slow test uses the real SmolLM2.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import EXAMPLES, make_prepared, need
from profuser.engine import models, store
from profuser.engine.passes import forward, options, teach
from profuser.engine.text import chat

K = 5


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def tiny(request, tmp_path_factory):
    return str(models.tiny_model_dir(need(request.param), out_dir=tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tiny_smol(tmp_path_factory):
    return str(models.tiny_model_dir(need("smollm2-135m-instruct"), out_dir=tmp_path_factory.mktemp("tiny_smol")))


def cfg_for(data_dir, spec, **kw):
    return options.PassConfig(data_dir=str(data_dir), sources=[spec], names=["src"], k=K, progress=False,
                             batch_tokens=kw.pop("batch_tokens", 96), **kw)


def read_rows(data_dir, mode="train"):
    m = store.TeacherManifest.load(data_dir, "src", mode)
    d = store.teacher_dir(data_dir, "src", mode)
    return pa.concat_tables([store.read_table(d / store.shard_name(j)) for j in range(m.n_shards)]).to_pylist()


def reference_rows(spec, examples, k=K):
    """Direct full forward of each example alone: model(input_ids).logits -> log_softmax -> topk."""
    model, tok = models.load_model(spec), models.load_tokenizer(spec)
    out = []
    with torch.no_grad():
        for e in examples:
            enc = chat.encode_example(tok, e["prompt"], e["response"], system=e.get("system"), history=e.get("history"))
            logits = model(torch.from_numpy(enc.input_ids[None].astype(np.int64))).logits[0]
            lp = torch.log_softmax(logits.float(), -1)[torch.from_numpy(enc.pred_pos.astype(np.int64))]
            v, i = lp.topk(k, -1)
            tok_lp = lp.gather(1, torch.from_numpy(enc.pred_ids[:, None].astype(np.int64)))[:, 0]
            out.append(dict(tok=tok, enc=enc, lp=lp.numpy(), topk_ids=i.numpy(), topk_lp=v.numpy(),
                            tok_lp=tok_lp.numpy()))
    return out


def assert_rows_match(rows, refs, examples):
    agree = total = 0
    for row, ref, e in zip(rows, refs, examples):
        enc = ref["enc"]
        R = enc.n_predicted
        assert row["response"] == e["response"] and row["n_tokens"] == R
        assert row["token_ids"] == enc.pred_ids.tolist()
        assert row["pred_offsets"] == enc.pred_offsets.reshape(-1).tolist()
        assert row["n_bytes"] == len(e["response"].encode()) + 1
        ids = np.array(row["topk_ids"]).reshape(R, K)
        lps = np.array(row["topk_logprobs"], np.float32).reshape(R, K)
        # values: the stored top-k log-probs are the reference's, and they are the reference's at those ids
        np.testing.assert_allclose(lps, ref["topk_lp"], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(lps, np.take_along_axis(ref["lp"], ids, 1), rtol=2e-3, atol=2e-3)
        assert (np.diff(lps, axis=1) <= 0).all()
        agree += (ids == ref["topk_ids"]).sum()
        total += ids.size
        np.testing.assert_allclose(row["token_logprobs"], ref["tok_lp"], rtol=2e-3, atol=2e-3)
        assert row["nll_sum"] == pytest.approx(-ref["tok_lp"].astype(np.float64).sum(), rel=1e-4, abs=1e-4)
    assert agree / total > 0.99  # ids differ only at exact near-ties (batched vs single numerics)


def test_teach_matches_full_forward(tmp_path, tiny):
    make_prepared(tmp_path)
    stats = teach.teach(cfg_for(tmp_path, tiny))["src"]
    assert stats["shards"] == 2 and stats["tokens"] > 0
    m = store.TeacherManifest.load(tmp_path, "src", "train")
    refs = reference_rows(tiny, EXAMPLES)
    tok = refs[0]["tok"]
    from profuser.engine.text.align import tokenizer_hash

    assert m.tokenizer_hash == tokenizer_hash(tok) and m.vocab_size == len(tok) and m.k == K
    assert sorted(m.completed) == ["0", "1"] and m.tokens == stats["tokens"]
    assert_rows_match(read_rows(tmp_path), refs, EXAMPLES)
    # the reader validates every shard against the prepared set
    st = store.TeacherStore(tmp_path, "src", "train", tokenizer_hash=m.tokenizer_hash)
    assert st.shard(1).n_rows == 2


def test_teach_forces_every_assistant_turn_of_a_conversation(tmp_path, tiny_smol):
    """A multi-turn conversation: one record per assistant turn, each the full forward of the conversation up to
    that turn (the earlier turns in the model's own template), its predicted tokens that turn's response."""
    turns = [("Define 'eel'.", "A long fish."), ("And 'emu'?", "A big bird of Australia."), ("And 'elk'?", "A deer.")]
    msgs = [{"role": "system", "content": "Be brief."}]
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    make_prepared(tmp_path, examples=[{"id": "chat", "messages": msgs}, EXAMPLES[0]], shard_size=4)
    teach.teach(cfg_for(tmp_path, tiny_smol))
    prepared = store.read_prepared_shard(tmp_path, 0).to_pylist()
    assert [(e["example_id"], len(e["history"] or [])) for e in prepared[:3]] == [("chat#1", 0), ("chat#2", 2),
                                                                                  ("chat#3", 4)]
    assert len(prepared) == 4 and prepared[3]["history"] is None
    rows = read_rows(tmp_path)
    assert_rows_match(rows, reference_rows(tiny_smol, prepared), prepared)
    third = chat.encode_example(models.load_tokenizer(tiny_smol), "And 'elk'?", "A deer.", system="Be brief.",
                                history=prepared[2]["history"])
    assert rows[2]["token_ids"] == third.pred_ids.tolist() and third.pred_pos[0] > 40  # after both earlier turns
    tok_hash = store.TeacherManifest.load(tmp_path, "src", "train").tokenizer_hash
    assert store.TeacherStore(tmp_path, "src", "train", tokenizer_hash=tok_hash).shard(0).n_rows == 4


def test_resume_after_kill_between_and_inside_shards(tmp_path, tiny_smol, monkeypatch):
    make_prepared(tmp_path, shard_size=2)  # 3 shards
    cfg = cfg_for(tmp_path, tiny_smol)

    def die(j):
        if j == 0:
            raise KeyboardInterrupt("killed after shard 0")

    with pytest.raises(KeyboardInterrupt):
        teach.teach(cfg, after_shard=die)
    assert list(store.TeacherManifest.load(tmp_path, "src", "train").completed) == ["0"]
    shard0 = store.teacher_dir(tmp_path, "src", "train") / store.shard_name(0)
    mtime = shard0.stat().st_mtime_ns

    # killed inside shard 1: the second forward of the run raises
    real, calls = teach.forward_predicted, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-shard")
        return real(*a, **kw)

    monkeypatch.setattr(teach, "forward_predicted", flaky)
    with pytest.raises(RuntimeError, match="mid-shard"):
        teach.teach(cfg_for(tmp_path, tiny_smol, batch_tokens=40))
    d = store.teacher_dir(tmp_path, "src", "train")
    assert not (d / store.shard_name(1)).exists() and not list(d.glob("*.tmp-*"))
    monkeypatch.setattr(teach, "forward_predicted", real)
    (d / "part-00002.parquet.tmp-424242").write_bytes(b"left by a killed writer")

    stats = teach.teach(cfg)["src"]
    assert (stats["shards"], stats["skipped"]) == (2, 1)
    assert shard0.stat().st_mtime_ns == mtime and not list(d.glob("*.tmp-*"))
    assert_rows_match(read_rows(tmp_path), reference_rows(tiny_smol, EXAMPLES), EXAMPLES)

    # a shard renamed into place but missing from the manifest is adopted, not recomputed
    m = store.TeacherManifest.load(tmp_path, "src", "train")
    del m.completed["2"]
    m.save(tmp_path)
    monkeypatch.setattr(teach, "forward_predicted", lambda *a, **kw: pytest.fail("recomputed"))
    assert teach.teach(cfg)["src"]["shards"] == 0
    assert "2" in store.TeacherManifest.load(tmp_path, "src", "train").completed


def test_two_ranks_cover_every_example_once(tmp_path, tiny_smol, monkeypatch):
    make_prepared(tmp_path, shard_size=1)  # 6 shards
    done = {}
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stats = teach.teach(cfg_for(tmp_path, tiny_smol))["src"]
        done[rank] = stats["shards"]
    assert done == {0: 3, 1: 3}
    m = store.TeacherManifest.load(tmp_path, "src", "train")
    assert sorted(map(int, m.completed)) == list(range(6))
    rows = read_rows(tmp_path)
    prep = pa.concat_tables([store.read_prepared_shard(tmp_path, j) for j in range(6)])
    assert [r["example_id"] for r in rows] == prep["example_id"].to_pylist()
    # flags override the environment
    from profuser.engine import dist

    assert dist.dist_info(0, 3) == dist.DistInfo(0, 3, 0)
    with pytest.raises(ValueError, match="rank=3"):
        dist.dist_info(3, 3)


def test_manifest_mismatch_errors(tmp_path, tiny_smol):
    make_prepared(tmp_path)
    cfg = cfg_for(tmp_path, tiny_smol)
    teach.teach(cfg)
    m = store.TeacherManifest.load(tmp_path, "src", "train")  # a store of another tokenizer, written properly
    m.tokenizer_hash = "0" * 64
    m.save(tmp_path)
    with pytest.raises(store.StoreError, match=r"src/train/manifest.json: tokenizer_hash is '0000"):
        teach.teach(cfg)
    with pytest.raises(store.StoreError, match="tokenizer_hash"):
        store.TeacherStore(tmp_path, "src", "train", tokenizer_hash="abc")
    cfg.overwrite = True
    assert teach.teach(cfg)["src"]["shards"] == 2
    # another prepared set under the same data dir: the teacher store no longer matches
    make_prepared(tmp_path, EXAMPLES[:3])
    cfg.overwrite = False
    with pytest.raises(store.StoreError, match="prepared_fingerprint"):
        teach.teach(cfg)
    with pytest.raises(store.StoreError, match="prepared_fingerprint"):
        store.TeacherStore(tmp_path, "src", "train")


def test_corrupt_shard_and_text_mismatch_named(tmp_path, tiny_smol):
    make_prepared(tmp_path)
    teach.teach(cfg_for(tmp_path, tiny_smol))
    d = store.teacher_dir(tmp_path, "src", "train")
    st = store.TeacherStore(tmp_path, "src", "train")
    t = store.read_table(d / store.shard_name(0))
    resp = t["response"].to_pylist()
    resp[1] = resp[1][:5]  # offsets no longer fit the text
    info = store.write_table_atomic(t.set_column(1, "response", pa.array(resp)), d / store.shard_name(0))
    with pytest.raises(store.StoreError, match=r"part-00000.parquet: teacher shard content digest .* differs"):
        st.shard(0)  # an edited file no longer matches its manifest
    entry = dict(st.manifest.completed["0"], sha256=info.sha256, bytes=info.bytes)  # as if a buggy writer wrote it
    store.update_manifest(tmp_path, "src", "train", 0, entry)
    shard = store.TeacherStore(tmp_path, "src", "train").shard(0)  # the value checks name the row
    assert list(shard.problems) == [1] and "pred_offsets do not fit" in shard.problem(1)
    (d / store.shard_name(1)).write_bytes(b"garbage")
    with pytest.raises(store.StoreError, match=r"part-00001.parquet: teacher shard content digest"):
        st.shard(1)
    (d / store.shard_name(1)).unlink()
    with pytest.raises(store.StoreError, match=r"part-00001.parquet: teacher shard file is missing"):
        st.shard(1)


def test_nan_logprobs_error_or_marked(tmp_path, tiny_smol, monkeypatch):
    make_prepared(tmp_path)
    real, calls = teach.forward_predicted, []

    def nan_once(*a, **kw):
        ti, tl, tk = real(*a, **kw)
        calls.append(1)
        if len(calls) == 1:
            tl[0, 0] = np.nan  # first token of the first batch's first (= longest) example of shard 0
        return ti, tl, tk

    tok = models.load_tokenizer(tiny_smol)
    lens = [len(chat.encode_example(tok, e["prompt"], e["response"], system=e.get("system")).input_ids)
            for e in EXAMPLES[:4]]
    row = int(np.argmax(lens))
    monkeypatch.setattr(teach, "forward_predicted", nan_once)
    with pytest.raises(FloatingPointError, match=rf"shard 0: row {row} \(example_id '[0-9a-f]{{16}}'\): NaN"):
        teach.teach(cfg_for(tmp_path, tiny_smol, batch_tokens=10_000))
    calls.clear()
    with pytest.warns(UserWarning, match="1 rows had NaN"):
        teach.teach(cfg_for(tmp_path, tiny_smol, batch_tokens=10_000, nan_policy="drop"))
    rows = read_rows(tmp_path)
    assert [bool(np.isnan(r["nll_sum"])) for r in rows] == [i == row for i in range(len(EXAMPLES))]
    shard = store.TeacherStore(tmp_path, "src", "train").shard(0)  # read back: the marked row is flagged
    assert shard.invalid.tolist() == [i == row for i in range(4)] and "NaN" in shard.problem(row)


def test_length_batches_and_config_errors():
    lens = [5, 50, 7, 49, 6]
    b = forward.length_batches(lens, batch_tokens=100, max_batch_size=2)
    assert sorted(i for x in b for i in x) == list(range(5))
    assert b[0] == [1, 3] and all(len(x) * max(lens[i] for i in x) <= 100 or len(x) == 1 for x in b)
    with pytest.raises(ValueError, match="nan_policy"):
        options.PassConfig(data_dir="x", sources=["a"], nan_policy="ignore")
    with pytest.raises(ValueError, match="unique"):
        options.PassConfig(data_dir="x", sources=["a", "a"])
    with pytest.raises(ValueError, match="neither a known alias"):
        models.resolve_model("no-such-model-xyz")


@pytest.mark.slow
def test_real_smollm2_topk_equals_full_forward(tmp_path):
    need("smollm2-135m-instruct")
    make_prepared(tmp_path, EXAMPLES[:4])
    teach.teach(cfg_for(tmp_path, "smollm2-135m-instruct", batch_tokens=512))
    assert_rows_match(read_rows(tmp_path), reference_rows("smollm2-135m-instruct", EXAMPLES[:4]), EXAMPLES[:4])
