"""The demo's training step: where its time goes, and the store against teachers run online (issue #25).

Student Gemma-3-270M (real weights, fp32 on the CPU); the demo's two sources, SmolLM2-135M-Instruct and
Gemma-3-270M (real models); the shipped WordNet corpus; max_length 128, 4 examples per step, top-10 - the
demo's sizes. One process, the same examples in the same order for every variant:

  teach     the one-time teacher pass of both sources over the examples (profuser.engine.passes.teach, the
            store the demo trains from): its wall time, per example
  store     steps trained from that store: FusionLoader batch -> FusionStep forward (backbone + fused loss)
            -> backward -> AdamW, each phase timed; target tokens/s
  online    the same steps, each first running both teachers on the step's examples, as an online trainer
            does (NeMo-RL's cross-tokenizer distillation): the teach pass's own forward
            (passes/forward.forward_predicted, top-10) on the step's examples; target tokens/s and the
            teachers' share of the step
  profile   one store step under torch.profiler: the ops with the most self CPU time

The store has paid for its teacher pass after teach_s / (online_s - store_s per example) epochs (one student);
every further student trained from the same store saves a whole pass. The GPU projection is on paper: with
the teachers' forward at 2 x params x tokens flops and the student's step at 6 x params x tokens, the
teachers' share of an online step is 2 * (P_t1 + P_t2) / (2 * (P_t1 + P_t2) + 6 * P_s).

    .venv/bin/python bench/bench_step.py [--examples 64] [--steps 6]
Output: bench/results/step_cpu.json and Markdown tables.
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
SOURCES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def teach_store(root: Path, n: int) -> tuple[float, list[dict]]:
    """Prepared set of n shipped-corpus examples and both sources' stores (the real teach pass), timed."""
    from profuser.engine.passes import teach
    from profuser.engine.passes.options import PassConfig
    from profuser.engine.tools import synthetic as fx

    ex = fx.corpus(n, extra_every=0, system_every=0)
    fx.write_prepared(root, ex, n)
    t0 = time.perf_counter()
    teach.teach(PassConfig(data_dir=str(root), sources=list(SOURCES.values()), names=list(SOURCES), k=10,
                           max_length=128, progress=False))
    return time.perf_counter() - t0, ex


def run(root: Path, examples: list[dict], args, *, online: bool, profile: bool = False) -> dict:
    from profuser.engine.config import DataConfig, LossConfig
    from profuser.engine.loader import FusionLoader
    from profuser.engine.models import load_model, load_tokenizer, pad_id
    from profuser.engine.passes.forward import forward_predicted
    from profuser.engine.text.chat import encode_example
    from profuser.engine.trainer.step import FusionStep

    torch.manual_seed(0)
    tok = load_tokenizer(STUDENT)
    lm = load_model(STUDENT).float().train()
    lm.config.use_cache = False
    loader = FusionLoader(DataConfig(data_dir=str(root), sources=list(SOURCES), k=10, max_length=128,
                                     micro_batch_size=4, shuffle_buffer=1, packing=False),  # padded, as
                            tok, student=STUDENT)                            # recorded; bench_packing: packed
    step = FusionStep(lm, LossConfig(lam=0.9), loader.vocab_maps)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    scale = torch.ones(2)
    teachers = {name: (load_model(spec).float().eval(), load_tokenizer(spec)) for name, spec in SOURCES.items()} \
        if online else {}
    by_id = {e["example_id"]: e for e in examples}
    phases = {"loader": [], "teachers": [], "forward": [], "backward": [], "optimizer": []}
    labels, it = 0, iter(loader)
    prof = table = None
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        with torch.no_grad():  # an online trainer's teacher forward on the step's examples
            for model, ttok in teachers.values():
                encs = [encode_example(ttok, by_id[e]["prompt"], by_id[e]["response"], max_length=128)
                        for e in batch["example_ids"]]
                forward_predicted(model, encs, 10, torch.device("cpu"), pad_id(ttok))
        t2 = time.perf_counter()
        if profile and i == args.warmup:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        loss, _ = step(batch, scale)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if prof is not None:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            prof, profile = None, False
        if i >= args.warmup:
            for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[key].append(dt)
            labels += batch["n_tokens"]
    wall = sum(sum(v) for v in phases.values())
    out = {"variant": "online" if online else "store", "steps": args.steps, "target_tok_s": labels / wall,
           "step_s": wall / args.steps, "phase_s": {k: statistics.mean(v) for k, v in phases.items()},
           "teacher_share": sum(phases["teachers"]) / wall}
    if table is not None:
        out["profile"] = table
    return out


def params(spec: str) -> int:
    from profuser.engine.models import load_model

    return sum(p.numel() for p in load_model(spec).parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "step_cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        teach_s, examples = teach_store(root, args.examples)
        store = run(root, examples, args, online=False, profile=True)
        online = run(root, examples, args, online=True)
    per_ex_store, per_ex_online = store["step_s"] / 4, online["step_s"] / 4
    p_s, p_t = params(STUDENT), sum(params(s) for s in SOURCES.values())
    result = {"bench": "step", "machine": machine_name(), "student": STUDENT, "sources": SOURCES,
              "config": vars(args), "teach_s": teach_s, "teach_s_per_example": teach_s / args.examples,
              "rows": [store, online], "store_vs_online": store["target_tok_s"] / online["target_tok_s"],
              "break_even_epochs": (teach_s / args.examples) / max(per_ex_online - per_ex_store, 1e-9),
              "gpu_projection_teacher_share": 2 * p_t / (2 * p_t + 6 * p_s), "params": {"student": p_s,
                                                                                        "teachers": p_t},
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(tables(result))
    return 0


def tables(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; student {r['student']} fp32, 4 examples x <= 128 tokens per step, sources "
             f"{', '.join(r['sources'].values())}.", "",
             "| variant | target tok/s | step (s) | loader | teachers | forward + loss | backward | optimizer "
             "| teachers' share |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        ph = row["phase_s"]
        lines.append(f"| {row['variant']} | {row['target_tok_s']:.1f} | {row['step_s']:.2f} | {ph['loader']:.3f} | "
                     f"{ph['teachers']:.2f} | {ph['forward']:.2f} | {ph['backward']:.2f} | {ph['optimizer']:.2f} | "
                     f"{row['teacher_share']:.2f} |")
    lines += ["", f"store / online: {r['store_vs_online']:.2f}x target tokens/s; the teach pass took "
              f"{r['teach_s']:.1f} s ({r['teach_s_per_example']:.2f} s per example, both sources): the store has "
              f"paid for it after {r['break_even_epochs']:.2f} epochs of one student. GPU projection (flops): "
              f"the teachers' share of an online step {r['gpu_projection_teacher_share']:.2f}, store / online "
              f"{1 / (1 - r['gpu_projection_teacher_share']):.2f}x."]
    if "profile" in r["rows"][0]:
        lines += ["", "```", r["rows"][0]["profile"], "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
