"""`profuser demo` end to end with the real models (SmolLM2-135M-Instruct target + Gemma-3-270M), scaled
down: prepare -> teach -> generate -> score -> train (two_stage, ZeRO stage 0: one process) -> report. Slow
(minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


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
    # the Gemma-3 target is also a source (student as candidate): evaluated once, as the target
    assert names == {"student (after)", "target (before)", "source smollm2-135m-instruct"}
    for r in report["results"].values():
        assert r["n_examples"] == 6 and 0 < r["bits_per_byte"] < 10
    assert "| student (after) |" in p.stdout and (run / "train" / "final" / "model.safetensors").is_file()
    # the final table: the demo's run beside plain fine-tuning and FuseLLM, same held-out examples
    table = json.loads((run / "table" / "report.json").read_text())["results"]
    assert {"plain fine-tuning (sft)", "FuseLLM (train_only)", "target (before)"} <= set(table)
    assert all(r["n_examples"] == 6 for r in table.values())
    assert "plain fine-tuning (sft)" in p.stdout
    # a second run skips every finished stage
    p2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0 and p2.stdout.count("done earlier, skipped") == 7, p2.stdout[-2000:]


def _demo_cfg(tmp_path, *extra):
    from profuser.engine.config import load_config

    run = tmp_path / "demo"
    return load_config(str(REPO / "configs" / "demo.yaml"),
                       [f"output_dir={run / 'train'}", f"data.data_dir={run / 'data'}",
                        f"data.infer_data_dir={run / 'data-infer'}", "demo.n_train=12", "demo.n_infer=4",
                        "demo.n_eval=3", *extra])


def test_demo_stage_markers_rerun_on_changed_inputs(tmp_path, monkeypatch, capsys):
    """No models: the stage runner is recorded. Same inputs -> every stage skipped; another demo size ->
    prepare..train re-run with their overwrite flags; --force -> everything re-run with them too."""
    from profuser.engine.tools import demo

    calls = []
    monkeypatch.setattr(demo, "_has_cuda", lambda: False)
    monkeypatch.setattr(demo, "run_stage", lambda cmd, env: calls.append(cmd) or 0)
    names = ["prepare", "teach", "generate", "score", "train", "baselines", "baselines", "table"]
    every = ["prepare"] + names

    def stage_of(cmd):
        if "profuser.engine.train" in cmd:
            return "baselines" if any(c.startswith("schedule.kind=") for c in cmd) else "train"
        sub = cmd[cmd.index("profuser.engine.cli") + 1]
        return {"eval": "table"}.get(sub, sub)

    def run(cfg, **kw):
        calls.clear()
        demo.run_pipeline(cfg, None, [], **kw)
        return [(stage_of(c), c) for c in calls]

    cfg = _demo_cfg(tmp_path)
    first = run(cfg)
    assert [s for s, _ in first] == every
    kinds = [c[-3] for s, c in first if s == "baselines"]
    assert kinds == ["schedule.kind=sft", "schedule.kind=train_only"]
    assert not any("--overwrite" in c or "checkpoint.resume=never" in c for _, c in first)
    capsys.readouterr()

    # (a) the same config again: every stage skipped
    assert run(_demo_cfg(tmp_path)) == []
    assert capsys.readouterr().out.count("done earlier, skipped") == 7

    # (b) another demo size changes train.jsonl: prepare (both commands) ... train re-run, overwriting
    again = run(_demo_cfg(tmp_path, "demo.n_train=16"))
    assert [s for s, _ in again] == every
    for stage, cmd in again:
        if stage in ("prepare", "teach", "generate"):
            assert cmd[-1] == "--overwrite", cmd
    assert all(c[-1] == "checkpoint.resume=never" for s, c in again if s in ("train", "baselines"))
    assert run(_demo_cfg(tmp_path, "demo.n_train=16")) == []

    # n_eval only feeds train (heldout.jsonl): the stores are kept
    assert [s for s, _ in run(_demo_cfg(tmp_path, "demo.n_train=16", "demo.n_eval=4"))] == names[4:]

    # a stage that fails while overwriting keeps overwriting when re-run with the same inputs
    monkeypatch.setattr(demo, "run_stage", lambda cmd, env: calls.append(cmd) or int(stage_of(cmd) == "teach"))
    with pytest.raises(SystemExit):
        run(_demo_cfg(tmp_path, "demo.n_train=20"))
    monkeypatch.setattr(demo, "run_stage", lambda cmd, env: calls.append(cmd) or 0)
    resumed = run(_demo_cfg(tmp_path, "demo.n_train=20"))
    assert [s for s, _ in resumed] == names[1:] and resumed[0][1][-1] == "--overwrite"

    # --force: every stage again, with the overwrite flags
    forced = run(_demo_cfg(tmp_path, "demo.n_train=20"), force=True)
    assert [s for s, _ in forced] == every
    assert forced[0][1][-1] == "--overwrite" and forced[5][1][-1] == "checkpoint.resume=never"

    # demo.baselines=[] keeps the old pipeline (no baseline runs, no table)
    assert [s for s, _ in run(_demo_cfg(tmp_path, "demo.n_train=20", "demo.baselines=[]"), force=True)] == every[:6]
