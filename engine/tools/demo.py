"""`profuser demo` (`make demo`): the whole ProFuser pipeline on the shipped corpus with real small models.

Stages (each one a `profuser` subcommand in its own process, so a model's memory is returned to the OS
before the next stage loads another):

    split     corpus -> <run>/train.jsonl (n_train), infer.jsonl (the first n_infer of those prompts),
              heldout.jsonl (n_eval rows from the corpus tail, never trained on)
    prepare   train.jsonl -> <run>/data/prepared, infer.jsonl -> <run>/data-infer/prepared
    teach     training mode: every source teacher-forced on the gold responses (top-k log-probs)
    generate  inference mode: every source answers the inference prompts (top-k log-probs captured)
    score     the scorers vote for the best generated response per prompt
    train     progressive fusion (two_stage) of the target (Gemma-3-270M), ZeRO-3 (python -m profuser.engine.train)
              (its report: target before, target after, every source, NLL per token and per byte, samples)
    baselines the same training run with each schedule of demo.baselines (sft: plain fine-tuning on the gold
              answers; train_only: FuseLLM), into <output_dir>-<kind>
    table     `profuser eval` of every model on the held-out answers: the demo's result beside its baselines

Idempotent and resumable: a stage that finished leaves `<run>/.done-<stage>` holding its key, a hash of
ALL its commands, of the inputs it reads (sha256 of the split JSONL files, the demo sizes) and of the
previous stage's key; it is skipped on a re-run with the same key. A changed key (e.g. `--scale` or a
`demo.n_*` override changed the split files) re-runs that stage and, through the chained keys, every stage
after it, with the commands' overwrite flags (`--overwrite`, `checkpoint.resume=never` for train) so they
replace what the old inputs built instead of refusing it / resuming from it; `--force` does the same for every
stage. Inside a stage, the commands resume from their own completed shards / checkpoints (an interrupted
stage re-run with the same key resumes; one that was overwriting keeps overwriting until it finishes).
`--scale S` multiplies the example counts and the optimizer steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..config import ConfigError, TrainConfig, config_path, load_config
from ..config_cli import add_config_arguments, flag_overrides, keys_help
from ..models import reference_models
from ..passes.prepare import shipped_corpus


def shipped_config() -> Path:
    """configs/demo.yaml, installed with the package as profuser.configs (the embedded default)."""
    return config_path("demo")


def _run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.data.data_dir).parent


def split_corpus(cfg: TrainConfig, run: Path) -> None:
    """Write train / infer / heldout JSONL files from the corpus (deterministic: first rows / tail)."""
    corpus = Path(cfg.demo.corpus) if cfg.demo.corpus else shipped_corpus()
    if not corpus.is_file():
        raise FileNotFoundError(f"demo.corpus: {corpus} does not exist")
    rows = [json.loads(x) for x in corpus.read_text().splitlines() if x.strip()]
    d = cfg.demo
    if d.n_train + d.n_eval > len(rows):
        raise ValueError(f"demo.n_train + demo.n_eval = {d.n_train + d.n_eval} > {len(rows)} rows in {corpus}")
    if d.n_infer > d.n_train:
        raise ValueError(f"demo.n_infer={d.n_infer} must be <= demo.n_train={d.n_train}")
    train, heldout = rows[:d.n_train], rows[len(rows) - d.n_eval:]
    run.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("infer", train[:d.n_infer]), ("heldout", heldout)):
        (run / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def _profuser(*args: str) -> list[str]:
    return [sys.executable, "-m", "profuser.engine.cli", *args]


def stages(cfg: TrainConfig, config_path: str | None, overrides: list[str]) -> list[tuple[str, list]]:
    run = _run_dir(cfg)
    data, data_inf = cfg.data.data_dir, cfg.data.infer_data_dir or cfg.data.data_dir
    sources = list(cfg.data.sources)
    # the default engine adds nothing to the commands: stage keys (and so finished stages) stay valid
    engine = ["--engine", cfg.data.teacher_engine] if cfg.data.teacher_engine != "hf" else []
    train_cmd = [sys.executable, "-m", "profuser.engine.train"]
    if config_path:
        train_cmd += ["--config", config_path]
    k = ["--k", str(cfg.data.k)] if cfg.data.k is not None else []  # None: the loader's smallest stored k
    return [
        ("prepare", [_profuser("prepare", "--input", str(run / "train.jsonl"), "--data-dir", data, "--id-field", "id"),
                     _profuser("prepare", "--input", str(run / "infer.jsonl"), "--data-dir", data_inf,
                               "--id-field", "id")]),
        ("teach", [_profuser("teach", "--data-dir", data, "--source", *sources, *k,
                             "--max-length", str(cfg.data.max_length), "--no-progress", *engine)]),
        ("generate", [_profuser("generate", "--data-dir", data_inf, "--source", *sources, *k,
                                "--max-new-tokens", str(cfg.demo.max_new_tokens), "--no-progress", *engine)]),
        ("score", [_profuser("score", "--data-dir", data_inf, "--sources", *sources, "--scorer", *cfg.demo.scorers,
                             "--student", cfg.model.student)]),
        ("train", [train_cmd + overrides]),
    ] + baseline_stages(cfg, train_cmd + overrides)


BASELINE_NAMES = {"sft": "plain fine-tuning (sft)", "train_only": "FuseLLM (train_only)"}


def baseline_stages(cfg: TrainConfig, train_cmd: list[str]) -> list[tuple[str, list]]:
    """The baseline runs and the final table (none when demo.baselines is empty)."""
    kinds = list(cfg.demo.baselines)
    if not kinds:
        return []
    out = Path(cfg.output_dir)
    runs = [train_cmd + [f"schedule.kind={k}", f"output_dir={out}-{k}", "eval.data=null"] for k in kinds]
    models = [f"ProFuser ({cfg.schedule.kind}, the demo's run)={out / 'final'}"]
    models += [f"{BASELINE_NAMES.get(k, k)}={out}-{k}/final" for k in kinds]
    models += [f"{label}={spec}" for label, spec in
               reference_models(cfg.model.student, {s: s for s in cfg.data.sources}).items()]
    table = _profuser("eval", "--data", str(_run_dir(cfg) / "heldout.jsonl"),
                      "--max-examples", str(cfg.eval.max_examples),
                      "--max-length", str(cfg.data.max_length), "--out", str(_run_dir(cfg) / "table"),
                      *[a for m in models for a in ("--model", m)])
    return [("baselines", runs), ("table", [table])]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_inputs(cfg: TrainConfig, run: Path) -> dict[str, dict]:
    """What each stage reads besides its command line and the stages before it (content hashes, sizes)."""
    d = cfg.demo
    return {
        "prepare": {"train.jsonl": _sha256(run / "train.jsonl"), "infer.jsonl": _sha256(run / "infer.jsonl"),
                    "corpus": d.corpus, "n_train": d.n_train, "n_infer": d.n_infer},
        "train": {"heldout.jsonl": _sha256(run / "heldout.jsonl"), "n_eval": d.n_eval},
    }


def stage_key(name: str, cmds: list[list[str]], inputs: dict, previous: str) -> str:
    """Chained key: every command (without the interpreter), the stage's inputs, the previous stage's key."""
    doc = {"stage": name, "cmds": [c[1:] for c in cmds], "inputs": inputs, "previous": previous}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def with_overwrite(name: str, cmds: list[list[str]]) -> list[list[str]]:
    """The stage's commands told to replace what other inputs built (they refuse / resume by default)."""
    if name in ("prepare", "teach", "generate"):
        return [c + ["--overwrite"] for c in cmds]
    if name in ("train", "baselines"):
        return [c + ["checkpoint.resume=never"] for c in cmds]
    return cmds  # score rewrites its outputs on every run


def _read_marker(marker: Path) -> dict | None:
    try:
        obj = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {} if marker.exists() else None  # an old-format marker: some earlier, different run
    return obj if isinstance(obj, dict) else {}


def run_stage(cmd: list[str], env: dict) -> int:
    return subprocess.run(cmd, env=env).returncode


def run_pipeline(cfg: TrainConfig, config_path: str | None, overrides: list[str], *, force: bool = False) -> Path:
    run = _run_dir(cfg)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    timings: dict[str, float] = {}
    split_corpus(cfg, run)
    inputs = stage_inputs(cfg, run)
    key = ""
    for name, cmds in stages(cfg, config_path, overrides):
        marker = run / f".done-{name}"
        key = stage_key(name, cmds, inputs.get(name, {}), key)
        old = _read_marker(marker)
        if not force and old is not None and old.get("key") == key and old.get("state") == "done":
            print(f"[demo] {name}: done earlier, skipped", flush=True)
            continue
        # replace what other inputs built: forced, the stage finished / started with another key, or an
        # interrupted overwriting attempt with this key (its stores / checkpoints may still be the old ones)
        overwrite = force or (old is not None and (old.get("key") != key or old.get("overwrite", False)))
        marker.write_text(json.dumps({"state": "running", "key": key, "overwrite": overwrite}))
        if overwrite:
            cmds = with_overwrite(name, cmds)
        t0 = time.time()
        print(f"[demo] {name}: " + " ; ".join(" ".join(c[1:]) for c in cmds), flush=True)
        for cmd in cmds:
            rc = run_stage(cmd, env)
            if rc:
                raise SystemExit(f"[demo] stage {name} failed (exit {rc}): {' '.join(cmd)}")
        marker.write_text(json.dumps({"state": "done", "key": key, "cmds": [c[1:] for c in cmds]}))
        timings[name] = time.time() - t0
        peak = train_peak_gb(cmds, cfg)
        print(f"[demo] {name}: {timings[name]:.0f} s" + (f", peak resident memory {peak:.1f} GB (the largest "
                                                         "training process)" if peak else ""), flush=True)
    report = Path(cfg.output_dir) / "report" / "report.md"
    if report.exists():
        print("\n" + report.read_text(), flush=True)
    table = run / "table" / "report.md"
    if cfg.demo.baselines and table.exists():
        print("\n## The demo's run beside its baselines (same config, steps and batches)\n\n"
              + table.read_text(), flush=True)
    (run / "timings.json").write_text(json.dumps(timings, indent=2))
    return report


def train_peak_gb(cmds: list, cfg: TrainConfig) -> float | None:
    """The largest peak resident memory (GB) the training runs of a stage logged (metrics.jsonl peak_mem_mb);
    None when the stage trains nothing."""
    peaks = []
    for cmd in cmds:
        if "profuser.engine.train" not in cmd:
            continue
        out = next((a.split("=", 1)[1] for a in reversed(cmd) if a.startswith("output_dir=")), cfg.output_dir)
        metrics = Path(out) / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            peaks += [r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb")]
    return max(peaks) / 1000 if peaks else None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def scale_overrides(cfg: TrainConfig, scale: float) -> list[str]:
    """key=value overrides that scale the demo's sizes (examples, prompts, steps, checkpoint/eval period)."""
    if scale == 1:
        return []
    s = lambda v: max(1, int(round(v * scale)))  # noqa: E731
    return [f"demo.n_train={s(cfg.demo.n_train)}", f"demo.n_infer={s(cfg.demo.n_infer)}",
            f"optim.max_steps={s(cfg.optim.max_steps)}", f"checkpoint.every={s(cfg.checkpoint.every)}",
            f"eval.every={s(cfg.eval.every)}", f"optim.warmup_steps={s(cfg.optim.warmup_steps)}"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = keys_help()
    p.add_argument("--config", default=None, help="experiment YAML or a shipped config's name (default: demo)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply example counts and steps (e.g. 4)")
    p.add_argument("--force", action="store_true", help="re-run every stage even if it finished before")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `profuser train`")
    add_config_arguments(p, TrainConfig, config_and_overrides=False)


def run_command(args: argparse.Namespace) -> int:
    args.config = args.config or str(shipped_config())
    given = flag_overrides(args) + list(args.overrides)
    try:
        cfg0 = load_config(args.config, given)
        # the held-out file is written by the split stage next to the stores
        heldout = f"eval.data={Path(cfg0.data.data_dir).parent / 'heldout.jsonl'}"
        overrides = given + scale_overrides(cfg0, args.scale) + [heldout]
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"profuser demo: config error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    run_pipeline(cfg, args.config, overrides, force=args.force)
    print(f"[demo] total {time.time() - t0:.0f} s", flush=True)
    return 0
