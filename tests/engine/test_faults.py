"""Fault injection: corrupt, kill, crowd, fill and poison what the engine stores, and check that nothing wrong
ever reaches a gradient.

    bit flips    random bits of every stored file kind (prepared shards and manifest, teacher shards and
                 manifests of both modes, votes, the vocabulary-map cache, checkpoint files): each flip is
                 detected (a named error, or a warning and a rebuild) or provably harmless (the reader's
                 output is identical to the clean run's); never a silent difference
    SIGKILL      teach, generate and score killed at random points and re-run: byte-identical stores;
                 training killed and resumed: tests/engine/trainer/test_train.py (identical losses)
    two writers  two `profuser teach` on one store: the second fails naming the owner, or waits (--wait) and
                 finds the shards done; counters count each shard once
    disk full    ENOSPC in the middle of teach / generate / score / a checkpoint: one named error, no
                 temporary file left, the re-run completes identically
    pickles      a planted pickle in a checkpoint is refused, never run
    configs      every bad value fails in seconds, before a model loads, naming the key

The fast half runs in CI (FLIPS flips per file kind); `-m slow` runs many more flips and kill points.
Set PROFUSER_FAULT_REPORT=path to write the counts as JSON (the README's Reliability figures).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from helpers.checkpoints import FakeEngine, Planted, fake_checkpoints
from profuser.engine import store
from profuser.engine.fileio import LockError
from profuser.engine.text import align
from profuser.engine.tools import synthetic as fx
from profuser.engine.trainer import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
FLIPS = int(os.environ.get("PROFUSER_FAULT_FLIPS", "6"))
COUNTS: dict = {}


def record(what: str, outcome: str) -> None:
    COUNTS.setdefault(what, {}).setdefault(outcome, 0)
    COUNTS[what][outcome] += 1
    report = os.environ.get("PROFUSER_FAULT_REPORT")
    if report:
        Path(report).write_text(json.dumps(COUNTS, indent=1, sort_keys=True))


def flip_random_bit(path: Path, rng: np.random.Generator) -> bytes:
    """Flip one random bit of `path` in place; returns the original bytes."""
    data = path.read_bytes()
    i = int(rng.integers(len(data)))
    path.write_bytes(data[:i] + bytes([data[i] ^ (1 << int(rng.integers(8)))]) + data[i + 1:])
    return data


# ---------------------------------------------------------------------------------------------------------
# bit flips in the stores


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    toks = {"smollm2": helpers.tokenizer("smollm2"), "gpt2": helpers.tokenizer("gpt2")}
    ex = fx.corpus(16, system_every=5)
    pm = fx.write_prepared(root, ex, 8)
    for s, (name, tok) in enumerate(toks.items()):
        fx.write_teacher(root, name, "train", tok, f"{name}-model", ex, pm, k=4, seed=s)
        fx.write_teacher(root, name, "infer", tok, f"{name}-model", ex, pm, k=4, seed=10 + s,
                         responses=[fx.infer_response(name, e) for e in ex])
    fx.write_votes(root, [e["example_id"] for e in ex], [list(toks)[i % 2] for i in range(len(ex))])
    return root, toks


def read_everything(root, toks) -> list:
    """What training would see: every batch of both modes, their vocab maps."""
    out = []
    for mode in ("train", "infer"):
        ld = helpers.fusion_loader(root, toks["smollm2"], sources=["smollm2", "gpt2"], student="smollm2-model",
                              mode=mode, k=4, micro_batch_size=4, shuffle_buffer=1,
                              teacher_tokenizers={"gpt2": toks["gpt2"]})
        out += [b for b in ld]
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


STORE_FILES = {
    "prepared shard": "prepared/part-00001.parquet",
    "prepared manifest": "prepared/manifest.json",
    "teacher shard (train)": "teachers/gpt2/train/part-00000.parquet",
    "teacher manifest (train)": "teachers/smollm2/train/manifest.json",
    "teacher shard (infer)": "teachers/smollm2/infer/part-00001.parquet",
    "teacher manifest (infer)": "teachers/gpt2/infer/manifest.json",
    "votes table": "scores/votes.parquet",
    "votes index": "scores/votes.json",
}


@pytest.mark.parametrize("kind", list(STORE_FILES))
def test_bit_flips_in_stores_are_detected(stores, kind):
    root, toks = stores
    clean = read_everything(root, toks)
    path = root / STORE_FILES[kind]
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
    for _ in range(FLIPS):
        original = flip_random_bit(path, rng)
        try:
            got = read_everything(root, toks)
            outcome = "harmless" if same(got, clean) else "SILENT"
        except (store.StoreError, ValueError) as exc:
            assert str(path) in str(exc) or STORE_FILES[kind].split("/")[-1] in str(exc), str(exc)
            outcome = "detected"
        finally:
            path.write_bytes(original)
        record(f"bit flip: {kind}", outcome)
        assert outcome != "SILENT", f"a flipped bit in {path} changed the batches silently"
    assert same(read_everything(root, toks), clean)


def test_bit_flips_in_the_vocab_map_cache_are_repaired(stores, tmp_path):
    _, toks = stores
    kw = dict(method="exact", cache_dir=tmp_path)
    clean = align.build_vocab_map(toks["gpt2"], toks["smollm2"], **kw)
    (path,) = tmp_path.glob("*.npy")
    rng = np.random.default_rng(5)
    for _ in range(FLIPS):
        flip_random_bit(path, rng)
        with pytest.warns(UserWarning, match="does not match its digest"):
            again = align.build_vocab_map(toks["gpt2"], toks["smollm2"], **kw)
        assert (again == clean).all()  # rebuilt, never the corrupt cache
        record("bit flip: vocab map cache", "detected")


# ---------------------------------------------------------------------------------------------------------
# checkpoints: verified before DeepSpeed reads them, a planted pickle is never run


def test_bit_flips_in_checkpoints_fall_back_or_refuse(tmp_path):
    d = fake_checkpoints(tmp_path)
    assert ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="digest") == d / "step00000004"
    rng = np.random.default_rng(7)
    newest = d / "step00000004"
    files = sorted(p for p in newest.iterdir() if p.is_file()) + [d / "latest"]
    for _ in range(FLIPS):
        for f in files:
            original = flip_random_bit(f, rng)
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    got = ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="digest")
            finally:
                f.write_bytes(original)
            # a damaged file: a warning naming it and the previous checkpoint, never the damaged one; a damaged
            # `latest` pointer: a warning, and the newest intact step folder
            want = newest if f.name == "latest" else d / "step00000002"
            assert got == want and any("damaged" in str(w.message) for w in seen), (f, [str(w.message) for w in seen])
            record(f"bit flip: checkpoint {f.name if f.name != 'latest' else 'latest pointer'}", "detected")


def test_resume_refuses_another_config_and_a_foreign_folder(tmp_path):
    d = fake_checkpoints(tmp_path)
    with pytest.raises(ckpt.ResumeError, match="another configuration"):
        ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="other")
    assert ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="other", allow_foreign=True)
    (d / "step00000004" / ckpt.INFO).unlink()
    with pytest.warns(UserWarning, match="profuser_checkpoint.json is missing"):  # the older one is fine
        got = ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="digest")
        assert got.name == "step00000002"
    (d / "step00000002" / ckpt.INFO).unlink()
    with pytest.raises(ckpt.ResumeError, match="not written by profuser train"), pytest.warns(UserWarning):
        ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="digest")


def test_a_planted_pickle_is_refused_not_run(tmp_path):
    d = fake_checkpoints(tmp_path, steps=(2,))
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "rng": Planted(str(marker))}, d / "step00000002" / "trainer_rank00000.pt")
    with pytest.raises(ckpt.ResumeError, match="trainer_rank00000.pt: holds objects other than tensors"):
        ckpt.load(None, d / "step00000002", rank=0)
    assert not marker.exists()
    record("planted pickle", "refused")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    d = fake_checkpoints(tmp_path, steps=(2,))
    with pytest.raises(ckpt.CheckpointError, match="no space left on device.*previous checkpoint is intact"):
        ckpt.save(FakeEngine(fail=OSError(errno.ENOSPC, "No space left on device")), d, ckpt.tag_for(4),
                  {"step": 4, "loaders": {}}, "x: 1\n", config_digest="digest", rank=0, world_size=1)
    assert not list(d.glob("tmp-*")) and (d / "latest").read_text() == "step00000002"
    assert ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="digest") == d / "step00000002"
    record("disk full: checkpoint", "named error, previous kept")


@pytest.fixture
def full_disk(tmp_path):
    """A real filesystem with no space left: a 1 MiB tmpfs, filled (needs root; skipped elsewhere)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class TorchSavingEngine(FakeEngine):
    """Writes its state with torch.save, as DeepSpeed does: on a full disk torch raises a bare RuntimeError
    ("unexpected pos ..."), not an OSError."""

    def save_checkpoint(self, root, tag, save_latest=False):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": torch.zeros(1 << 20)}, d / "mp_rank_00_model_states.pt")


def test_a_really_full_disk_during_a_checkpoint_is_disk_full_error_naming_the_folder(full_disk):
    d = full_disk / "checkpoints"
    d.mkdir()
    with pytest.raises(store.DiskFullError) as e:
        ckpt.save(TorchSavingEngine(), d, ckpt.tag_for(4), {"step": 4, "loaders": {}}, "x: 1\n",
                  config_digest="digest", rank=0, world_size=1)
    assert isinstance(e.value, ckpt.CheckpointError) and str(e.value).startswith(f"{d / 'tmp-step00000004'}: ")
    assert "no space left on device" in str(e.value) and "unexpected pos" not in str(e.value)
    assert not list(d.glob("tmp-*"))
    record("disk full: torch.save in a checkpoint", "DiskFullError, tmp folder removed")


def test_a_really_full_disk_while_creating_a_lock_names_it_and_leaves_no_lock(full_disk):
    lock = full_disk / "part-00000.parquet.lock"
    with pytest.raises(store.DiskFullError, match=f"^{lock}: no space left on device"):
        store.WriterLock(lock, what="shard 0").acquire()
    assert not lock.exists()  # an empty lock would block the re-run ("pid None on host None")
    (full_disk / "filler").unlink()
    with store.WriterLock(lock, what="shard 0"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    record("disk full: lock file", "named, no lock left")


def test_a_full_disk_while_writing_a_lock_leaves_no_empty_lock(tmp_path, monkeypatch):
    from profuser.engine import fileio

    lock = tmp_path / "part-00000.parquet.lock"

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.json, "dump", full)
    with pytest.raises(store.DiskFullError, match=f"^{lock}: no space left on device"):
        store.WriterLock(lock, what="shard 0").acquire()
    assert not lock.exists()
    monkeypatch.undo()
    with store.WriterLock(lock, what="shard 0"):
        pass


def test_a_dangling_symlink_as_a_lock_is_an_error_naming_it(tmp_path):
    lock = tmp_path / "part-00000.parquet.lock"
    lock.symlink_to(tmp_path / "gone")

    def hung(*_):
        raise TimeoutError("acquire looped")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(LockError, match=f"^{lock}: a symbolic link"):
            store.WriterLock(lock, what="shard 0", wait=True, poll_s=0.01).acquire()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    record("dangling symlink lock", "named error")


# ---------------------------------------------------------------------------------------------------------
# teacher passes: full disks, two writers, kills


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from profuser.engine.models import tiny_model_dir

    return str(tiny_model_dir(helpers.need("smollm2-135m-instruct"), out_dir=tmp_path_factory.mktemp("tiny")))


def store_bytes(root: Path, source="src", mode="train") -> dict:
    d = store.teacher_dir(root, source, mode)
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.endswith(".lock")}


def pass_cmd(command: str, root: Path, model: str, *extra, name: str = "src") -> list[str]:
    """A pass in a subprocess with THIS process' intra-op thread count: fp32 reductions (and so the stored
    bytes) depend on the thread count, and the stores written here are compared byte for byte with stores
    written in this process (conftest pins one thread per xdist worker; alone, torch picks the core count)."""
    gen = ["--max-new-tokens", "8", "--gen-batch-size", "2"] if command == "generate" else []
    return [sys.executable, "-m", "profuser.engine.cli", command, "--data-dir", str(root), "--source", model,
            "--name", name, "--k", "4", "--no-progress", "--batch-tokens", "64",
            "--threads", str(torch.get_num_threads()), *gen, *extra]


def teach_cmd(root: Path, model: str, *extra) -> list[str]:
    return pass_cmd("teach", root, model, *extra)


@pytest.fixture(scope="module")
def reference_stores(tiny, tmp_path_factory):
    """{command: store bytes} of uninterrupted teach and generate runs."""
    root = tmp_path_factory.mktemp("ref")
    helpers.make_prepared(root, shard_size=2)
    out = {}
    for command, mode in (("teach", "train"), ("generate", "infer")):
        subprocess.run(pass_cmd(command, root, tiny), check=True, capture_output=True, timeout=300)
        out[command] = store_bytes(root, mode=mode)
    return out


@pytest.fixture(scope="module")
def reference_store(reference_stores):
    return reference_stores["teach"]


def test_a_full_disk_during_teach_is_one_named_error_and_the_rerun_completes(tiny, reference_store, tmp_path,
                                                                             monkeypatch):
    from profuser.engine.passes import options, teach
    from profuser.engine.store import files

    helpers.make_prepared(tmp_path, shard_size=2)
    real, calls = files.pq.write_table, []

    def full_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(files.pq, "write_table", full_on_second)
    cfg = options.PassConfig(data_dir=str(tmp_path), sources=[tiny], names=["src"], k=4, progress=False,
                             batch_tokens=64)
    with pytest.raises(store.DiskFullError, match=r"part-00001.parquet: no space left on device"):
        teach.teach(cfg)
    assert not list(store.teacher_dir(tmp_path, "src", "train").glob("*.tmp-*"))
    monkeypatch.setattr(files.pq, "write_table", real)
    teach.teach(cfg)
    assert store_bytes(tmp_path) == reference_store
    record("disk full: teach", "named error, rerun identical")


def test_score_and_votes_on_a_full_disk(stores, monkeypatch, tmp_path):
    from profuser.engine.passes import score as S
    from profuser.engine.store import manifests

    root = tmp_path / "s"
    shutil.copytree(stores[0], root)

    class Const(S.Scorer):
        name = "const"

        def score(self, prompts, responses, references, systems=None):
            return np.arange(len(prompts), dtype=np.float64)

    monkeypatch.setattr(manifests, "write_table_atomic", lambda *a, **kw: (_ for _ in ()).throw(
        store.DiskFullError(errno.ENOSPC, "votes.parquet: no space left on device")))
    with pytest.raises(store.DiskFullError, match="no space left"):
        S.score(S.ScoreConfig(data_dir=str(root), sources=["smollm2", "gpt2"]), scorers=[Const()], log=lambda s: None)
    record("disk full: score", "named error")


def test_two_writers_of_one_store(tiny, reference_store, tmp_path):
    helpers.make_prepared(tmp_path, shard_size=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.Popen(teach_cmd(tmp_path, tiny), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    lock_dir = store.teacher_dir(tmp_path, "src", "train")
    t0 = time.time()
    while not list(lock_dir.glob("*.lock")) if lock_dir.exists() else True:  # the first one is writing
        assert first.poll() is None and time.time() - t0 < 120, first.stdout.read() if first.poll() else ""
        time.sleep(0.02)
    second = subprocess.run(teach_cmd(tmp_path, tiny), env=env, capture_output=True, text=True, timeout=300)
    waited = subprocess.run(teach_cmd(tmp_path, tiny, "--wait"), env=env, capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    if second.returncode:  # it met a shard in progress: one line naming the lock, the owner and the way out
        lines = second.stderr.strip().splitlines()
        assert "is being written by pid" in lines[-1] and "--wait" in lines[-1] and "Traceback" not in second.stderr
    assert waited.returncode == 0, waited.stderr
    assert store_bytes(tmp_path) == reference_store  # each shard written once, counted once
    m = store.TeacherManifest.load(tmp_path, "src", "train")
    assert m.counters["n_input_tokens"] > 0 and sum(v["rows"] for v in m.completed.values()) == len(helpers.EXAMPLES)
    record("two writers", "excluded or waited; store identical")


def test_a_stale_lock_of_a_dead_writer_is_taken_over(tiny, reference_store, tmp_path):
    helpers.make_prepared(tmp_path, shard_size=2)
    d = store.teacher_dir(tmp_path, "src", "train")
    d.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (d / "part-00000.parquet.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                            "since": "then"}))
    (d / "part-00000.parquet.tmp-12345").write_bytes(b"half a shard of a killed run")
    subprocess.run(teach_cmd(tmp_path, tiny), check=True, capture_output=True, timeout=300)
    assert store_bytes(tmp_path) == reference_store


KILLS = [("teach", 1.5)] + ([("teach", 0.5), ("teach", 3.0), ("generate", 1.0), ("generate", 2.5),
                             ("generate", 4.0)] if FLIPS > 6 else [])


@pytest.mark.parametrize("command, delay", KILLS)
def test_a_pass_killed_at_a_random_point_resumes_byte_identical(tiny, reference_stores, tmp_path, command, delay):
    helpers.make_prepared(tmp_path, shard_size=2)
    proc = subprocess.Popen(pass_cmd(command, tmp_path, tiny), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(pass_cmd(command, tmp_path, tiny), check=True, capture_output=True, timeout=300)
    assert store_bytes(tmp_path, mode="train" if command == "teach" else "infer") == reference_stores[command]
    record(f"SIGKILL: {command}", "resumed byte-identical")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.0, 3.0, 6.0])
def test_score_killed_at_a_random_point_gives_the_same_votes(tiny, tmp_path, delay):
    helpers.make_prepared(tmp_path, shard_size=2)
    for name in ("a", "b"):
        subprocess.run(pass_cmd("generate", tmp_path, tiny, "--do-sample", "--seed", str(ord(name)), name=name),
                       check=True, capture_output=True, timeout=300)
    score = [sys.executable, "-m", "profuser.engine.cli", "score", "--data-dir", str(tmp_path), "--sources", "a", "b",
             "--scorer", f"judge:{tiny}", "similarity"]
    subprocess.run(score, check=True, capture_output=True, timeout=300)
    reference = (tmp_path / "scores" / "votes.parquet").read_bytes()
    shutil.rmtree(tmp_path / "scores")
    proc = subprocess.Popen(score, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(score, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "scores" / "votes.parquet").read_bytes() == reference
    record("SIGKILL: score", "resumed identical votes")


@pytest.mark.slow
def test_the_long_fault_run(tmp_path):
    """This file again with many more flips and kill points; its counts are the README's Reliability figures."""
    report = Path(os.environ.get("PROFUSER_FAULT_REPORT_LONG", tmp_path / "faults.json"))
    env = dict(os.environ, PROFUSER_FAULT_FLIPS="64", PROFUSER_FAULT_REPORT=str(report))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not slow"],
                       env=env, capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-4000:]
    counts = json.loads(report.read_text())
    assert not any("SILENT" in c for c in counts.values())


# ---------------------------------------------------------------------------------------------------------
# configs: named, before any model loads, in seconds


@pytest.fixture(scope="module")
def bare_torch_import_s() -> float:
    """Seconds a bare `python -c "import torch"` takes on this machine now (3-6 s on a loaded 2-core CPU):
    the yardstick of "fails fast", so the bound holds on a slow machine and still catches a model load."""
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, timeout=120)
    return time.time() - t0


@pytest.mark.parametrize("override, key", [("optim.lr=-1", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
                                           ("optim.eps=-1", "optim.eps"), ("optim.betas=[2, 3]", "optim.betas"),
                                           ("optim.weight_decay=-5", "optim.weight_decay"),
                                           ("optim.grad_clip=-1", "optim.grad_clip"),
                                           ("loss.temperature=.nan", "loss.temperature"),
                                           ("data.max_length=1", "data.max_length")])
def test_bad_config_values_fail_fast_naming_the_key(override, key, tmp_path, bare_torch_import_s):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "profuser.engine.train", "--config", str(REPO / "configs" / "demo.yaml"),
                        f"output_dir={tmp_path}", override], capture_output=True, text=True, timeout=60)
    elapsed = time.time() - t0
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and f"override {key}: must be in" in lines[0], p.stderr
    assert elapsed < bare_torch_import_s + 5.0, \
        f"{override}: {elapsed:.1f} s (import torch: {bare_torch_import_s:.1f} s)"
    record("bad config value", "named within 5 s of a bare torch import")
