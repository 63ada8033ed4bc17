"""`profuser check` (every check of a config's stores, no training) and `profuser repoint` (a moved model),
plus the canonical source identity that makes a store mean the same thing from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from helpers import fusion_loader, make_prepared, need, overrides, training_data
from profuser.engine import models, store
from profuser.engine.config import load_config
from profuser.engine.passes import teach
from profuser.engine.passes.options import PassConfig
from profuser.engine.tools.check import check
from profuser.engine.tools.repoint import repoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("check"), n=16, shard_size=8)


def test_check_passes_clean_stores_and_names_an_invalid_row(data, tmp_path):
    lines = []
    cfg = load_config(None, overrides(data, tmp_path / "out"))
    assert check(cfg, out=lines.append) == 0 and "are fine" in lines[-1]
    assert any(ln.startswith("train self: 16 rows, 0 invalid") for ln in lines)
    # a row whose log-probs were shifted by +5 by a buggy writer (its digest recorded, so only the value
    # checks can see it): check names it and fails; the loader would stop on it (or drop it with policy drop)
    root = tmp_path / "data"
    shutil.copytree(data["data"], root)
    path = store.teacher_dir(root, "gpt2", "train") / store.shard_name(1)
    t = store.read_table(path)
    lps = t["topk_logprobs"].to_pylist()
    lps[2] = [x + 5.0 for x in lps[2]]
    import pyarrow as pa

    info = store.write_table_atomic(t.set_column(t.schema.get_field_index("topk_logprobs"), "topk_logprobs",
                                                 pa.array(lps, t.schema.field("topk_logprobs").type)), path)
    m = store.TeacherManifest.load(root, "gpt2", "train")
    store.update_manifest(root, "gpt2", "train", 1, dict(m.completed["1"], sha256=info.sha256, bytes=info.bytes))
    lines.clear()
    cfg = load_config(None, overrides(data, tmp_path / "out", **{"data.data_dir": str(root)}))
    assert check(cfg, out=lines.append) == 1
    assert any("part-00001.parquet: row 2: positive top-k log-probability" in ln for ln in lines), lines
    assert "would stop training" in lines[-1]


def test_check_refuses_a_data_k_above_what_the_stores_hold(data, tmp_path):
    """The stores hold top-4; data.k=8 is refused by check (and by train, the same check_stores) in seconds,
    naming the manifest and both k; data.k=null takes the smallest stored k."""
    from profuser.engine.store import StoreError

    cfg = load_config(None, overrides(data, tmp_path / "out", **{"data.k": 8}))
    with pytest.raises(StoreError, match=r"self/(train|infer)/manifest.json: stores k=4 top-k entries but data.k=8"):
        check(cfg, out=lambda line: None)
    cfg = load_config(None, overrides(data, tmp_path / "out", **{"data.k": "null"}))
    assert check(cfg, out=lambda line: None) == 0


def test_check_command_names_a_bad_value_in_one_line(data, tmp_path):
    p = subprocess.run([sys.executable, "-m", "profuser.engine.cli", "check",
                        *overrides(data, tmp_path / "out", **{"optim.lr": -1})], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == \
        "profuser check: error: override optim.lr: must be in (0, inf), got -1.0"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.tiny_model_dir(need("smollm2-135m-instruct"), out_dir=tmp_path_factory.mktemp("tiny") / "model")


def test_a_store_records_its_source_canonically_and_follows_a_moved_model(tiny, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny, work / "model")
    data = tmp_path / "data"
    make_prepared(data)
    monkeypatch.chdir(work)  # the source given as a relative path, as users type it
    teach.teach(PassConfig(data_dir=str(data), sources=["model"], names=["self"], k=4, progress=False))
    m = store.TeacherManifest.load(data, "self", "train")
    assert m.model == str((work / "model").resolve()) and m.model_fingerprint.startswith("sha256:")
    monkeypatch.chdir(tmp_path)  # read from another folder: still the student's own source
    with pytest.raises(ValueError, match="no candidate teacher"):
        fusion_loader(data, models.load_tokenizer(work / "model"), sources=["self"], student=str(work / "model"),
                         student_as_candidate=False)
    # the model folder moves (a copy elsewhere: same fingerprint); repoint records where it is now
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(str(work / "model"), moved)
    assert store.TeacherManifest.load(data, "self", "train").is_model(moved)  # by fingerprint
    done = repoint(data, "self", str(moved), log=lambda s: None)
    assert len(done) == 1 and store.TeacherManifest.load(data, "self", "train").model == str(moved.resolve())
    # another model (other weights sizes: another fingerprint) is refused, named; --force accepts it
    other = tmp_path / "other"
    models.tiny_model_dir(need("smollm2-135m-instruct"), hidden=48, heads=4, out_dir=other)
    with pytest.raises(store.StoreError, match="another fingerprint"):
        repoint(data, "self", str(other), log=lambda s: None)
    repoint(data, "self", str(other), force=True, log=lambda s: None)
    with pytest.raises(store.StoreError, match="another tokenizer"):
        repoint(data, "self", str(training_gpt2_tokenizer_model(tmp_path)), log=lambda s: None)


def training_gpt2_tokenizer_model(tmp_path):
    import helpers

    d = tmp_path / "gpt2-model"
    models_dir = models.tiny_model_dir(need("smollm2-135m-instruct"), out_dir=d)
    helpers.tokenizer("gpt2").save_pretrained(models_dir)
    return models_dir


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "profuser.engine.cli", "teach", "--data-dir", str(tmp_path), "--source", "x"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "prepared manifest not found" in p.stderr
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, PROFUSER_DEBUG="1"), timeout=120)
    assert "Traceback" in p.stderr
