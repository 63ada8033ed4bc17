"""Packing vs padding: the demo's training step on the shipped corpus (issue #25).

Student: Gemma-3-270M (the demo's target, real weights, fp32 on the CPU); data: the shipped WordNet corpus
(plus its multilingual / digit / whitespace responses: very unequal lengths) encoded with Gemma-3's tokenizer,
two sources (Gemma-3 itself and SmolLM2's vocabulary, synthetic top-10 numbers on real token ids and offsets,
profuser.engine.tools.synthetic), data.max_length 128 as in the demo. One process, the same examples in the
same order for every variant, a full step each (FusionStep forward + backward + torch AdamW):

    padded        micro_batch_size 4 examples, one padded row each (the demo today)
    packed        the same 4 examples per step, packed into rows of max_length tokens
    packed+budget data.micro_batch_tokens = 4 x 128 (the padded step's shape): examples are added while they
                  fit, packed into rows of 128

Reported per variant: target tokens (labels) per second, examples per step, the pad fraction of the input,
the median step time. Output: bench/results/packing_cpu.json and a Markdown table.

    .venv/bin/python bench/bench_packing.py [--steps 6] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from harness import machine_name

RESULTS = Path(__file__).resolve().parent / "results"
STUDENT = "gemma3-270m"


def build(root: Path, n: int):
    from profuser.engine.models import load_tokenizer
    from profuser.engine.text.tokenizers import load_known
    from profuser.engine.tools import synthetic as fx

    ex = fx.corpus(n, extra_every=4)
    pm = fx.write_prepared(root, ex, 256)
    fx.write_teacher(root, "self", "train", load_tokenizer(STUDENT), STUDENT, ex, pm, k=10, seed=1)
    fx.write_teacher(root, "smollm2", "train", load_known("smollm2"), "smollm2-135m-instruct", ex, pm, k=10, seed=2)


def run_variant(name: str, root: Path, lm, tok, args, **data) -> dict:
    from profuser.engine.config import DataConfig, LossConfig
    from profuser.engine.loader import FusionLoader
    from profuser.engine.trainer.step import FusionStep

    cfg = DataConfig(data_dir=str(root), sources=["self", "smollm2"], k=10, max_length=128, shuffle_buffer=1,
                     **data)
    loader = FusionLoader(cfg, tok, student=STUDENT)
    step = FusionStep(lm, LossConfig(lam=0.9), loader.vocab_maps)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    scale = torch.ones(2, dtype=torch.float32)
    times, labels, examples, real, total = [], 0, 0, 0, 0
    it = iter(loader)
    for i in range(args.warmup + args.steps):
        batch = next(it)
        t0 = time.perf_counter()
        loss, _ = step(batch, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            labels += batch["n_tokens"]
            examples += len(batch["example_ids"])
            real += int(batch["attention_mask"].sum())
            total += batch["attention_mask"].numel()
    wall = sum(times)
    return {"variant": name, "steps": args.steps, "target_tok_s": labels / wall, "examples_per_step": examples /
            args.steps, "pad_fraction": 1 - real / total, "median_step_s": statistics.median(times),
            "rows_x_length": f"{batch['input_ids'].shape[0]}x{batch['input_ids'].shape[1]} (last step)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS / "packing_cpu.json"))
    args = ap.parse_args()
    from profuser.engine.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(STUDENT)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        build(root, args.examples)
        variants = [("padded", {"micro_batch_size": 4, "packing": False}),
                    ("packed", {"micro_batch_size": 4, "packing": True}),
                    ("packed+budget", {"micro_batch_tokens": 512, "packing": True})]
        for name, data in variants:
            lm = load_model(STUDENT).float().train()  # the same weights for every variant
            lm.config.use_cache = False
            rows.append(run_variant(name, root, lm, tok, args, **data))
            del lm
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["target_tok_s"]
    for r in rows:
        r["vs_padded"] = r["target_tok_s"] / base
    result = {"bench": "packing", "machine": machine_name(), "student": STUDENT, "rows": rows,
              "config": vars(args), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def table(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; student {result['student']} fp32, full steps (forward, backward, AdamW).",
             "", "| variant | target tok/s | vs padded | examples / step | pad fraction | median step (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['target_tok_s']:.1f} | {r['vs_padded']:.2f}x | {r['examples_per_step']:.1f} | "
              f"{r['pad_fraction']:.3f} | {r['median_step_s']:.2f} |" for r in result["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
