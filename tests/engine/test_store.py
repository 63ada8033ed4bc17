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
        lp -= np.log(np.exp(lp).sum(1, keepdims=True) + 0.1)  # the top-k of a distribution: sum < 1
        klp.append(lp)
        kid.append(rng.integers(0, 1000, (R, K)))
        lps.append(lp[:, 0] - rng.exponential(0.1, R))
        nb.append(len(r.encode()) + int(ends_turn))
    lens = [len(x) for x in ids]
    return store.TeacherShard(
        example_ids=[f"e{i}" for i in range(len(responses))], responses=list(responses),
        prompt_shas=[store.prompt_fingerprint(f"prompt {i}", None) for i in range(len(responses))],
        tok_off=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), offsets=np.concatenate(offs),
        token_ids=np.concatenate(ids).astype(np.int32), token_logprobs=np.concatenate(lps).astype(np.float32),
        topk_ids=np.concatenate(kid).astype(np.int32), topk_logprobs=np.concatenate(klp).astype(np.float32),
        n_bytes=np.array(nb, np.int32))


RESPONSES = ["abc", "", "héllo wörld", "x" * 50]


def test_round_trip_and_schema(tmp_path):
    rng = np.random.default_rng(0)
    rb = make_records(rng, RESPONSES)
    path = tmp_path / store.shard_name(0)
    info = store.write_table_atomic(rb.to_table(), path)
    assert info.bytes == path.stat().st_size and info.sha256 == store.file_sha256(path)
    assert not list(tmp_path.glob("*.tmp-*"))
    t = store.read_table(path)
    assert t.schema == store.TEACHER_SCHEMA
    back = store.read_teacher_shard(path, K, None, gold=False)
    assert back.n_rows == len(RESPONSES) and not back.invalid.any()
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
        prompt_shas=[store.prompt_fingerprint(f"prompt {i}", None) for i in range(n)],
        tok_off=np.arange(0, n * R + 1, R, dtype=np.int64),
        offsets=np.stack([np.tile(np.arange(R), n), np.tile(np.arange(R), n) + 1], 1).astype(np.int32),
        token_ids=vocab_ids[order[:, 0]].astype(np.int32),
        token_logprobs=np.take_along_axis(lp, order[:, :1], 1)[:, 0].astype(np.float32),
        topk_ids=vocab_ids[order].astype(np.int32), topk_logprobs=np.take_along_axis(lp, order, 1).astype(np.float32),
        n_bytes=np.full(n, R, np.int32))
    size = store.write_table_atomic(rb.to_table(), tmp_path / "p.parquet").bytes
    assert size / (n * R) < 40


PREPARED = pa.table({"example_id": [f"e{i}" for i in range(4)], "prompt": [f"prompt {i}" for i in range(4)],
                     "response": RESPONSES, "system": pa.array([None] * 4, pa.string())})


def test_structural_errors_fail_the_shard(tmp_path):
    t = make_records(np.random.default_rng(2), RESPONSES).to_table()
    path = tmp_path / "part-00000.parquet"

    def replace(col, i, value):
        vals = t[col].to_pylist()
        vals[i] = value
        return t.set_column(t.schema.get_field_index(col), col, pa.array(vals, t.schema.field(col).type))

    with pytest.raises(store.StoreError, match=r"part-00000.parquet: row 0: n_tokens=7"):
        store.TeacherShard.from_table(replace("n_tokens", 0, 7), path, K)
    with pytest.raises(store.StoreError, match=r"row 3: topk_ids has"):
        store.TeacherShard.from_table(replace("topk_ids", 3, [1, 2]), path, K)
    with pytest.raises(store.StoreError, match="lacks columns"):
        store.TeacherShard.from_table(t.drop(["nll_sum"]), path, K)
    other = PREPARED.set_column(0, "example_id", pa.array(["e0", "zz", "e2", "e3"]))
    with pytest.raises(store.StoreError, match=r"row 1: example_id 'e1' but the prepared shard has 'zz'"):
        store.TeacherShard.from_table(t, path, K).validate(other)


def _flip(t: pa.Table, col: str, i: int, fn) -> pa.Table:
    vals = t[col].to_pylist()
    vals[i] = fn(vals[i])
    return t.set_column(t.schema.get_field_index(col), col, pa.array(vals, t.schema.field(col).type))


def _set(lst, j, v):
    lst = list(lst)
    lst[j] = v
    return lst


# (column, row, edit, fragment of the reason): every value a corrupt byte or an edit can produce
INVALID = [
    ("pred_offsets", 2, lambda o: _set(o, len(o) - 1, 99), "pred_offsets do not fit"),
    ("n_bytes", 2, lambda n: 5, "n_bytes=5"),
    ("topk_logprobs", 1, lambda lp: [x + 5.0 for x in lp], "positive top-k log-probability"),
    ("topk_logprobs", 3, lambda lp: _set(lp, 1, 0.0), "not descending"),
    ("topk_logprobs", 2, lambda lp: [-0.1] * len(lp), "top-k probabilities sum above 1"),  # logits - max logit
    ("topk_logprobs", 0, lambda lp: _set(lp, 0, float("nan")), "non-finite top-k"),
    ("topk_ids", 0, lambda ids: _set(ids, 2, 1000), "top-k id outside [-1, 1000)"),
    ("token_ids", 3, lambda ids: _set(ids, 0, -4), "token id outside"),
    ("token_logprobs", 2, lambda lp: _set(lp, 0, 0.5), "positive token log-probability"),
    ("nll_sum", 3, lambda x: x - 3.0, "nll_sum is not the sum"),
    ("nll_sum", 0, lambda x: -1.0, "nll_sum is not the sum"),
    ("prompt_sha", 1, lambda x: "0" * 16, "prompt fingerprint differs"),
]


@pytest.mark.parametrize("col, row, edit, why", INVALID, ids=[f"{c}-{w.split()[0]}" for c, _, _, w in INVALID])
def test_invalid_values_are_named_per_row(tmp_path, col, row, edit, why):
    t = make_records(np.random.default_rng(2), RESPONSES).to_table()
    shard = store.TeacherShard.from_table(_flip(t, col, row, edit), tmp_path / "part-00000.parquet", K)
    problems = shard.validate(PREPARED, vocab_size=1000)
    assert list(problems) == [row] and why in problems[row], problems
    assert shard.invalid.tolist() == [i == row for i in range(4)]
    clean = store.TeacherShard.from_table(t, tmp_path / "part-00000.parquet", K)
    assert clean.validate(PREPARED, vocab_size=1000) == {} and not clean.invalid.any()


def test_gold_responses_and_nan_rows(tmp_path):
    t = make_records(np.random.default_rng(2), RESPONSES).to_table()
    gold = PREPARED.set_column(2, "response", pa.array(["abc", "", "other", "x" * 50]))
    shard = store.TeacherShard.from_table(t, tmp_path / "p.parquet", K)
    assert shard.validate(gold) == {}  # inference mode: the stored response is the generated one
    assert "differs from the prepared gold" in shard.validate(gold, gold=True)[2]
    nan = store.TeacherShard.from_table(_flip(t, "nll_sum", 1, lambda x: float("nan")), tmp_path / "p.parquet", K)
    nan.validate(PREPARED)
    assert nan.invalid.tolist() == [False, True, False, False] and "NaN" in nan.problem(1)


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
    assert store.remove_stale_tmp(tmp_path, [store.shard_name(1)]) == 1
    assert (tmp_path / "part-00002.parquet.tmp-9").exists()
    rb = make_records(np.random.default_rng(3), RESPONSES)
    store.write_table_atomic(rb.to_table(), tmp_path / "a.parquet")
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    cols = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert cols["topk_logprobs.list.element"].compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in cols["topk_ids.list.element"].encodings
