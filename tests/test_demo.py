"""`profuser demo` end to end with the real models (SmolLM2-135M-Instruct target + Gemma-3-270M), scaled
down: prepare -> teach -> generate -> score -> train (two_stage, ZeRO-3) -> report. Slow (minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_small(tmp_path):
    run = tmp_path / "demo"
    args = [f"output_dir={run / 'train'}", f"data.data_dir={run / 'data'}", f"data.infer_data_dir={run / 'data-infer'}",
            "demo.n_train=24", "demo.n_infer=8", "demo.n_eval=6", "demo.max_new_tokens=12", "optim.max_steps=4",
            "optim.warmup_steps=1", "checkpoint.every=2", "eval.every=2", "eval.n_samples=1",
            "eval.max_new_tokens=8", "data.micro_batch_size=2", "optim.grad_accum=1", "log.progress=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "profuser.engine.cli", "demo", "--config", str(REPO / "configs" / "demo.yaml"), *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report = json.loads((run / "train" / "report" / "report.json").read_text())
    names = set(report["results"])
    assert {"student (after)", "target (before)", "source smollm2-135m-instruct", "source gemma3-270m"} <= names
    for r in report["results"].values():
        assert r["n_examples"] == 6 and 0 < r["bits_per_byte"] < 10
    assert "| student (after) |" in p.stdout and (run / "train" / "final" / "model.safetensors").is_file()
    # a second run skips every finished stage
    p2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0 and p2.stdout.count("done earlier, skipped") == 5, p2.stdout[-2000:]
