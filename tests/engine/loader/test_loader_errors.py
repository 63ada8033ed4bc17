"""profuser.engine.loader: every bad input gives a clear error naming the file (and row), or is dropped
and counted where the config says so."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

import helpers as rt
from profuser.engine import store
from profuser.engine.config import ConfigError
from profuser.engine.loader.loader import DataError
from profuser.engine.text import chat
from profuser.engine.tools import synthetic as fx

N, SHARD = 12, 4


@pytest.fixture(scope="module")
def toks():
    return {"smollm2": rt.load("smollm2"), "gpt2": rt.load("gpt2")}


def set_cell(table: pa.Table, name: str, row: int, value) -> pa.Table:
    col = table[name].to_pylist()
    col[row] = value
    i = table.column_names.index(name)
    return table.set_column(i, name, pa.array(col, table.schema.field(name).type))


def build(root, toks, *, mutate=None, mode="train", fingerprint="fp-test"):
    ex = fx.corpus(N)
    pm = fx.write_prepared(root, ex, SHARD)
    fx.write_teacher(root, "smollm2", mode, toks["smollm2"], "smollm2-135m-instruct", ex, pm, seed=1,
                     responses=[fx.infer_response("smollm2", e) for e in ex] if mode == "infer" else None)
    if fingerprint != pm.fingerprint:
        pm = store.PreparedManifest(fingerprint=fingerprint, n_examples=pm.n_examples, shard_size=SHARD,
                                    n_shards=pm.n_shards)
    fx.write_teacher(root, "gpt2", mode, toks["gpt2"], "gpt2-local", ex, pm, seed=2, mutate=mutate,
                     responses=[fx.infer_response("gpt2", e) for e in ex] if mode == "infer" else None)
    return ex


def make(root, toks, mode="train", teacher_tok=None, **kw):
    kw.setdefault("micro_batch_size", 4)
    return rt.fusion_loader(root, toks["smollm2"], sources=["smollm2", "gpt2"], student="smollm2-135m-instruct",
                            mode=mode, teacher_tokenizers={"gpt2": teacher_tok or toks["gpt2"]}, **kw)


def shard_path(root, j, source="gpt2", mode="train"):
    return store.teacher_dir(root, source, mode) / store.shard_name(j)


def test_example_id_mismatch_names_file_and_row(tmp_path, toks):
    build(tmp_path, toks, mutate=lambda j, t: set_cell(t, "example_id", 2, "intruder") if j == 1 else t)
    with pytest.raises(DataError, match=re.escape(str(shard_path(tmp_path, 1))) + r".*row 2.*intruder"):
        list(make(tmp_path, toks))


def nan_at(j0, row):
    def mutate(j, t):
        if j != j0:
            return t
        lps = t["token_logprobs"][row].as_py()
        lps[0] = float("nan")
        return set_cell(t, "token_logprobs", row, lps)
    return mutate


def test_nan_error_names_file_and_row(tmp_path, toks):
    build(tmp_path, toks, mutate=nan_at(0, 1))
    where = re.escape(str(shard_path(tmp_path, 0)))
    with pytest.raises(DataError, match=where + r": row 1 .*non-finite token log-probability"):
        list(make(tmp_path, toks, shuffle_buffer=1))


def test_nan_drop_counts_and_warns(tmp_path, toks):
    ex = build(tmp_path, toks, mutate=nan_at(2, 3))
    ld = make(tmp_path, toks, bad_row_policy="drop")
    with pytest.warns(UserWarning, match="dropped 1 example"):
        got = [e for b in ld for e in b["example_ids"]]
    assert sorted(got) == sorted(e["example_id"] for i, e in enumerate(ex) if i != 2 * SHARD + 3)
    assert ld.stats["dropped_bad"] == 1


def test_nan_of_a_non_winner_is_ignored_in_infer_mode(tmp_path, toks):
    ex = build(tmp_path, toks, mode="infer", mutate=nan_at(0, 1))
    ids = [e["example_id"] for e in ex]
    fx.write_votes(tmp_path, ids, ["smollm2" if i == 1 else "gpt2" for i in range(N)])  # gpt2 loses row 1
    assert sorted(e for b in make(tmp_path, toks, mode="infer") for e in b["example_ids"]) == sorted(ids)
    fx.write_votes(tmp_path, ids, ["gpt2"] * N)  # now the NaN record is the winner's
    with pytest.raises(DataError, match=r"row 1 .*non-finite token log-probability"):
        list(make(tmp_path, toks, mode="infer"))


def test_votes_errors_name_the_votes_file(tmp_path, toks):
    ex = build(tmp_path, toks, mode="infer")
    ids = [e["example_id"] for e in ex]
    votes = fx.write_votes(tmp_path, ids, ["gpt2"] * (N - 1) + ["mystery-model"])
    with pytest.raises(DataError, match=re.escape(str(votes)) + r".*row 11.*mystery-model"):
        make(tmp_path, toks, mode="infer")
    fx.write_votes(tmp_path, ids[:-1], ["gpt2"] * (N - 1))
    with pytest.raises(DataError, match=r"votes.parquet: no vote for example"):
        list(make(tmp_path, toks, mode="infer", shuffle_buffer=1))
    (tmp_path / "scores" / "votes.parquet").unlink()
    with pytest.raises(DataError, match=r"votes.parquet: votes table file is missing"):
        make(tmp_path, toks, mode="infer")


def test_fingerprint_mismatch_names_the_manifest(tmp_path, toks):
    build(tmp_path, toks, fingerprint="fp-other")
    with pytest.raises(DataError, match=re.escape(str(store.TeacherManifest.path(tmp_path, "gpt2", "train")))
                       + r".*prepared_fingerprint"):
        make(tmp_path, toks)


def test_tokenizer_hash_and_model_mismatch(tmp_path, toks):
    build(tmp_path, toks)
    manifest = re.escape(str(store.TeacherManifest.path(tmp_path, "gpt2", "train")))
    with pytest.raises(DataError, match=manifest + r": tokenizer_hash"):
        make(tmp_path, toks, teacher_tok=rt.load("mistral-sp"))
    with pytest.raises(DataError, match=manifest + r": model is 'gpt2-local' but .*source_models names 'gpt2-other'"):
        make(tmp_path, toks, source_models={"gpt2": "gpt2-other"})


def test_missing_and_corrupt_shards(tmp_path, toks):
    build(tmp_path, toks)
    p = shard_path(tmp_path, 1)
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])  # truncated: no longer the file the manifest recorded
    with pytest.raises(DataError, match=re.escape(str(p)) + r": teacher shard content digest .* differs"):
        list(make(tmp_path, toks, shuffle_buffer=1))
    p.unlink()
    with pytest.raises(DataError, match=re.escape(str(p)) + r": teacher shard file is missing"):
        list(make(tmp_path, toks, shuffle_buffer=1))
    p.write_bytes(good)
    mpath = store.TeacherManifest.path(tmp_path, "gpt2", "train")
    m = store.TeacherManifest.load(tmp_path, "gpt2", "train")  # a run killed before shard 2 was recorded
    del m.completed["2"]
    m.save(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(mpath)) + r": shards \[2\] of 3 are not completed"):
        make(tmp_path, toks)
    mpath.unlink()
    with pytest.raises(DataError, match=re.escape(str(mpath)) + ": teacher manifest not found"):
        make(tmp_path, toks)


def test_offsets_or_response_not_matching_the_text(tmp_path, toks):
    def past_the_end(j, t):
        return set_cell(t, "pred_offsets", 0, [0, 9999] + t["pred_offsets"][0].as_py()[2:]) if j == 0 else t

    build(tmp_path, toks, mutate=past_the_end)
    with pytest.raises(DataError, match=re.escape(str(shard_path(tmp_path, 0))) + r": row 0 .*: pred_offsets"):
        list(make(tmp_path, toks, shuffle_buffer=1))
    build(tmp_path, toks, mutate=lambda j, t: set_cell(t, "response", 3, t["response"][3].as_py().swapcase())
          if j == 0 else t)
    where = re.escape(str(shard_path(tmp_path, 0)))
    with pytest.raises(DataError, match=where + r": row 3 .*: stored response differs"):
        list(make(tmp_path, toks, shuffle_buffer=1))


def test_bad_config_values(tmp_path, toks):
    build(tmp_path, toks)
    with pytest.raises(ValueError, match="mode must be one of"):
        make(tmp_path, toks, mode="both")
    for field, value in (("advantage", "maxCE"), ("advantage_level", "doc"), ("ce_metric", "per_char"),
                         ("align_method", "dtw"), ("bad_row_policy", "ignore"), ("vocab_map", "nearest"),
                         ("micro_batch_size", 0), ("pad_to_multiple_of", 0), ("k", 0), ("max_length", 1)):
        with pytest.raises(ConfigError, match=f"^data.{field}: "):  # the key as training's config names it
            make(tmp_path, toks, **{field: value})
    with pytest.raises(ConfigError, match=r"^data.sources: has duplicates"):
        rt.fusion_loader(tmp_path, toks["smollm2"], sources=["gpt2", "gpt2"], student="smollm2-135m-instruct")
    with pytest.raises(DataError, match=r"smollm2/train/manifest.json: stores k=8 but data.k=9"):
        make(tmp_path, toks, k=9)
    with pytest.raises(ValueError, match="no candidate teacher"):
        rt.fusion_loader(tmp_path, toks["smollm2"], sources=["smollm2"], student="smollm2-135m-instruct",
                         student_as_candidate=False)


def test_prompt_longer_than_max_length_is_dropped_and_counted(tmp_path, toks):
    ex = build(tmp_path, toks)
    # SmolLM2's default system prompt makes a ~45-token prefix; the custom "You are terse." one a short one
    ok = []
    for e in ex:
        try:
            chat.encode_example(toks["smollm2"], e["prompt"], e["response"], system=e["system"],
                                max_length=40)
            ok.append(e["example_id"])
        except ValueError:
            pass
    assert 0 < len(ok) < N
    ld = make(tmp_path, toks, max_length=40, pad_to_multiple_of=1)
    with pytest.warns(UserWarning, match="exceeds data.max_length=40"):
        batches = list(ld)
    assert sorted(e for b in batches for e in b["example_ids"]) == sorted(ok)
    assert ld.stats["dropped_long"] == N - len(ok)
    assert all(b["input_ids"].shape[1] <= 40 for b in batches)
