"""bench/gpu_suite.py --dry-run: the GPU suite's code paths on the CPU (Triton under its interpreter), so the
suite a GPU session runs first cannot rot between GPU runs. Real assertions on its report: every backend
check within the bar, no host sync in a micro-step, the losses of every method the same, the step variants
trained."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "gpu_suite_dry.md").read_text().startswith("GPU suite on")
    return json.loads((out / "gpu_suite_dry.json").read_text())


def test_every_section_ran(report):
    assert report["sections"] == ["env", "check", "loss", "step"]
    assert set(report["timing_s"]) == set(report["sections"])
    env = report["env"]
    assert env["dry_run"] and env["matmul"]["tflops"] > 0 and env["copy"]["tb_per_s"] > 0


def test_backend_checks_pass_and_cover_the_matrix(report):
    rows = report["check"]["backends"]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert {r["backend"] for r in rows} == {"chunked", "triton", "triton-deterministic"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert {"tail-bucket", "softcap+temperature", "gemma-vocab"} <= {r["case"] for r in rows}
    assert all(r["ground_truth"] == "torch.float64" for r in rows)
    assert all(k in rows[0] for k in ("loss", "d_hidden", "d_weight"))


def test_the_packing_check_runs_on_both_model_shapes(report):
    rows = report["check"]["packing"]
    assert {(r["model"], r["attn_implementation"]) for r in rows} == {
        (m, a) for m in ("llama", "gemma3") for a in ("sdpa", "eager")}
    assert all(r["ok"] and r["leak"] <= 1e-5 for r in rows), rows


def test_micro_step_sync_free(report):
    syncs = report["check"]["syncs"]
    assert set(syncs) == {"chunked", "triton"} and all(s["ok"] for s in syncs.values()), syncs


def test_loss_methods_agree(report):
    rows = {r["method"]: r for r in report["loss"]}
    assert {m for m, r in rows.items() if r["status"] == "ok"} == {"triton", "triton_det", "chunked", "naive"}
    losses = [rows[m]["loss"] for m in ("triton", "triton_det", "chunked", "naive")]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses
    assert all(rows[m]["ms"] > 0 and rows[m]["tflops_6nhv"] > 0 for m in ("triton", "chunked", "naive"))


def test_step_variants_trained(report):
    rows = {r["variant"]: r for r in report["step"]}
    assert set(rows) == {"fusellm", "engine", "engine-zero3", "engine-lora"}
    # LoRA trains the adapter alone: a small share of the parameters (the dry run's tiny model: q/k/v/o of 2 layers)
    assert 0 < rows["engine-lora"]["trainable_params_m"] < 0.5 * rows["engine"]["trainable_params_m"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows.values()), rows
