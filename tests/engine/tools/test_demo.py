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
            "demo.n_train=24", "demo.n_pool=8", "demo.n_test_pool=4", "demo.n_val=4", "demo.n_eval=6",
            "demo.max_new_tokens=12", "optim.max_steps=4", f"demo.specialist.out={run / 'specialist'}",
            "demo.specialist.max_steps=2", "data.sources=[specialist, gemma3-270m]",
            f"demo.scorers=[judge:{run / 'specialist'}, judge:gemma3-270m]",
            "optim.warmup_steps=1", "checkpoint.every=2", "eval.every=2", "eval.n_samples=1",
            "eval.max_new_tokens=8", "data.micro_batch_size=2", "optim.grad_accum=1", "log.progress=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "profuser.engine.cli", "demo", "--config", str(REPO / "configs" / "demo.yaml"), *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report = json.loads((run / "train" / "report" / "report.json").read_text())
    names = set(report["results"])
    # the Gemma-3 target is also a source (student as candidate): evaluated once, as the target
    assert names == {"student (after)", "target (before)", "source specialist"}
    assert (run / "specialist" / "selected.json").is_file()  # the specialist's step was picked on val.jsonl
    assert json.loads((run / "train" / "final" / "selected.json").read_text())["step"] in (2, 4)
    for r in report["results"].values():
        assert r["n_examples"] == 6 and 0 < r["bits_per_byte"] < 10
    assert "| student (after) |" in p.stdout and (run / "train" / "final" / "model.safetensors").is_file()
    # the final table: the demo's run beside plain fine-tuning and FuseLLM, same held-out examples
    for folder, n in (("table", 6), ("table-pool", 4)):
        table = json.loads((run / folder / "report.json").read_text())["results"]
        assert {"plain fine-tuning (sft)", "FuseLLM (train_only)", "sequence-level KD (seqkd)", "target (before)",
                "source specialist"} <= set(table)
        assert all(r["n_examples"] == n for r in table.values())
    assert "plain fine-tuning (sft)" in p.stdout and "the in-pool test pairs" in p.stdout
    # a second run skips every finished stage
    p2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0 and p2.stdout.count("done earlier, skipped") == 8, p2.stdout[-2000:]


def _demo_cfg(tmp_path, *extra):
    from profuser.engine.config import load_config

    run = tmp_path / "demo"
    return load_config(str(REPO / "configs" / "demo.yaml"),
                       [f"output_dir={run / 'train'}", f"data.data_dir={run / 'data'}",
                        f"data.infer_data_dir={run / 'data-infer'}", "demo.n_train=12", "demo.n_pool=6",
                        "demo.n_test_pool=2", "demo.n_val=3", "demo.n_eval=3", *extra])


def test_demo_stage_markers_rerun_on_changed_inputs(tmp_path, monkeypatch, capsys):
    """No models: the stage runner is recorded. Same inputs -> every stage skipped; another demo size ->
    prepare..train re-run with their overwrite flags; --force -> everything re-run with them too."""
    from profuser.engine.tools import demo

    calls = []
    monkeypatch.setattr(demo, "_has_cuda", lambda: False)
    monkeypatch.setattr(demo, "run_stage", lambda cmd, env: calls.append(cmd) or 0)
    names = ["prepare", "specialist", "specialist", "teach", "generate", "score", "train", "baselines", "baselines",
             "table"]
    every = ["prepare"] + names
    stage_names = list(dict.fromkeys(every))

    def stage_of(cmd):
        if "profuser.engine.train" in cmd:
            if any(c.startswith("model.student=") for c in cmd):
                return "specialist"
            return "baselines" if any(c.startswith("schedule.kind=") for c in cmd) else "train"
        sub = cmd[cmd.index("profuser.engine.cli") + 1]
        if sub == "teach" and cmd[cmd.index("--source") + 1:cmd.index("--k")] == ["smollm2-135m-instruct"]:
            return "specialist"
        return {"eval": "table"}.get(sub, sub)

    def run(cfg, overrides_=(), **kw):
        calls.clear()
        demo.run_pipeline(cfg, None, list(overrides_), **kw)
        return [(stage_of(c), c) for c in calls]

    cfg = _demo_cfg(tmp_path, "demo.baselines=[sft, train_only]", "demo.n_test_pool=0")
    first = run(cfg)
    assert [s for s, _ in first] == every
    kinds = [[c for c in cmd if c.startswith("schedule.kind=")] for s, cmd in first if s == "baselines"]
    assert kinds == [["schedule.kind=sft"], ["schedule.kind=train_only"]]
    assert not any("--overwrite" in c or "checkpoint.resume=never" in c for _, c in first)
    capsys.readouterr()

    # (a) the same config again: every stage skipped
    assert run(cfg) == []
    assert capsys.readouterr().out.count("done earlier, skipped") == len(stage_names)

    # (b) another demo size changes train.jsonl: prepare (both commands) ... train re-run, overwriting
    again = run(_demo_cfg(tmp_path, "demo.baselines=[sft, train_only]", "demo.n_test_pool=0", "demo.n_train=16"))
    assert [s for s, _ in again] == every
    for stage, cmd in again:
        if stage in ("prepare", "teach", "generate") or (stage == "specialist" and "teach" in cmd):
            assert cmd[-1] == "--overwrite", cmd
    assert all(c[-1] == "checkpoint.resume=never" for s, c in again
               if s in ("train", "baselines") or (s == "specialist" and "profuser.engine.train" in c))

    # the final pipeline: the pool's in-pool test gets its own table, seqkd is two_stage with CE only
    cfg = _demo_cfg(tmp_path, "demo.n_train=16")
    got = run(cfg)
    assert [s for s, _ in got][-6:] == ["train", "baselines", "baselines", "baselines", "table", "table"]
    seqkd = next(c for s, c in got if s == "baselines" and any(x.endswith("-seqkd") for x in c))
    assert "schedule.kind=two_stage" in seqkd and "loss.lam=1.0" in seqkd
    tables = [c[c.index("--out") + 1] for s, c in got if s == "table"]
    assert [Path(t).name for t in tables] == ["table", "table-pool"]
    assert run(cfg) == []

    # another jury re-runs the vote and what follows, never the specialist or the stores
    jury = "demo.scorers=[judge:gemma3-270m]"  # in the config and among the overrides, as `profuser demo` has it
    run(_demo_cfg(tmp_path, "demo.n_train=16"), overrides_=["demo.n_val=3"])  # keys with demo overrides given
    got = run(_demo_cfg(tmp_path, "demo.n_train=16", jury), overrides_=["demo.n_val=3", jury])
    assert [s for s, _ in got][0] == "score" and "judge:gemma3-270m" in got[0][1]
    assert not any(c.startswith("demo.") for _, cmd in got for c in cmd if "profuser.engine.train" in cmd)

    # n_eval only feeds train (heldout.jsonl): the stores and the specialist are kept
    got = run(_demo_cfg(tmp_path, "demo.n_train=16", "demo.n_eval=4", jury), overrides_=["demo.n_val=3", jury])
    assert [s for s, _ in got][:2] == ["train", "baselines"]

    # a stage that fails while overwriting keeps overwriting when re-run with the same inputs
    monkeypatch.setattr(demo, "run_stage", lambda cmd, env: calls.append(cmd) or int(stage_of(cmd) == "teach"))
    with pytest.raises(SystemExit):
        run(_demo_cfg(tmp_path, "demo.n_train=20"))
    monkeypatch.setattr(demo, "run_stage", lambda cmd, env: calls.append(cmd) or 0)
    resumed = run(_demo_cfg(tmp_path, "demo.n_train=20"))
    assert [s for s, _ in resumed][0] == "teach" and resumed[0][1][-1] == "--overwrite"

    # --force: every stage again, with the overwrite flags; --until stops after the named stage
    forced = run(_demo_cfg(tmp_path, "demo.n_train=20"), force=True, until="score")
    assert [s for s, _ in forced] == every[:every.index("score") + 1]
    assert all(c[-1] in ("--overwrite", "checkpoint.resume=never") for s, c in forced if s != "score")
    # ... also when that stage finished earlier (a study building its stores again): nothing after it runs
    assert run(_demo_cfg(tmp_path, "demo.n_train=20"), until="score") == []
    from profuser.engine.config import ConfigError

    with pytest.raises(ConfigError, match="--until scroe: not a stage of this demo"):
        run(_demo_cfg(tmp_path, "demo.n_train=20"), until="scroe")

    # demo.baselines=[] keeps the pipeline without controls (no baseline runs, no table)
    got = run(_demo_cfg(tmp_path, "demo.n_train=20", "demo.baselines=[]"), force=True)
    assert [s for s, _ in got] == every[:every.index("train") + 1]


def test_the_demo_split_keeps_the_pool_answers_out_of_every_training_file(tmp_path):
    """split: gold pairs, the pool (prompts only), validation, the out-of-pool tail; the in-pool test is the
    pool's last prompts with their gold answers. No id is in two training or test roles."""
    from profuser.engine.tools import demo

    cfg = _demo_cfg(tmp_path, "demo.n_pool=10", "demo.n_test_pool=4")
    run = tmp_path / "demo"
    demo.split_corpus(cfg, run)
    parts = {f: [json.loads(x) for x in (run / f"{f}.jsonl").read_text().splitlines()] for f in demo.SPLIT_FILES}
    assert {f: len(v) for f, v in parts.items()} == {"train": 12, "infer": 10, "val": 3, "heldout": 3,
                                                     "test_pool": 4}
    assert all(set(r) <= {"id", "prompt", "system"} for r in parts["infer"])  # no answer in the pool's file
    ids = {f: {r["id"] for r in v} for f, v in parts.items()}
    assert ids["test_pool"] <= ids["infer"] and [r["id"] for r in parts["infer"][-4:]] == [r["id"] for r in
                                                                                          parts["test_pool"]]
    for a, b in (("train", "infer"), ("train", "val"), ("infer", "val"), ("val", "heldout"), ("train", "heldout"),
                 ("infer", "heldout")):
        assert not ids[a] & ids[b], (a, b)
    with pytest.raises(ValueError, match="demo.n_test_pool=11 must be <= demo.n_pool=10"):
        demo.split_corpus(_demo_cfg(tmp_path, "demo.n_pool=10", "demo.n_test_pool=11"), run)
    with pytest.raises(ValueError, match=r"n_train \+ n_pool \+ n_val \+ n_eval = 3018 > 3000 rows"):
        demo.split_corpus(_demo_cfg(tmp_path, "demo.n_pool=3000"), run)


def test_the_prepare_stage_runs_in_process_through_its_command(tmp_path, monkeypatch, capsys):
    """`prepare` loads no model: the demo runs its printed command in its own process (the same parser and
    function as `profuser prepare`), an error as the command's one line; other commands get a process each."""
    from profuser.engine import store
    from profuser.engine.tools import demo

    def no_subprocess(*a, **kw):
        raise AssertionError("prepare ran in a subprocess")

    monkeypatch.setattr(demo.subprocess, "run", no_subprocess)
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "Define 'eel'.", "response": "A long fish."}) + "\n")
    cmd = demo._profuser("prepare", "--input", str(src), "--data-dir", str(tmp_path / "d"), "--id-field", "id")
    assert demo.run_stage(cmd, {}) == 0
    assert store.PreparedManifest.load(tmp_path / "d").n_examples == 1
    src.write_text('{"id": "a", "prompt": "x"}\n')
    assert demo.run_stage(cmd + ["--overwrite"], {}) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("profuser prepare: error: ") and "train.jsonl:1: missing field 'response'" in err[-1]
    with pytest.raises(AssertionError, match="subprocess"):
        demo.run_stage(demo._profuser("teach", "--data-dir", str(tmp_path / "d")), {})
