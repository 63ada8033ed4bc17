"""Teacher-pass throughput and bytes per token on disk (training mode, real models, shipped corpus).

    python bench/bench_teach.py                                  # SmolLM2-135M, 256 examples, k=8
    python bench/bench_teach.py --models smollm2-135m-instruct gemma3-270m --examples 512

For each model: `profuser teach` on the first N examples of data/wordnet_instruct.jsonl (fp32 on CPU,
bf16 on GPU), timed end to end per shard loop (model load excluded: it is reported separately), and
the same store re-encoded with several Parquet writer settings (same rows, same run) to show what each
option buys: bytes per stored predicted token, side by side with the raw payload (62 B/token at k=8).
JSON to bench/results/teach_<device>.json, with the machine and the load average (the CPU is shared).

    .venv-vllm/bin/python bench/bench_teach.py --engines hf vllm     # make bench-teach-vllm

compares the two teacher engines instead, in one process and one run: the same prompts through `profuser
generate` (greedy, batch 8: gen_batch_size 8 for transformers, max_num_seqs 8 for vLLM) and `profuser teach`,
generated / predicted tokens per second with the engine load excluded (reported apart), and whether the two
stores hold the same responses. JSON to bench/results/teach_engines_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from profuser.engine import models, store
from profuser.engine.passes import generate, teach, vllm_engine
from profuser.engine.passes import prepare as P
from profuser.engine.passes.options import PassConfig

from harness import machine_name

RESULTS = Path(__file__).resolve().parent / "results"

WRITERS = {
    "snappy, dictionary, plain (pyarrow defaults)": dict(compression="snappy", byte_stream_split=False,
                                                         dict_lists=True),
    "zstd-3": dict(compression="zstd", compression_level=3, byte_stream_split=False),
    "zstd-9": dict(compression="zstd", compression_level=9, byte_stream_split=False),
    "zstd-3 + byte_stream_split": dict(compression="zstd", compression_level=3, byte_stream_split=True),
    "zstd-9 + byte_stream_split (default)": dict(compression="zstd", compression_level=9, byte_stream_split=True),
    "zstd-19 + byte_stream_split": dict(compression="zstd", compression_level=19, byte_stream_split=True),
}


def rewrite_size(tables, opts: dict, tmp: Path) -> tuple[int, float]:
    size, t0 = 0, time.perf_counter()
    for i, t in enumerate(tables):
        p = tmp / f"w{i}.parquet"
        if opts.get("dict_lists"):
            pq.write_table(t, p, compression=opts["compression"])
            size += p.stat().st_size
        else:
            size += store.write_table_atomic(t, p, store.WriteOptions(
                compression=opts["compression"], compression_level=opts.get("compression_level", 3),
                byte_stream_split=opts["byte_stream_split"]))
    return size, time.perf_counter() - t0


def engine_rows(args, device: str) -> dict:
    """Each engine through the same prepared prompts: generate (greedy) then teach; rates from the passes'
    own clocks (model / engine load excluded, timed apart)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_engines_") as tmp:
        for spec in args.models:
            row = {}
            for engine in args.engines:
                data = Path(tmp) / f"{models.model_name(spec)}-{engine}"
                P.prepare(P.PrepareConfig(data_dir=str(data), limit=args.examples, shard_size=args.examples),
                          log=lambda s: None)
                opts = vllm_engine.VLLMOptions(extra={"max_num_seqs": args.gen_batch} if engine == "vllm" else {})
                common = dict(data_dir=str(data), sources=[spec], k=args.k, progress=False, engine=engine,
                              vllm=opts, batch_tokens=args.batch_tokens)
                t0 = time.perf_counter()
                g = generate.generate(generate.GenerateConfig(**common, max_new_tokens=args.max_new_tokens,
                                                              gen_batch_size=args.gen_batch))
                gen_wall = time.perf_counter() - t0
                t0 = time.perf_counter()
                t = teach.teach(PassConfig(**common, max_length=args.max_length))
                teach_wall = time.perf_counter() - t0
                name = models.model_name(spec)
                g, t = g[name], t[name]
                d = store.teacher_dir(data, name, "infer")
                responses = pq.read_table(sorted(d.glob("part-*.parquet"))[0])["response"].to_pylist()
                row[engine] = {"generate_tok_s": g["tok_s"], "generated_tokens": g["tokens"],
                               "generate_wall_s_with_load": gen_wall, "teach_tok_s": t["tok_s"],
                               "teach_input_tok_s": t["input_tok_s"], "teach_tokens": t["tokens"],
                               "teach_wall_s_with_load": teach_wall, "responses": responses,
                               "load_average_1min": os.getloadavg()[0]}
                print(f"{spec} [{engine}]: generate {g['tokens']} tokens at {g['tok_s']:.1f} tok/s; teach "
                      f"{t['tokens']} predicted tokens at {t['tok_s']:.1f} tok/s ({device})")
            if "hf" in row and "vllm" in row:
                same = sum(a == b for a, b in zip(row["hf"]["responses"], row["vllm"]["responses"]))
                row["same_greedy_responses"] = f"{same}/{len(row['hf']['responses'])}"
                row["generate_speedup"] = row["vllm"]["generate_tok_s"] / row["hf"]["generate_tok_s"]
                row["teach_speedup"] = row["vllm"]["teach_tok_s"] / row["hf"]["teach_tok_s"]
                print(f"{spec}: vLLM / transformers: generate {row['generate_speedup']:.2f}x, teach "
                      f"{row['teach_speedup']:.2f}x; same greedy responses {row['same_greedy_responses']}")
            out[spec] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to time")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=None,
                    help="compare teacher engines (generate + teach) instead of the writer study")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=8)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.engines:
        result = {"bench": "teach_engines", "machine": machine_name(), "device": device,
                  "torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg(),
                  "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or "profuser default: "
                  f"every usable core ({','.join(map(str, sorted(os.sched_getaffinity(0))))})",
                  "config": vars(args), "models": engine_rows(args, device), "load_average_after": os.getloadavg()}
        path = Path(args.out) / f"teach_engines_{device}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
        return 0
    load_before = os.getloadavg()
    result = {"bench": "teach", "machine": machine_name(), "cpu_model": platform.processor() or platform.machine(),
              "torch_default_threads": torch.get_num_threads(), "device": device, "load_average_before": load_before,
              "config": vars(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_teach_") as tmp:
        tmp = Path(tmp)
        for spec in args.models:
            t0 = time.perf_counter()
            models.load_model(spec)  # converts once; the timed runs below reload from the cache
            load_s = time.perf_counter() - t0
            row = {"examples": args.examples, "first_load_s": load_s, "raw_bytes_per_token": 8 + 4 + 2 + 6 * args.k,
                   "threads": {}}
            for threads in args.threads:  # a fresh data dir per run: teach skips completed shards
                data = tmp / f"{models.model_name(spec)}-{threads}"
                P.prepare(P.PrepareConfig(data_dir=str(data), limit=args.examples,
                                          shard_size=max(1, args.examples // 2)), log=lambda s: None)
                cfg = PassConfig(data_dir=str(data), sources=[spec], k=args.k, batch_tokens=args.batch_tokens,
                                        progress=False, threads=threads)
                la = os.getloadavg()[0]
                stats = teach.teach(cfg)[models.model_name(spec)]
                row["threads"][threads] = {"tok_s": stats["tok_s"], "input_tok_s": stats["input_tok_s"],
                                           "load_average_1min": la}
                print(f"{spec}: {threads} thread(s): {stats['tokens']} predicted tokens at {stats['tok_s']:.0f} "
                      f"tok/s ({stats['input_tokens']} input tokens, {stats['input_tok_s']:.0f} tok/s; {device}, "
                      f"load average {la:.1f})")
            row.update(tokens=stats["tokens"], input_tokens=stats["input_tokens"])
            d = store.teacher_dir(data, models.model_name(spec), "train")
            tables = [pq.read_table(p) for p in sorted(d.glob("part-*.parquet"))]
            n_tok = sum(int(t["n_tokens"].to_numpy().sum()) for t in tables)
            row["writers"] = {}
            for name, opts in WRITERS.items():
                size, secs = rewrite_size(tables, opts, tmp)
                row["writers"][name] = {"bytes": size, "bytes_per_token": size / n_tok, "write_s": secs}
                print(f"   {name:42s} {size / n_tok:6.2f} B/token  write {secs:.2f}s")
            result["models"][spec] = row
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"teach_{device}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
