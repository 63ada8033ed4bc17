"""One GPU suite: the machine's ceilings, correctness, and the speed of the fusion loss and the training step.

    python bench/gpu_suite.py [--out DIR] [--sections env,check,loss,step] [--dry-run]
    make gpu-suite

On a GPU machine without internet, with its own torch and triton (possibly older than our pins):
    here:   bash bench/gpu_wheels.sh              # .whl/ (git-ignored): CCE, Liger, DeepSpeed and its needs
    there:  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
            pip install -q --no-deps --no-build-isolation -e .
            python bench/gpu_suite.py --out $OUT
Sections, sized for under 7 minutes on one H100:
  env    GPU, driver, torch, triton, and the two ceilings measured in the same run: an 8192^3 bf16 matmul
         (TFLOP/s) and a 2 GiB device-to-device copy (TB/s, bytes read + written)
  check  every backend against the reference on fresh random inputs in fp32 and bf16 (suite_checks.py:
         ragged shapes, V = 262,144, softcap, temperature, tail bucket, vocab maps; loss and all gradients),
         the host syncs of one engine micro-step, the engine's packing check (attention kept inside the
         examples of a packed row) for sdpa, eager and flash-attention where installed, and `pytest -m gpu`
  loss   forward+backward at N = 16,384, T = 3, K = 8, bf16, for H = 4,096 / V = 128,256 (Llama-3) and
         H = 3,840 / V = 262,144 (Gemma-3): triton, triton (deterministic), chunked, Cut Cross-Entropy (CE
         only), Liger fused-linear CE (CE only), Liger fused-linear JSD (one dense teacher), naive dense;
         median ms (triton.testing.do_bench), peak MiB above the inputs, TFLOP/s counted as 6 N H V and its
         fraction of the measured matmul peak
  step   one optimizer step of a random-init Llama-shaped student (H 2048, 16 layers, V 128,256, sdpa; 1.2B)
         at 2 x 2048 tokens: the engine under DeepSpeed ZeRO-0 and ZeRO-3 (one process) against a
         FuseLLM-style dense loop; target tokens/s and peak memory
--dry-run runs the same code on the CPU with tiny shapes (Triton under its interpreter; peers that need CUDA
are reported as skipped); the test suite runs it, so the suite cannot rot between GPU runs.
Writes gpu_suite.json and gpu_suite.md to --out (default $OUT, else bench/results); the table prints last.
"""

from __future__ import annotations

import os
import sys

DRY = "--dry-run" in sys.argv
if DRY:  # before torch / triton / profuser.kernels are imported: the kernels read it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import harness  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "check", "loss", "step")
LOSS_METHODS = ["triton", "triton_det", "chunked", "cce_ce", "liger_flce", "liger_fljsd", "naive"]
DRY_SKIP = {"cce_ce", "liger_flce", "liger_fljsd"}  # peers: CUDA kernels (CCE's CPU path is a minute of compile)


def median_ms(fn, device: torch.device, budget_ms: float = 600.0) -> float:
    """Median time of fn() in ms: triton.testing.do_bench (CUDA events) on a GPU, wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=min(100.0, budget_ms / 4), rep=budget_ms,
                                             return_mode="median"))
    _, times = harness.time_calls(fn, device, warmup=1, reps=3)
    return sorted(times)[len(times) // 2]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ sections


def section_env(device: torch.device, dry: bool) -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "device": str(device), "machine": harness.machine_name(), "dry_run": dry}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    n = 256 if dry else 8192
    dt = torch.float32 if dry else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
    ms = median_ms(lambda: a @ b, device)
    info["matmul"] = {"n": n, "dtype": str(dt), "ms": ms, "tflops": 2 * n**3 / ms / 1e9}
    nbytes = (64 if dry else 2048) * 2**20
    x = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device)
    info["copy"] = {"bytes": nbytes, "ms": ms, "tb_per_s": 2 * nbytes / ms / 1e9}
    a = b = x = y = None  # noqa: F841 - release before the next section
    free_memory(device)
    return info


def section_check(device: torch.device, dry: bool) -> dict:
    import suite_checks

    out = {"backends": suite_checks.run_checks(device, dry), "syncs": suite_checks.sync_check(device),
           "packing": suite_checks.packing_check(device, dry)}
    if device.type == "cuda":
        env = dict(os.environ, PROFUSER_TEST_REAL_TRITON="1", PYTHONUNBUFFERED="1")
        env.pop("TRITON_INTERPRET", None)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            str(REPO / "tests")], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        out["pytest_gpu"] = {"returncode": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1],
                             "tail": r.stdout[-2000:] if r.returncode else ""}
    else:
        out["pytest_gpu"] = {"returncode": None, "summary": "skipped: no CUDA"}
    return out


def section_loss(device: torch.device, dry: bool, matmul_tflops: float | None) -> list[dict]:
    import bench_loss
    import shapes

    cases = ["tiny:64"] if dry else ["llama3-8b:16384", "gemma3-12b:16384"]
    methods = [m for m in LOSS_METHODS if not (dry and m in DRY_SKIP)]
    dtype = torch.float32 if dry else torch.bfloat16
    rows = []
    for case in cases:
        model, n = case.split(":")
        shp = shapes.get(model)
        N, H, V = int(n), shp.hidden, shp.vocab
        for method in methods:
            row = {"case": case, "method": method, "N": N, "H": H, "V": V, "T": bench_loss.T, "K": bench_loss.K,
                   "dtype": str(dtype)}
            free_memory(device)
            try:
                inp = bench_loss.make_inputs(model, N, dtype, device)
                step, row["note"] = bench_loss.build_method(method, inp, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    row["loss"] = step()
                    torch.cuda.synchronize()
                    row["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                else:
                    mem = harness.PeakMemory(device)
                    row["loss"] = step()
                    row["peak_mem_mib"] = mem.peak_mb()
                row["ms"] = median_ms(step, device, budget_ms=400.0 if method != "naive" else 200.0)
                row["tflops_6nhv"] = 6 * N * H * V / row["ms"] / 1e9
                if matmul_tflops:
                    row["fraction_of_matmul_peak"] = row["tflops_6nhv"] / matmul_tflops
                row["status"] = "ok"
            except (RuntimeError, ImportError, torch.OutOfMemoryError) as e:
                oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)
                row["status"] = "oom" if oom else "skipped"
                row["note"] = str(e).splitlines()[0][:200]
            rows.append(row)
            inp = step = None
        base_rows = {r["method"]: r for r in rows if r["case"] == case and r["status"] == "ok"}
        for r in rows:
            if r["case"] == case and r["status"] == "ok":
                for peer in ("cce_ce", "liger_fljsd", "naive"):
                    if peer in base_rows:
                        r[f"time_vs_{peer}"] = r["ms"] / base_rows[peer]["ms"]
    return rows


def section_step(device: torch.device, dry: bool) -> list[dict]:
    import bench_train
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if dry else torch.bfloat16
    if dry:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=301)
        B, L, warmup, steps = 2, 32, 1, 2
    else:
        cfg = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
        B, L, warmup, steps = 2, 2048, 2, 5
    batches, vms = bench_train.make_batches(warmup + steps, B, L, 2, 10, cfg["vocab_size"])
    rows = []
    for variant in ("fusellm", "engine", "engine-zero3", "engine-lora"):
        free_memory(device)
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa", use_cache=False)).to(device, dtype)
        row = {"variant": variant, "params_m": sum(p.numel() for p in lm.parameters()) / 1e6, "B": B, "L": L}
        try:
            row.update(bench_train.measure_variant(variant, lm.train(), batches, vms, device, dtype, warmup))
            row["status"] = "ok"
        except (RuntimeError, ImportError, torch.OutOfMemoryError) as e:
            row["status"], row["note"] = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        del lm
    base = next((r for r in rows if r["variant"] == "fusellm" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["speed_vs_fusellm"] = r["tokens_per_s"] / base["tokens_per_s"]
            if base["peak_mem_mb"] >= 1.0:  # a ratio to (almost) nothing says nothing (the dry run's tiny model)
                r["mem_vs_fusellm"] = r["peak_mem_mb"] / base["peak_mem_mb"]
    return rows


# ------------------------------------------------------------------------------------------------ report


def table(report: dict) -> str:
    env = report.get("env", {})
    lines = [f"GPU suite on {env.get('gpu', env.get('machine', '?'))} (driver {env.get('driver', '-')}, "
             f"torch {env.get('torch')}, triton {env.get('triton')}){' [DRY RUN: CPU, tiny shapes]' if DRY else ''}"]
    if "matmul" in env:
        lines.append(f"ceilings: matmul {env['matmul']['tflops']:.0f} TFLOP/s ({env['matmul']['dtype']}, "
                     f"n={env['matmul']['n']}), copy {env['copy']['tb_per_s']:.2f} TB/s")
    chk = report.get("check")
    if chk:
        bad = [r for r in chk["backends"] if not r["ok"]]
        lines.append(f"correctness: {len(chk['backends']) - len(bad)}/{len(chk['backends'])} backend checks within "
                     f"the bar" + "".join(f"\n  FAIL {r['case']} {r['backend']} {r['dtype']}: "
                                          f"{r.get('error') or {k: v for k, v in r.items() if isinstance(v, dict)}}"
                                          for r in bad))
        lines.append("host syncs in a micro-step: " + ", ".join(
            f"{b}: {'none' if s['ok'] else s}" for b, s in chk["syncs"].items()))
        lines.append("packed attention kept inside examples: " + ", ".join(
            f"{r['model']}/{r['attn_implementation']} " + (f"ok (leak {r['leak']:.1e})" if r["ok"] else
                                                           f"FAIL {r['error'][:120]}")
            for r in chk.get("packing", [])))
        lines.append(f"pytest -m gpu: {chk['pytest_gpu']['summary']}")
    if report.get("loss"):
        lines += ["", "| case | method | ms (median) | TFLOP/s (6NHV) | of matmul peak | peak MiB | vs CCE | loss |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["loss"]:
            if r["status"] != "ok":
                lines.append(f"| {r['case']} | {r['method']} | {r['status']}: {r.get('note', '')[:60]} | | | | | |")
                continue
            frac = r.get("fraction_of_matmul_peak")
            vs = r.get("time_vs_cce_ce")
            lines.append(f"| {r['case']} | {r['method']} | {r['ms']:.2f} | {r['tflops_6nhv']:.1f} | "
                         f"{'-' if frac is None else f'{100 * frac:.0f}%'} | {r['peak_mem_mib']:.0f} | "
                         f"{'-' if vs is None else f'{vs:.2f}x'} | {r['loss']:.4f} |")
    if report.get("step"):
        lines += ["", "| step variant | params (M) | trainable (M) | target tokens/s | s/step | peak MiB above setup "
                  "| total peak MiB | speed vs FuseLLM | memory vs FuseLLM |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["step"]:
            if r["status"] != "ok":
                lines.append(f"| {r['variant']} | {r['params_m']:.0f} | {r['status']}: {r.get('note', '')[:80]} |"
                             " | | | | | |")
                continue
            mem = r.get("mem_vs_fusellm")
            lines.append(f"| {r['variant']} | {r['params_m']:.0f} | {r['trainable_params_m']:.1f} | "
                         f"{r['tokens_per_s']:.0f} | {r['s_per_step']:.3f} | {r['peak_mem_mb']:.0f} | "
                         f"{r['total_peak_mem_mb']:.0f} | {r.get('speed_vs_fusellm', float('nan')):.2f}x | "
                         f"{'-' if mem is None else f'{mem:.2f}x'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted (tests use it)")
    a = ap.parse_args(argv)
    sections = [s for s in a.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        print("gpu_suite: no CUDA device; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    report: dict = {"sections": sections, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "timing_s": {}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_suite_dry" if a.dry_run else "gpu_suite"
    for sec in SECTIONS:
        if sec not in sections:
            continue
        t0 = time.time()
        print(f"[gpu_suite] {sec} ...", flush=True)
        if sec == "env":
            report["env"] = section_env(device, a.dry_run)
        elif sec == "check":
            report["check"] = section_check(device, a.dry_run)
        elif sec == "loss":
            peak = report.get("env", {}).get("matmul", {}).get("tflops") if cuda else None
            report["loss"] = section_loss(device, a.dry_run, peak)
        elif sec == "step":
            report["step"] = section_step(device, a.dry_run)
        report["timing_s"][sec] = round(time.time() - t0, 1)
        (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))  # partial results survive
    text = table(report)
    (out / f"{name}.md").write_text(text + "\n")
    print(f"\n[gpu_suite] sections took {report['timing_s']} s; wrote {out / (name + '.json')}\n")
    print(text)
    failed = [r for r in report.get("check", {}).get("backends", []) if not r["ok"]]
    syncs_bad = [b for b, s in report.get("check", {}).get("syncs", {}).items() if not s["ok"]]
    return 1 if failed or syncs_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
