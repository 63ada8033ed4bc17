"""The teacher store: record round trip, manifests, atomic writes, validation of every bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profuser.engine import store

K = 4


def make_records(rng, responses, ends_turn=True):
    """Hand-built records: each character of the response is one token (+ an end-of-turn token)."""
    offs, ids, lps, kid, klp, nb = [], [], [], [], [], []
    for r in responses:
        R = len(r) + int(ends_turn)
        o = np.array([[i, i + 1] for i in range(len(r))] + ([[len(r), len(r)]] if ends_turn else []),
                     np.int32).reshape(-1, 2)
        offs.append(o)
        ids.append(rng.integers(0, 1000, R))
        lp = -np.cumsum(rng.exponential(1.0, (R, K)), axis=1)
        klp.append(lp)
        kid.append(rng.integers(0, 1000, (R, K)))
        lps.append(lp[:, 0] - rng.exponential(0.1, R))
        nb.append(len(r.encode()) + int(ends_turn))
    lens = [len(x) for x in ids]
    return store.TeacherShard(
        example_ids=[f"e{i}" for i in range(len(responses))], responses=list(responses),
        tok_off=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), offsets=np.concatenate(offs),
        token_ids=np.concatenate(ids).astype(np.int32), token_logprobs=np.concatenate(lps).astype(np.float32),
        topk_ids=np.concatenate(kid).astype(np.int32), topk_logprobs=np.concatenate(klp).astype(np.float32),
        n_bytes=np.array(nb, np.int32))


RESPONSES = ["abc", "", "héllo wörld", "x" * 50]


def test_round_trip_and_schema(tmp_path):
    rng = np.random.default_rng(0)
    rb = make_records(rng, RESPONSES)
    path = tmp_path / store.shard_name(0)
    size = store.write_table_atomic(rb.to_table(), path)
    assert size == path.stat().st_size and not list(tmp_path.glob("*.tmp-*"))
    t = store.read_table(path)
    assert t.schema == store.TEACHER_SCHEMA
    back = store.read_teacher_shard(path, K, None, gold=False)
    assert back.n_rows == len(RESPONSES) and not back.bad_rows.any()
    np.testing.assert_array_equal(back.topk_ids, rb.topk_ids)
    np.testing.assert_array_equal(back.nll_sum, rb.nll_sum)
    rows = t.to_pylist()
    for i, row in enumerate(rows):
        a, b = rb.tok_off[i], rb.tok_off[i + 1]
        assert row["example_id"] == f"e{i}" and row["response"] == RESPONSES[i]
        assert row["n_tokens"] == b - a
        assert row["pred_offsets"] == rb.offsets[a:b].reshape(-1).tolist()
        assert row["token_ids"] == rb.token_ids[a:b].tolist()
        assert row["topk_ids"] == rb.topk_ids[a:b].reshape(-1).tolist()
        np.testing.assert_array_equal(np.array(row["topk_logprobs"], np.float16),
                                      rb.topk_logprobs[a:b].reshape(-1).astype(np.float16))
        # nll_sum from the fp32 log-probs (before the fp16 rounding of the stored column)
        assert row["nll_sum"] == pytest.approx(-rb.token_logprobs[a:b].astype(np.float64).sum(), rel=1e-6)
        assert row["n_bytes"] == len(RESPONSES[i].encode()) + 1


def test_bytes_per_token_under_target(tmp_path):
    """Realistic top-k (ids of a 50k vocabulary, log-probs of a peaked distribution): < 40 B/token at k=8."""
    rng = np.random.default_rng(1)
    n, R, k = 256, 40, 8
    logits = rng.normal(0, 3, (n * R, 512))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-lp, axis=1)[:, :k]
    vocab_ids = rng.permutation(50000)[:512]
    rb = store.TeacherShard(
        example_ids=[f"e{i}" for i in range(n)], responses=["y" * R] * n,
        tok_off=np.arange(0, n * R + 1, R, dtype=np.int64),
        offsets=np.stack([np.tile(np.arange(R), n), np.tile(np.arange(R), n) + 1], 1).astype(np.int32),
        token_ids=vocab_ids[order[:, 0]].astype(np.int32),
        token_logprobs=np.take_along_axis(lp, order[:, :1], 1)[:, 0].astype(np.float32),
        topk_ids=vocab_ids[order].astype(np.int32), topk_logprobs=np.take_along_axis(lp, order, 1).astype(np.float32),
        n_bytes=np.full(n, R, np.int32))
    size = store.write_table_atomic(rb.to_table(), tmp_path / "p.parquet")
    assert size / (n * R) < 40


def test_validation_errors_name_file_and_row(tmp_path):
    rng = np.random.default_rng(2)
    t = make_records(rng, RESPONSES).to_table()
    path = tmp_path / "part-00000.parquet"

    def replace(col, i, value):
        vals = t[col].to_pylist()
        vals[i] = value
        return t.set_column(t.schema.get_field_index(col), col, pa.array(vals, t.schema.field(col).type))

    def check(table, prepared=None, gold=False):
        shard = store.TeacherShard.from_table(table, path, K)
        shard.validate(prepared, gold=gold)
        return shard

    bad_off = t["pred_offsets"].to_pylist()[2]
    bad_off[-1] = 99  # end past the response
    with pytest.raises(store.StoreError, match=r"part-00000.parquet: row 2: pred_offsets"):
        check(replace("pred_offsets", 2, bad_off))
    with pytest.raises(store.StoreError, match=r"row 0: n_tokens=7"):
        check(replace("n_tokens", 0, 7))
    with pytest.raises(store.StoreError, match=r"row 3: topk_ids has"):
        check(replace("topk_ids", 3, [1, 2]))
    with pytest.raises(store.StoreError, match=r"row 2: n_bytes=5"):
        check(replace("n_bytes", 2, 5))
    with pytest.raises(store.StoreError, match="lacks columns"):
        check(t.drop(["nll_sum"]))
    # NaN: flagged per row (the reader's nan_policy decides), naming the column
    lp = t["topk_logprobs"].to_pylist()[1]
    lp[0] = float("nan")
    nan_shard = check(replace("topk_logprobs", 1, lp))
    assert nan_shard.bad_rows.tolist() == [False, True, False, False] and nan_shard.nan_column(1) == "topk_logprobs"
    # rows of another prepared set; in training mode the gold responses too
    prep = pa.table({"example_id": ["e0", "zz", "e2", "e3"], "response": RESPONSES})
    with pytest.raises(store.StoreError, match=r"row 1: example_id 'e1' but the prepared shard has 'zz'"):
        check(t, prep)
    gold = pa.table({"example_id": ["e0", "e1", "e2", "e3"], "response": ["abc", "", "other", "x" * 50]})
    check(t, gold)  # inference mode: the stored response is the generated one
    with pytest.raises(store.StoreError, match=r"row 2: stored response differs from the prepared gold"):
        check(t, gold, gold=True)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(store.StoreError, match="missing"):
        store.read_table(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(store.StoreError, match="bad.parquet: corrupt"):
        store.read_table(bad)
    with pytest.raises(store.StoreError, match="manifest not found"):
        store.PreparedManifest.load(tmp_path)
    d = store.prepared_dir(tmp_path)
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(store.StoreError, match="unreadable"):
        store.PreparedManifest.load(tmp_path)
    (d / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(store.StoreError, match="schema_version 99"):
        store.PreparedManifest.load(tmp_path)


def test_manifests_and_check(tmp_path):
    pm = store.PreparedManifest(fingerprint="f1", n_examples=10, shard_size=4, n_shards=3)
    store.prepared_dir(tmp_path).mkdir(parents=True)
    pm.save(tmp_path)
    assert store.PreparedManifest.load(tmp_path) == pm
    assert [pm.shard_rows(j) for j in range(3)] == [4, 4, 2]
    tm = store.TeacherManifest(source="s", model="m", mode="train", tokenizer_hash="h", vocab_size=100, k=K,
                               prepared_fingerprint="f1", shard_size=4, n_shards=3)
    store.teacher_dir(tmp_path, "s", "train").mkdir(parents=True)
    tm.save(tmp_path)
    store.update_manifest(tmp_path, "s", "train", 1, {"file": "x", "rows": 4, "tokens": 17, "bytes": 1})
    back = store.TeacherManifest.load(tmp_path, "s", "train")
    assert back.completed == {"1": {"file": "x", "rows": 4, "tokens": 17, "bytes": 1}} and back.tokens == 17
    path = store.TeacherManifest.path(tmp_path, "s", "train")
    back.check(path, prepared=pm, tokenizer_hash="h", vocab_size=100, k=K)
    with pytest.raises(store.StoreError, match=r"manifest.json: tokenizer_hash is 'h' but expected 'other'"):
        back.check(path, tokenizer_hash="other")
    pm2 = store.PreparedManifest(fingerprint="f2", n_examples=10, shard_size=4, n_shards=3)
    with pytest.raises(store.StoreError, match="prepared_fingerprint is 'f1' but expected 'f2'"):
        back.check(path, prepared=pm2)
    with pytest.raises(ValueError, match="mode"):
        store.teacher_dir(tmp_path, "s", "eval")


def test_owned_shards_partition():
    for world in (1, 2, 3, 5):
        got = sorted(j for r in range(world) for j in store.owned_shards(11, r, world))
        assert got == list(range(11))
    with pytest.raises(ValueError, match="rank=2"):
        store.owned_shards(4, 2, 2)


def test_stale_tmp_removed_and_parquet_options(tmp_path):
    (tmp_path / "part-00001.parquet.tmp-123").write_bytes(b"half")
    (tmp_path / "part-00002.parquet.tmp-9").write_bytes(b"half")
    assert store.remove_stale_tmp(tmp_path, [1]) == 1
    assert (tmp_path / "part-00002.parquet.tmp-9").exists()
    rb = make_records(np.random.default_rng(3), RESPONSES)
    store.write_table_atomic(rb.to_table(), tmp_path / "a.parquet")
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    cols = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert cols["topk_logprobs.list.element"].compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in cols["topk_ids.list.element"].encodings
