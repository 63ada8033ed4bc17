"""The shard driver: every source of a pass through its (source, mode) store, shard by shard.

    run_pass      each source loaded in turn on this rank's device, its shards computed and recorded
    run_shards    this rank's missing shards of one (source, mode) store: lock, compute, write, record
    open_store    the store's manifest created, or checked against this source and prepared set
    Progress      a tqdm bar over examples with tokens/s

Distribution and resumption: rank r of W owns shards j % W == r (engine/dist.py); each finished shard is
written atomically and recorded in the manifest under its lock (fileio.WriterLock), so a killed run redoes
at most the shard in progress, and two runs on the same shards never interleave.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from .. import dist as _dist
from .. import models
from ..store import (
    PreparedManifest,
    StoreError,
    TeacherManifest,
    TeacherShard,
    WriterLock,
    file_sha256,
    owned_shards,
    read_prepared_shard,
    read_teacher_shard,
    remove_stale_tmp,
    shard_name,
    teacher_dir,
    update_manifest,
    write_table_atomic,
)
from . import vllm_engine
from .forward import load_source
from .options import PassConfig

log = logging.getLogger("profuser.passes")




class Progress:
    """tqdm over examples with a tokens/s postfix (silent when disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.t0, self.tokens = time.perf_counter(), 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, mininterval=2.0)

    def update(self, examples: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(examples)
            self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):.0f}")

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)


def open_store(cfg: PassConfig, name: str, spec: str, mode: str, tok_hash: str, vocab_size: int,
               prepared: PreparedManifest, generation: dict | None = None) -> TeacherManifest:
    """Create the (source, mode) manifest, or check an existing one (StoreError naming it on mismatch).

    The manifest records the source canonically (an alias, or the absolute path of its folder) with the
    model's fingerprint, so the store means the same thing from any working directory."""
    folder = teacher_dir(cfg.data_dir, name, mode)
    folder.mkdir(parents=True, exist_ok=True)
    path = TeacherManifest.path(cfg.data_dir, name, mode)
    fingerprint = models.model_fingerprint(spec)
    fresh = TeacherManifest(source=name, model=models.canonical_spec(spec), mode=mode, tokenizer_hash=tok_hash,
                            vocab_size=int(vocab_size), k=cfg.k, prepared_fingerprint=prepared.fingerprint,
                            shard_size=prepared.shard_size, n_shards=prepared.n_shards, generation=generation,
                            model_fingerprint=fingerprint)
    with WriterLock(Path(str(path) + ".lock"), what=f"the manifest {path}", wait=True, poll_s=0.02):
        if path.exists():
            try:
                old = TeacherManifest.load(cfg.data_dir, name, mode)
                old.check(path, prepared=prepared, tokenizer_hash=tok_hash, vocab_size=int(vocab_size), k=cfg.k,
                          model_fingerprint=fingerprint if old.model_fingerprint else None)
                if not old.model_fingerprint and not models.same_model(old.model, spec):
                    raise StoreError(f"{path}: model is {old.model!r} but expected {spec!r} (store of another "
                                     "model; delete the folder or pass --overwrite)")
                settings = {k: v for k, v in (old.generation or {}).items() if not k.startswith("n_")}
                if mode == "infer" and generation is not None and settings != generation:
                    raise StoreError(f"{path}: generation settings {settings} differ from {generation}")
                return old
            except StoreError:
                if not cfg.overwrite:
                    raise
            with ExitStack() as held:  # never delete what a live writer is writing
                for lock in sorted(folder.glob("part-*.parquet.lock")):
                    held.enter_context(WriterLock(lock, what=f"{lock.name[:-5]} (overwrite)", wait=cfg.wait))
                for p in folder.glob("part-*.parquet*"):
                    if not p.name.endswith(".lock"):
                        p.unlink()
        fresh.save(cfg.data_dir)
    return fresh


def adopt_orphan(cfg: PassConfig, name: str, mode: str, j: int, man: TeacherManifest,
                 prepared: PreparedManifest) -> bool:
    """A shard file renamed into place but missing from the manifest (killed in between): check it and record
    it. Call with shard j's lock held. Returns whether it was adopted."""
    path = teacher_dir(cfg.data_dir, name, mode) / shard_name(j)
    if not path.exists():
        return False
    try:
        shard = read_teacher_shard(path, man.k, read_prepared_shard(cfg.data_dir, j, prepared), gold=mode == "train",
                                   vocab_size=int(man.vocab_size))
        if shard.problems:
            raise StoreError(f"{path}: row {min(shard.problems)}: {shard.problems[min(shard.problems)]}")
    except StoreError as exc:
        log.warning("discarding unrecorded shard %s (%s)", path, exc)
        path.unlink()
        return False
    update_manifest(cfg.data_dir, name, mode, j, {
        "file": path.name, "rows": shard.n_rows, "tokens": int(shard.n_tokens.sum()),
        "bytes": path.stat().st_size, "sha256": file_sha256(path),
        "counters": {"n_rows": shard.n_rows, "n_nan_rows": int(np.isnan(shard.nll_sum).sum())}})
    return True


def run_shards(cfg: PassConfig, name: str, spec: str, mode: str, tok_hash: str, vocab_size: int,
               compute: Callable[[int, pa.Table, str, "Progress"], tuple[TeacherShard, dict]],
               generation: dict | None = None,
               after_shard: Callable[[int], None] | None = None) -> dict:
    """Run `compute(j, prepared_shard_j, where, progress) -> (records, counters)` over this rank's missing shards.

    Each shard is computed under its writer lock (fileio.WriterLock): a second writer of the same shard gets
    StoreBusyError (or waits with cfg.wait) and finds the shard complete once it gets the lock.
    Returns {"shards": done, "skipped": already complete, "tokens": n, "tok_s": rate, "bytes": on disk}.
    """
    prepared = PreparedManifest.load(cfg.data_dir)
    di = _dist.dist_info(cfg.rank, cfg.world_size)
    man = open_store(cfg, name, spec, mode, tok_hash, vocab_size, prepared, generation)
    folder = teacher_dir(cfg.data_dir, name, mode)
    mine = owned_shards(prepared.n_shards, di.rank, di.world_size)
    todo = [j for j in mine if str(j) not in man.completed]
    prog = Progress(sum(prepared.shard_rows(j) for j in todo), f"{mode} {name} r{di.rank}", cfg.progress)
    stats = {"shards": 0, "skipped": len(mine) - len(todo), "tokens": 0, "bytes": 0, "nan_rows": 0,
             "input_tokens": 0}
    for j in todo:
        with WriterLock(folder / f"{shard_name(j)}.lock", what=f"shard {j} of {name} ({mode})", wait=cfg.wait):
            man = TeacherManifest.load(cfg.data_dir, name, mode)  # another writer may have finished it
            remove_stale_tmp(folder, [shard_name(j)])  # ours to remove: we hold the shard's lock
            if str(j) in man.completed or adopt_orphan(cfg, name, mode, j, man, prepared):
                stats["skipped"] += 1
                continue
            table = read_prepared_shard(cfg.data_dir, j, prepared)
            where = f"source {name} ({mode}) shard {j}"
            records, counters = compute(j, table, where, prog)
            out = records.to_table()
            info = write_table_atomic(out, folder / shard_name(j), cfg.write)
            tokens = int(out["n_tokens"].to_numpy().sum())
            update_manifest(cfg.data_dir, name, mode, j, {"file": shard_name(j), "rows": out.num_rows,
                                                          "tokens": tokens, "bytes": info.bytes,
                                                          "sha256": info.sha256, "counters": counters})
        stats["shards"] += 1
        stats["tokens"] += tokens
        stats["bytes"] += info.bytes
        stats["nan_rows"] += counters.get("n_nan_rows", 0)
        stats["input_tokens"] += counters.get("n_input_tokens", 0)
        if after_shard is not None:
            after_shard(j)
    stats["tok_s"] = prog.close()  # predicted (stored) tokens per second
    stats["input_tok_s"] = stats["input_tokens"] / max(time.perf_counter() - prog.t0, 1e-9)
    if stats["nan_rows"]:
        warnings.warn(f"{name} ({mode}): {stats['nan_rows']} rows had NaN log-probabilities; stored with "
                      f"nll_sum = NaN so readers skip them", stacklevel=2)
    return stats


def run_pass(cfg: PassConfig, mode: str, shard_fn: Callable, *, generation: dict | None = None,
             after_shard: Callable[[int], None] | None = None, max_model_len: int | None = None) -> dict:
    """Every source of cfg through its (source, `mode`) store, one model at a time on this rank's device.

    shard_fn(model, tok, device, j, prepared_shard_j, where, progress) -> (TeacherShard, counters).
    Returns {source name: run_shards stats}."""
    prepared = PreparedManifest.load(cfg.data_dir)  # fail before loading any model
    if mode == "train":  # teacher forcing reads the gold responses; a prompts-only pool has none
        prepared.require_gold(cfg.data_dir, "teach (the training-mode pass teacher-forces them; use generate)")
    di = _dist.dist_info(cfg.rank, cfg.world_size)
    out = {}
    for spec, name in zip(cfg.sources, cfg.source_names):
        model, tok, device, thash, vocab = load_source(spec, cfg, di.local_rank, max_model_len)
        def compute(j, t, w, p, model=model, tok=tok, device=device):
            return shard_fn(model, tok, device, j, t, w, p)

        stats = run_shards(cfg, name, spec, mode, thash, vocab, compute, generation=generation,
                           after_shard=after_shard)
        out[name] = stats
        inputs = f" ({stats['input_tokens']} input tokens, {stats['input_tok_s']:.0f} tok/s)" \
            if stats["input_tokens"] else ""
        print(f"{mode} {name}: {stats['shards']} shards written, {stats['skipped']} already complete, "
              f"{stats['tokens']} predicted tokens at {stats['tok_s']:.1f} tok/s{inputs}, "
              f"{stats['bytes'] / max(stats['tokens'], 1):.1f} B/token on disk", file=sys.stderr)
        if isinstance(model, vllm_engine.VLLMSource):
            model.close()
        del model
    return out
