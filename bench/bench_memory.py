"""Host memory of the demo's training step, phase by phase (issue #25).

One process, the demo's student (Gemma-3-270M, fp32 on the CPU) and step (4 examples x <= 128 tokens, two
sources, top-10; FusionStep: backbone + fused loss, torch AdamW), without DeepSpeed (what ZeRO stage 0 runs).
The resident set (VmRSS) is read after each phase and its high-water mark (VmHWM, reset before each phase
through /proc/self/clear_refs) during it, so each phase's transient peak (activations, loss chunks) shows
apart from what it keeps (parameters, gradients, optimizer states).

    .venv/bin/python bench/bench_memory.py        -> bench/results/memory_cpu.json and a Markdown table

The sizes the table is checked against: parameters, gradients and the two AdamW moments are 4 bytes x
parameters each; the tied 262k x 640 embedding's gradient is part of the gradients.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from harness import machine_name

RESULTS = Path(__file__).resolve().parent / "results"
STUDENT = "gemma3-270m"


def status(key: str) -> float:
    """A /proc/self/status field in GiB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> int:
    from profuser.engine.config import DataConfig, LossConfig
    from profuser.engine.loader import FusionLoader
    from profuser.engine.models import load_model, load_tokenizer
    from profuser.engine.text.tokenizers import load_known
    from profuser.engine.tools import synthetic as fx
    from profuser.engine.trainer.step import FusionStep

    rows = []

    def mark(phase: str, note: str = "") -> None:
        rows.append({"phase": phase, "rss_gib": status("VmRSS"), "peak_gib": status("VmHWM"), "note": note})
        reset_peak()

    resettable = reset_peak()
    mark("imports (torch, transformers, profuser)")
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        tok = load_tokenizer(STUDENT)
        ex = fx.corpus(64)
        pm = fx.write_prepared(root, ex, 64)
        fx.write_teacher(root, "self", "train", tok, STUDENT, ex, pm, k=10, seed=1)
        fx.write_teacher(root, "smollm2", "train", load_known("smollm2"), "smollm2-135m-instruct", ex, pm, k=10,
                         seed=2)
        loader = FusionLoader(DataConfig(data_dir=str(root), sources=["self", "smollm2"], k=10, max_length=128,
                                         shuffle_buffer=1, packing=False), tok, student=STUDENT)  # as recorded
        batches = [b for _, b in zip(range(3), loader)]
        mark("loader, vocabulary maps, 3 batches")
        lm = load_model(STUDENT).float().train()
        lm.config.use_cache = False
        n = sum(p.numel() for p in lm.parameters())
        mark("student loaded", f"parameters {n * 4 / 2**30:.2f} GiB ({n / 1e6:.0f}M x 4 B)")
        step = FusionStep(lm, LossConfig(lam=0.9), loader.vocab_maps)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-5)
        scale = torch.ones(2)
        for i, batch in enumerate(batches):
            loss, _ = step(batch, scale)
            mark(f"step {i + 1}: forward + fused loss", "activations kept for backward")
            loss.backward()
            mark(f"step {i + 1}: backward", f"gradients {n * 4 / 2**30:.2f} GiB")
            opt.step()
            mark(f"step {i + 1}: AdamW", f"two moments {2 * n * 4 / 2**30:.2f} GiB (allocated at the first step)")
            opt.zero_grad(set_to_none=True)
            mark(f"step {i + 1}: zero_grad(set_to_none)", "")
    result = {"bench": "memory", "machine": machine_name(), "student": STUDENT, "params": n,
              "peak_reset_supported": resettable, "rows": rows,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_cpu.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def table(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; {r['student']} fp32 ({r['params'] / 1e6:.0f}M parameters), no DeepSpeed "
             "(ZeRO stage 0's work).", "", "| after | resident (GiB) | peak during the phase (GiB) | expected |",
             "|---|---:|---:|---|"]
    lines += [f"| {x['phase']} | {x['rss_gib']:.2f} | {x['peak_gib']:.2f} | {x['note']} |" for x in r["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
