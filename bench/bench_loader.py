"""Loader throughput: profuser.engine.loader vs a FuseLLM-style dense collation of the same data.

Data: the shipped WordNet instruction corpus (plus multilingual / digit / whitespace responses), the real
SmolLM2 tokenizer as the student, T=3 sources with real tokenizers (SmolLM2 itself, Gemma-3, GPT-2), K=8
random top-k per predicted token, written by the store's own writer (profuser.engine.tools.synthetic). Only
the top-k numbers are random; token counts, offsets and alignment are those of real text.

Methods, all on the same examples in one run, single-threaded (torch, tokenizers and BLAS threads = 1,
process pinned to one core):
  profuser          FusionLoader epochs: read Parquet shards, check them, encode the student side, align
                    every source on the fly, gather top-k, advantage weights, pad. First epoch (includes
                    the store validator's checks) and steady state (median of the later epochs).
  fusellm_dense     FuseLLM's pipeline after its offline alignment step: per-position aligned top-k
                    (logits fp16 + int64 ids, already in the student vocabulary: exact-string vocab map)
                    saved with `datasets` (Arrow), read back row by row and densified by a collator that
                    loops over positions and scatters softmax(top-k) into a [B, L, V] bf16 tensor per
                    teacher (FuseLLM's DataCollatorForDistill; we pad to the batch, not to 2048 as it does).
  dense_vectorized  profuser's batches + one vectorized index_put_ into a zeroed [T, B, L, V] bf16 tensor:
                    the cost of a dense target alone (mostly zeroing memory), without FuseLLM's loop.
Throughput is student tokens (attention_mask) per second, wall clock and per CPU-second (the machine is
shared; CPU time is what one dedicated core would take). Bytes per token on disk: file bytes / predicted
tokens, per teacher.

    .venv/bin/python bench/bench_loader.py [--examples 2048] [--epochs 4] [--dense-batches 8]
"""

from __future__ import annotations

import os

for _var in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "false" if _var == "TOKENIZERS_PARALLELISM" else "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

# pq.read_table imports pyarrow.dataset (and pandas) on first use: ~0.8 s once per process, kept out of the
# first-epoch figure by importing it here
import pyarrow.dataset  # noqa: E402,F401
import torch  # noqa: E402

from profuser.engine import store  # noqa: E402
from profuser.engine.config import DataConfig  # noqa: E402
from profuser.engine.loader.loader import FusionLoader  # noqa: E402
from profuser.engine.models import pad_id  # noqa: E402
from profuser.engine.text.align import build_vocab_map  # noqa: E402
from profuser.engine.text.tokenizers import load_known  # noqa: E402
from profuser.engine.tools import synthetic as fx  # noqa: E402

from harness import machine_name, machine_slug  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SOURCES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m", "gpt2": "gpt2-local"}


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def build(root: Path, n: int, shard_size: int, k: int, toks: dict) -> None:
    if (root / "prepared" / "manifest.json").exists():
        return
    ex = fx.corpus(n)
    pm = fx.write_prepared(root, ex, shard_size)
    for s, (name, model) in enumerate(SOURCES.items()):
        fx.write_teacher(root, name, "train", toks[name], model, ex, pm, k=k, seed=s)


def disk_bytes_per_token(root: Path) -> dict:
    out = {}
    for name in SOURCES:
        m = store.TeacherManifest.load(root, name, "train")
        size = sum(p.stat().st_size for p in store.teacher_dir(root, name, "train").glob("part-*.parquet"))
        out[name] = size / m.tokens
    return out


def make_loader(root, toks, args, shuffle=True, span_rule="first_piece"):
    cfg = DataConfig(data_dir=str(root), sources=list(SOURCES), k=args.k, micro_batch_size=args.batch_size,
                     max_length=args.max_length, shuffle_buffer=1024 if shuffle else 1, span_rule=span_rule,
                     packing=False)  # one row per example, as recorded
    return FusionLoader(cfg, toks["smollm2"], student=SOURCES["smollm2"],
                        teacher_tokenizers={n: toks[n] for n in SOURCES if n != "smollm2"})


def bench_profuser(root, toks, args, span_rule="first_piece") -> dict:
    """FusionLoader epochs; span_rule first_piece (the default) is row "profuser", chain "profuser_chain"."""
    ld = make_loader(root, toks, args, span_rule=span_rule)
    epochs = []
    for _ in range(args.epochs):
        counts = {"tok": 0, "lab": 0}

        def run(counts=counts):
            for b in ld:
                counts["tok"] += int(b["attention_mask"].sum())
                counts["lab"] += b["n_tokens"]
        _, wall, cpu = timed(run)
        epochs.append({"wall_s": wall, "cpu_s": cpu, "tokens": counts["tok"], "labels": counts["lab"]})
    first, rest = epochs[0], epochs[1:] or epochs
    steady_wall = statistics.median(e["wall_s"] for e in rest)
    steady_cpu = statistics.median(e["cpu_s"] for e in rest)
    return {"method": "profuser" if span_rule == "first_piece" else f"profuser_{span_rule}", "epochs": epochs,
            "tokens_per_epoch": first["tokens"],
            "first_epoch_tok_s_wall": first["tokens"] / first["wall_s"],
            "first_epoch_tok_per_cpu_s": first["tokens"] / first["cpu_s"],
            "tok_s_wall": first["tokens"] / steady_wall, "tok_per_cpu_s": first["tokens"] / steady_cpu,
            "labels_per_cpu_s": first["labels"] / steady_cpu}


def exact_maps(toks) -> list:
    """Teacher id -> student id by exact token string (FuseLLM's "hard" mapping); None for the student."""
    return [None if n == "smollm2" else torch.from_numpy(build_vocab_map(
        toks[n], toks["smollm2"], method="exact", cache_dir=False).astype(np.int64)) for n in SOURCES]


def to_student(ids: torch.Tensor, vm) -> torch.Tensor:
    return ids if vm is None else torch.where(ids >= 0, vm[ids.clamp_min(0)], ids)


def fusellm_dataset(root, toks, args, out: Path, maps: list):
    """FuseLLM-format rows (aligned top-k in the student vocabulary, per position) from our batches."""
    import datasets

    ld = make_loader(root, toks, args, shuffle=False)  # FuseLLM: no chain rule
    cols = {"input_ids": [], "attention_mask": [], "labels": []}
    for t in range(len(SOURCES)):
        cols[f"per_step_aligned_indices_{t}"], cols[f"per_step_aligned_logits_{t}"] = [], []
    for b in ld:
        for i in range(len(b["example_ids"])):
            n = int(b["attention_mask"][i].sum())
            cols["input_ids"].append(b["input_ids"][i, :n].tolist())
            cols["attention_mask"].append([1] * n)
            cols["labels"].append(b["labels"][i, :n].tolist())
            for t, vm in enumerate(maps):
                ids = to_student(b["teacher_ids"][t, i, :n].long(), vm)
                cols[f"per_step_aligned_indices_{t}"].append(ids.tolist())
                cols[f"per_step_aligned_logits_{t}"].append(b["teacher_logprobs"][t, i, :n].float().tolist())
    ds = datasets.Dataset.from_dict(cols, features=datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "attention_mask": datasets.Sequence(datasets.Value("int64")),
        "labels": datasets.Sequence(datasets.Value("int64")),
        **{f"per_step_aligned_indices_{t}": datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
           for t in range(len(SOURCES))},
        **{f"per_step_aligned_logits_{t}": datasets.Sequence(datasets.Sequence(datasets.Value("float16")))
           for t in range(len(SOURCES))}}))
    ds.save_to_disk(str(out))
    return len(toks["smollm2"])


def fusellm_collate(rows: dict, T: int, V: int, pad_id: int) -> dict:
    """DataCollatorForDistill's densification: a Python loop over positions, scatter into [B, L, V] bf16."""
    B = len(rows["input_ids"])
    L = max(len(x) for x in rows["input_ids"])
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    for i, x in enumerate(rows["input_ids"]):
        input_ids[i, :len(x)] = torch.tensor(x)
    dists = []
    for t in range(T):
        dense = torch.zeros(B, L, V, dtype=torch.bfloat16)
        for i in range(B):
            idx, logits = rows[f"per_step_aligned_indices_{t}"][i], rows[f"per_step_aligned_logits_{t}"][i]
            for j in range(L):
                if j < len(idx) and idx[j][0] >= 0:
                    ids = torch.tensor([v for v in idx[j] if v >= 0])
                    lp = torch.tensor(logits[j][:len(ids)], dtype=torch.bfloat16)
                    dense[i, j].scatter_(-1, ids, torch.softmax(lp.float(), -1).to(torch.bfloat16))
                else:  # no teacher distribution: FuseLLM writes a one-hot (on the pad id when padding)
                    dense[i, j, pad_id] = 1.0
        dists.append(dense)
    return {"input_ids": input_ids, "target_dist": dists}


def bench_fusellm(root, toks, args, workdir: Path, maps: list) -> dict:
    import datasets

    out = workdir / "fusellm_arrow"
    if not out.exists():
        fusellm_dataset(root, toks, args, out, maps)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    V, T = len(toks["smollm2"]), len(SOURCES)
    ds = datasets.load_from_disk(str(out))  # outside the timed region, like the profuser loader's init
    n_pred = sum(sum(1 for x in lab if x != -100) for lab in ds["labels"])
    B = args.batch_size
    tokens = 0

    def run():
        nonlocal tokens
        for s in range(0, min(len(ds), B * args.dense_batches), B):
            rows = ds[s:s + B]
            batch = fusellm_collate(rows, T, V, pad_id=pad_id(toks["smollm2"]))
            tokens += int(sum(len(x) for x in rows["input_ids"]))
            del batch
    _, wall, cpu = timed(run)
    return {"method": "fusellm_dense", "batches": args.dense_batches, "tokens": tokens,
            "tok_s_wall": tokens / wall, "tok_per_cpu_s": tokens / cpu,
            "disk_bytes_per_token_per_teacher": size / n_pred / T, "disk_bytes": size}


def bench_dense_vectorized(root, toks, args, maps: list) -> dict:
    ld = make_loader(root, toks, args, shuffle=False)
    V = len(toks["smollm2"])
    batches = []
    for b in ld:
        batches.append(b)
        if len(batches) == args.dense_batches:
            break
    tokens, peak = 0, 0

    def run():
        nonlocal tokens, peak
        for b in batches:
            ids = torch.stack([to_student(b["teacher_ids"][t].long(), vm) for t, vm in enumerate(maps)])
            lp = b["teacher_logprobs"].float()
            T, B, L, K = ids.shape
            p = torch.softmax(lp.masked_fill(ids < 0, -torch.inf), -1).nan_to_num(0.0)
            dense = torch.zeros(T, B, L, V, dtype=torch.bfloat16)
            keep = ids >= 0  # index_put_: CPU scatter_ into a large bf16 tensor is 100x slower
            rows = torch.arange(T * B * L).view(T, B, L, 1).expand(-1, -1, -1, K)
            dense.view(-1, V).index_put_((rows[keep], ids[keep]), p[keep].to(torch.bfloat16))
            peak = max(peak, dense.numel() * 2)
            tokens += int(b["attention_mask"].sum())
    _, wall, cpu = timed(run)
    return {"method": "dense_vectorized", "batches": len(batches), "tokens": tokens,
            "tok_s_wall": tokens / wall, "tok_per_cpu_s": tokens / cpu, "dense_bytes_per_batch_max": peak,
            "note": "densification only (on top of profuser's batches, not included)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--dense-batches", type=int, default=8)
    ap.add_argument("--data-dir", default=None, help="reuse a store here (built when absent)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    toks = {"smollm2": load_known("smollm2"), "gemma3": load_known("gemma3"), "gpt2": load_known("gpt2")}
    work = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="bench_loader-"))
    root = work / "store"
    _, build_wall, _ = timed(lambda: build(root, args.examples, args.shard_size, args.k, toks))
    load_before = os.getloadavg()

    init = timed(lambda: make_loader(root, toks, args))
    rows = [bench_profuser(root, toks, args)]
    rows[0]["init_s_wall"] = init[1]
    rows[0]["disk_bytes_per_token"] = disk_bytes_per_token(root)
    rows.append(bench_profuser(root, toks, args, span_rule="chain"))  # issue #24's rule, same run
    maps = exact_maps(toks)
    rows.append(bench_fusellm(root, toks, args, work, maps))
    rows.append(bench_dense_vectorized(root, toks, args, maps))
    base = rows[0]["tok_per_cpu_s"]
    for r in rows:
        r["profuser_speedup_cpu"] = base / r["tok_per_cpu_s"]

    result = {"bench": "loader", "machine": machine_name(), "cpu_model": _cpu_model(), "threads": 1,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "config": {**vars(args), "T": len(SOURCES), "student": "smollm2 (49,152)",
                         "teachers": "smollm2, gemma3 (262,144), gpt2 (50,257)"},
              "store_build_s": build_wall, "rows": rows,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"loader_{machine_slug()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {path}")
    return 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def table(result: dict) -> str:
    """The Markdown table docs/results.md quotes ("Streaming loader"); "vs profuser" is the CPU time ratio (how
    many times profuser's time, span_rule first_piece, the default, in steady epochs)."""
    r = {row["method"]: row for row in result["rows"]}
    p, f, d = r["profuser"], r["fusellm_dense"], r["dense_vectorized"]
    ch = r.get("profuser_chain")
    load = result["load_average_before"][0]
    head = (f"Machine: {result['machine']} ({result['cpu_model']}), 1 thread pinned to one core; "
            f"load average {load:.1f} (shared machine: CPU-time figures are the comparable ones).")
    disk = ", ".join(f"{k} {v:.1f}" for k, v in p["disk_bytes_per_token"].items())
    first = p["tok_per_cpu_s"] / p["first_epoch_tok_per_cpu_s"]
    rows = [
        ("profuser, steady epochs", p["tok_s_wall"], p["tok_per_cpu_s"], "1.00x", disk),
        ("profuser, first epoch (store checks)", p["first_epoch_tok_s_wall"], p["first_epoch_tok_per_cpu_s"],
         f"{first:.2f}x slower", ""),
        *([("profuser, steady epochs, span_rule chain", ch["tok_s_wall"], ch["tok_per_cpu_s"],
            f"{ch['profuser_speedup_cpu']:.2f}x", "")] if ch else []),
        ("FuseLLM-style dense collation", f["tok_s_wall"], f["tok_per_cpu_s"],
         f"{f['profuser_speedup_cpu']:.0f}x slower", f"{f['disk_bytes_per_token_per_teacher']:.1f} (Arrow)"),
        ("dense target only, vectorized", d["tok_s_wall"], d["tok_per_cpu_s"],
         f"{d['profuser_speedup_cpu']:.1f}x slower", f"({d['dense_bytes_per_batch_max'] >> 20} MiB/batch)"),
    ]
    lines = [head, "", "| method | student tok/s (wall) | student tok / CPU-s | vs profuser (CPU) | "
             "bytes/token/teacher on disk |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {w:,.0f} | {c:,.0f} | {v} | {dk} |" for m, w, c, v, dk in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
