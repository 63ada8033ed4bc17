"""What teach, generate and score share: the pass options, the teacher forward, the shard driver.

    PassConfig                options of every teacher pass (sources, k, batching, device, dtype, nan policy)
    forward_predicted         teacher-forced top-k log-probs at the predicted positions of encoded examples
    run_shards                this rank's missing shards of one (source, mode) store: compute, write, record
    load_source               a source model and tokenizer on this rank's device

The teacher forward. At each predicted position p (a response token or the end-of-turn), with hidden
state h_p [H] and the lm_head W [V, H]:

    z = models.output_logits(W h_p)  (the model's own transform: soft-capping, logit scaling),
    lp = log_softmax(z) [V];  store topk(lp, K) (ids int32, log-probs fp16, descending) and lp[token]

Memory: the base model returns hidden states [B, L, H]; only the R predicted rows are gathered ([N, H]),
and the lm_head runs on chunks of those rows sized so one fp32 [rows, V] logits block stays under
`logit_chunk_bytes`. So no [B, L, V] tensor exists, and only [N, K] results leave the device.

Batches: examples of a shard are sorted by length and cut into batches of at most `batch_tokens` padded
tokens (B * L_max) and `max_batch_size` rows (length bucketing keeps padding small). Right padding.

Distribution and resumption: rank r of W owns shards j % W == r (engine/dist.py); each finished shard
is written atomically and recorded in the manifest, so a killed run redoes at most the shard in progress
(engine/store.py). bf16 on GPU, fp32 on CPU (dtype "auto", models.resolve_dtype).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from .. import dist as _dist
from .. import models
from ..config import DTYPES, NAN_POLICIES, TEACHER_ENGINES
from ..store import (PreparedManifest, StoreError, TeacherManifest, TeacherShard, WriteOptions, WriterLock,
                     file_sha256, owned_shards, read_prepared_shard, read_teacher_shard, remove_stale_tmp,
                     shard_name, teacher_dir, update_manifest, write_table_atomic)
from . import vllm_engine

log = logging.getLogger("profuser.passes")


@dataclass
class PassConfig:
    """Options shared by teach and generate (generate.GenerateConfig adds the decoding settings).

    sources: model specs (alias or local folder); names: store folder per source (default: the alias or
    the folder name). batch_tokens: padded tokens per forward (B * L_max). logit_chunk_bytes: cap on one
    fp32 logits block. nan_policy: "error" raises naming the row; "drop" stores the row with nll_sum = NaN
    (every reader then skips it) and warns with a count, keeping shard j row-aligned with prepared shard j.
    engine: "hf" (transformers forward / generate) or "vllm" (vllm_engine.py; options in `vllm`); both write
    the same store. batch_tokens, max_batch_size and logit_chunk_bytes size the transformers engine only
    (vLLM schedules its own batches).
    """

    data_dir: str
    sources: list = field(default_factory=list)
    names: list | None = None
    k: int = 8
    batch_tokens: int = 8192
    max_batch_size: int = 64
    max_length: int | None = 2048
    device: str = "auto"
    dtype: str = "auto"
    logit_chunk_bytes: int = 256 << 20
    nan_policy: str = "error"
    overwrite: bool = False
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True
    threads: int | None = None
    wait: bool = False  # another writer holds a shard's lock: wait for it instead of failing
    write: WriteOptions = field(default_factory=WriteOptions)
    engine: str = "hf"
    vllm: vllm_engine.VLLMOptions = field(default_factory=vllm_engine.VLLMOptions)

    def __post_init__(self):
        if self.engine not in TEACHER_ENGINES:
            raise ValueError(f"engine must be one of {TEACHER_ENGINES}, got {self.engine!r}")
        if self.engine != "vllm" and (self.vllm.tensor_parallel_size > 1 or self.vllm.extra):
            raise ValueError("--tensor-parallel-size and --vllm-arg need --engine vllm")
        if self.engine == "vllm" and self.threads:
            raise vllm_engine.UnsupportedByVLLMError(
                "--threads with --engine vllm: vLLM's CPU backend binds its own threads (set "
                "VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1)")
        if not self.sources:
            raise ValueError("no --source given")
        if self.names is not None and len(self.names) != len(self.sources):
            raise ValueError(f"--name has {len(self.names)} entries for {len(self.sources)} sources")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("batch_tokens and max_batch_size must be >= 1")
        names = self.source_names
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names} (use --name)")

    @property
    def source_names(self) -> list[str]:
        return list(self.names) if self.names else [models.model_name(s) for s in self.sources]


@torch.no_grad()
def topk_logprobs(model, h: torch.Tensor, targets: torch.Tensor | None, k: int, chunk_bytes: int = 256 << 20):
    """Top-k of log_softmax over the full vocabulary for each hidden row, in row chunks.

    Args:
        h: [N, H] hidden states of the predicting positions; targets: [N] int64 or None.
    Returns:
        topk_ids [N, k] int64, topk_lp [N, k] float32 (descending), token_lp [N] float32 (or None).
    """
    V = model.get_output_embeddings().weight.shape[0]
    rows = max(1, chunk_bytes // (4 * V))
    ids, lps, tlp = [], [], []
    for s in range(0, h.shape[0], rows):
        lp = torch.log_softmax(models.output_logits(model, h[s:s + rows]), dim=-1)
        v, i = lp.topk(min(k, V), dim=-1)
        ids.append(i)
        lps.append(v)
        if targets is not None:
            tlp.append(lp.gather(1, targets[s:s + rows, None]).squeeze(1))
    if not ids:
        z = h.new_zeros((0, k))
        return z.long(), z.float(), (z[:, 0].float() if targets is not None else None)
    return torch.cat(ids), torch.cat(lps), (torch.cat(tlp) if targets is not None else None)


@torch.no_grad()
def forward_predicted(model, encs: list, k: int, device: torch.device, pad_id: int,
                      chunk_bytes: int = 256 << 20):
    """Teacher-forced top-k at the predicted positions of a batch of EncodedExamples.

    Returns numpy arrays over the N = sum R predicted tokens in example order:
    topk_ids int32 [N, k], topk_lp float32 [N, k], token_lp float32 [N].
    """
    B, L = len(encs), max(len(e.input_ids) for e in encs)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    mask = np.zeros((B, L), dtype=np.int64)
    for b, e in enumerate(encs):
        ids[b, : len(e.input_ids)] = e.input_ids
        mask[b, : len(e.input_ids)] = 1
    rows_b = np.concatenate([np.full(e.n_predicted, b) for b, e in enumerate(encs)]).astype(np.int64)
    rows_p = np.concatenate([e.pred_pos for e in encs]).astype(np.int64)
    tgt = np.concatenate([e.pred_ids for e in encs]).astype(np.int64)
    hidden = model.base_model(input_ids=torch.from_numpy(ids).to(device),
                              attention_mask=torch.from_numpy(mask).to(device)).last_hidden_state
    h = hidden[torch.from_numpy(rows_b).to(device), torch.from_numpy(rows_p).to(device)]
    ti, tl, tok = topk_logprobs(model, h, torch.from_numpy(tgt).to(device), k, chunk_bytes)
    return ti.int().cpu().numpy(), tl.float().cpu().numpy(), tok.float().cpu().numpy()


def length_batches(lengths: list[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length: B * L_max <= batch_tokens (a longer single example
    gets its own batch), B <= max_batch_size. Sorted by length, longest first (OOM shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in order:
        lmax = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * lmax > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def check_nan(batch: TeacherShard, policy: str, where: str) -> int:
    """NaN log-probs: raise naming the row, or mark the rows (nll_sum becomes NaN). Returns the count."""
    R = batch.n_tokens
    row_of = np.repeat(np.arange(len(batch.example_ids)), R)
    bad_tok = np.isnan(batch.token_logprobs) | np.isnan(batch.topk_logprobs).any(1)
    if not bad_tok.any():
        return 0
    rows = np.unique(row_of[bad_tok])
    if policy == "error":
        raise FloatingPointError(f"{where}: row {rows[0]} (example_id {batch.example_ids[rows[0]]!r}): NaN "
                                 f"log-probabilities from the model ({rows.size} rows; "
                                 f"--nan-policy drop marks them)")
    batch.token_logprobs[np.isin(row_of, rows)] = np.nan
    batch.nll_sum[rows] = np.nan  # readers flag the row (TeacherShard.bad_rows) and apply their nan_policy
    return int(rows.size)


# ---------------------------------------------------------------------------------------------------------
# the shard driver
# ---------------------------------------------------------------------------------------------------------


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
    from filelock import FileLock

    folder = teacher_dir(cfg.data_dir, name, mode)
    folder.mkdir(parents=True, exist_ok=True)
    path = TeacherManifest.path(cfg.data_dir, name, mode)
    fingerprint = models.model_fingerprint(spec)
    fresh = TeacherManifest(source=name, model=models.canonical_spec(spec), mode=mode, tokenizer_hash=tok_hash,
                            vocab_size=int(vocab_size), k=cfg.k, prepared_fingerprint=prepared.fingerprint,
                            shard_size=prepared.shard_size, n_shards=prepared.n_shards, generation=generation,
                            model_fingerprint=fingerprint)
    with FileLock(str(path) + ".lock"):
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

    Each shard is computed under its writer lock (store/locks.py): a second writer of the same shard gets
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
                      f"nll_sum = NaN so readers skip them")
    return stats


def run_pass(cfg: PassConfig, mode: str, shard_fn: Callable, *, generation: dict | None = None,
             after_shard: Callable[[int], None] | None = None, max_model_len: int | None = None) -> dict:
    """Every source of cfg through its (source, `mode`) store, one model at a time on this rank's device.

    shard_fn(model, tok, device, j, prepared_shard_j, where, progress) -> (TeacherShard, counters).
    Returns {source name: run_shards stats}."""
    PreparedManifest.load(cfg.data_dir)  # fail before loading any model
    di = _dist.dist_info(cfg.rank, cfg.world_size)
    out = {}
    for spec, name in zip(cfg.sources, cfg.source_names):
        model, tok, device, thash, vocab = load_source(spec, cfg, di.local_rank, max_model_len)
        stats = run_shards(cfg, name, spec, mode, thash, vocab,
                           lambda j, t, w, p, model=model, tok=tok: shard_fn(model, tok, device, j, t, w, p),
                           generation=generation, after_shard=after_shard)
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


def load_source(spec: str, cfg: PassConfig, local_rank: int, max_model_len: int | None = None):
    """(model, tokenizer, device, tokenizer hash, vocab size) of one source; with engine "vllm" the model is a
    vllm_engine.VLLMSource (max_model_len: its context unless cfg.vllm sets one)."""
    from ..text.align import tokenizer_hash

    if cfg.threads:
        # on a CPU shared with other jobs, 2+ intra-op threads can be ~8x slower than 1 (measured: a
        # SmolLM2 forward took 13.9 s with 2 threads and 1.6 s with 1 at load average 7 on 2 cores)
        torch.set_num_threads(cfg.threads)
    if cfg.engine == "vllm":
        # no torch.cuda call before vLLM starts: its processes must inherit this rank's CUDA_VISIBLE_DEVICES
        kind = "cpu" if cfg.device == "cpu" or (cfg.device == "auto" and not _cuda_visible()) else "cuda"
        device = torch.device(kind)
        model = vllm_engine.load(spec, models.resolve_dtype(cfg.dtype, device), kind, local_rank, cfg.k, cfg.vllm,
                                 max_model_len)
        tok = models.load_tokenizer(spec)
        return model, tok, device, tokenizer_hash(tok), model.vocab_size
    device = _dist.device_for(local_rank, cfg.device)
    # the model first: for an alias it converts the GGUF once, tokenizer included
    model = models.load_model(spec, dtype=models.resolve_dtype(cfg.dtype, device)).to(device)
    tok = models.load_tokenizer(spec)
    vocab = model.get_output_embeddings().weight.shape[0]
    return model, tok, device, tokenizer_hash(tok), vocab


def _cuda_visible() -> bool:
    """Whether this machine has a CUDA device, without initializing CUDA in this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return torch.version.cuda is not None and Path("/proc/driver/nvidia").exists()


def add_common_arguments(p) -> None:
    p.add_argument("--data-dir", required=True)
    p.add_argument("--source", dest="sources", nargs="+", required=True,
                   help=f"model specs: aliases ({', '.join(models.ALIASES)}) or local HF folders")
    p.add_argument("--name", dest="names", nargs="+", default=None, help="store name per source")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--nan-policy", choices=NAN_POLICIES, default="error")
    p.add_argument("--overwrite", action="store_true", help="replace a store built for another model / set")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compression-level", type=int, default=WriteOptions.compression_level)
    p.add_argument("--wait", action="store_true", help="wait for another writer of the same shards instead of failing")
    p.add_argument("--engine", choices=TEACHER_ENGINES, default="hf",
                   help="hf: transformers (default); vllm: vLLM (same store; needs vllm, see `make vllm-env`)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per engine")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM: context length of the engine")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="vLLM: any other vllm.LLM keyword, e.g. gpu_memory_utilization=0.85 (repeatable)")
    _dist.add_arguments(p)


def config_from_args(args) -> dict:
    return dict(data_dir=args.data_dir, sources=list(args.sources), names=args.names, k=args.k,
                batch_tokens=args.batch_tokens, max_batch_size=args.max_batch_size, device=args.device,
                dtype=args.dtype, nan_policy=args.nan_policy, overwrite=args.overwrite, rank=args.rank,
                world_size=args.world_size, progress=not args.no_progress, threads=args.threads, wait=args.wait,
                write=WriteOptions(compression_level=args.compression_level), engine=args.engine,
                vllm=vllm_engine.VLLMOptions(tensor_parallel_size=args.tensor_parallel_size,
                                             max_model_len=args.max_model_len,
                                             extra=vllm_engine.parse_vllm_args(args.vllm_arg)))
