"""`profuser demo` (`make demo`): the whole ProFuser pipeline on the shipped corpus with real small models.

The setting fusion is for: a small gold set, a larger pool of prompts without gold answers, sources that know
more than the target. Stages (`profuser` subcommands, printed as such; each one that loads a model runs in its
own process, so its memory is returned to the OS before the next stage loads another, and `prepare`, which
loads none, runs in the demo's process through the same function):

    split      corpus -> <run>/train.jsonl (the n_train gold pairs), infer.jsonl (the next n_pool rows as
               prompts only: the pool), val.jsonl (n_val pairs after the pool), heldout.jsonl (the n_eval pairs
               of the corpus tail: the out-of-pool test) and test_pool.jsonl (the gold answers of the pool's
               last n_test_pool prompts: the in-pool test; nothing trains on them)
    prepare    train.jsonl -> <run>/data/prepared, infer.jsonl -> <run>/data-infer/prepared (--prompts-only)
    specialist (demo.specialist.base set) the base teacher-forced on the gold pairs, then fine-tuned on them
               (sft, its step picked on val.jsonl) into demo.specialist.out: a source that knows more
    teach      training mode: every source teacher-forced on the gold responses (top-k log-probs)
    generate   inference mode: every source answers the pool's prompts (top-k log-probs captured)
    score      the scorers vote for the best generated response per prompt
    train      progressive fusion (two_stage) of the target (python -m profuser.engine.train); with n_val the
               exported step is the one with the lowest validation bits/byte
               (its report: target before, target after, every source, NLL per token and per byte, samples)
    baselines  the same training run with each of demo.baselines (BASELINES: plain fine-tuning on the gold
               pairs, FuseLLM, sequence-level distillation), into <output_dir>-<name>
    table      `profuser eval` of every model on the out-of-pool test (<run>/table) and, with n_test_pool,
               on the in-pool test (<run>/table-pool): the demo's result beside its baselines and sources

Idempotent and resumable: a stage that finished leaves `<run>/.done-<stage>` holding its key, a hash of
ALL its commands, of the inputs it reads (sha256 of the split JSONL files, the demo sizes) and of the
previous stage's key; it is skipped on a re-run with the same key. A changed key (e.g. `--scale` or a
`demo.n_*` override changed the split files) re-runs that stage and, through the chained keys, every stage
after it, with the commands' overwrite flags (`--overwrite`, `checkpoint.resume=never` for train) so they
replace what the old inputs built instead of refusing it / resuming from it; `--force` does the same for every
stage. Inside a stage, the commands resume from their own completed shards / checkpoints (an interrupted
stage re-run with the same key resumes; one that was overwriting keeps overwriting until it finishes).
`--scale S` multiplies the example counts and the optimizer steps; `--until STAGE` stops after that stage
(e.g. `--until score`: the stores a study trains from).
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

from ..config import ConfigError, TrainConfig, load_config
from ..config_cli import add_config_arguments, flag_overrides, keys_help
from ..config_tree import config_path
from ..models import model_name, reference_models
from ..passes.prepare import shipped_corpus


def shipped_config() -> Path:
    """configs/demo.yaml, installed with the package as profuser.configs (the embedded default)."""
    return config_path("demo")


def _run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.data.data_dir).parent


SPLIT_FILES = ("train", "infer", "val", "heldout", "test_pool")


def split_corpus(cfg: TrainConfig, run: Path) -> None:
    """Write the split files from the corpus (deterministic: consecutive rows, the test pairs from the tail)."""
    corpus = Path(cfg.demo.corpus) if cfg.demo.corpus else shipped_corpus()
    if not corpus.is_file():
        raise FileNotFoundError(f"demo.corpus: {corpus} does not exist")
    rows = [json.loads(x) for x in corpus.read_text().splitlines() if x.strip()]
    d = cfg.demo
    need = d.n_train + d.n_pool + d.n_val + d.n_eval
    if need > len(rows):
        raise ValueError(f"demo.n_train + n_pool + n_val + n_eval = {need} > {len(rows)} rows in {corpus}")
    if d.n_test_pool > d.n_pool:
        raise ValueError(f"demo.n_test_pool={d.n_test_pool} must be <= demo.n_pool={d.n_pool}")
    a, b = d.n_train, d.n_train + d.n_pool
    pool = rows[a:b]
    parts = {"train": rows[:a],
             # the pool's prompts only: its gold answers never reach a store
             "infer": [{k: r[k] for k in ("id", "prompt", "system") if k in r} for r in pool],
             "val": rows[b:b + d.n_val], "heldout": rows[len(rows) - d.n_eval:],
             "test_pool": pool[len(pool) - d.n_test_pool:] if d.n_test_pool else []}
    run.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        (run / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def _profuser(*args: str) -> list[str]:
    return [sys.executable, "-m", "profuser.engine.cli", *args]


def source_specs(cfg: TrainConfig) -> dict[str, str]:
    """{source name: model spec} of data.sources (store names): the specialist's name is its export folder's
    name (demo.specialist.out), every other name is its own spec (an alias or a folder)."""
    sp = cfg.demo.specialist
    return {n: sp.out if sp.base and n == model_name(sp.out) else n for n in cfg.data.sources}


def stages(cfg: TrainConfig, config_path: str | None, overrides: list[str]) -> list[tuple[str, list]]:
    run = _run_dir(cfg)
    data, data_inf = cfg.data.data_dir, cfg.data.infer_data_dir or cfg.data.data_dir
    sources = list(source_specs(cfg).values())
    # the default engine adds nothing to the commands: stage keys (and so finished stages) stay valid
    engine = ["--engine", cfg.data.teacher_engine] if cfg.data.teacher_engine != "hf" else []
    train_cmd = [sys.executable, "-m", "profuser.engine.train"]
    if config_path:
        train_cmd += ["--config", config_path]
    # training ignores the demo section: its overrides stay off the training commands, so that a demo-only
    # change (the jury, a size read by the split) does not change a training stage's key and re-run it
    overrides = [o for o in overrides if not o.split("=", 1)[0].lstrip("-").startswith("demo.")]
    k = ["--k", str(cfg.data.k)] if cfg.data.k is not None else []  # None: the loader's smallest stored k
    teach = lambda srcs: _profuser("teach", "--data-dir", data, "--source", *srcs, *k,  # noqa: E731
                                   "--max-length", str(cfg.data.max_length), "--no-progress", *engine)
    out = [
        ("prepare", [_profuser("prepare", "--input", str(run / "train.jsonl"), "--data-dir", data, "--id-field", "id"),
                     _profuser("prepare", "--input", str(run / "infer.jsonl"), "--data-dir", data_inf,
                               "--id-field", "id", "--prompts-only")]),
    ]
    sp = cfg.demo.specialist
    if sp.base:
        out.append(("specialist", [teach([sp.base]), train_cmd + overrides + [
            f"model.student={sp.base}", f"data.sources=[{sp.base}]", "schedule.kind=sft", f"optim.lr={sp.lr}",
            f"optim.max_steps={sp.max_steps}", f"output_dir={run / 'specialist-train'}",
            f"checkpoint.export_dir={sp.out}", "eval.data=null"]]))
    out += [
        ("teach", [teach(sources)]),
        ("generate", [_profuser("generate", "--data-dir", data_inf, "--source", *sources, *k,
                                "--max-new-tokens", str(cfg.demo.max_new_tokens), "--no-progress", *engine)]),
        ("score", [_profuser("score", "--data-dir", data_inf, "--sources", *map(model_name, sources),
                             "--scorer", *cfg.demo.scorers,
                             "--student", cfg.model.student)]),
        ("train", [train_cmd + overrides]),
    ]
    return out + baseline_stages(cfg, train_cmd + overrides)


# name: (label in the table, the overrides that make the run from the demo's config)
BASELINES = {
    "sft": ("plain fine-tuning (sft)", ["schedule.kind=sft"]),
    "train_only": ("FuseLLM (train_only)", ["schedule.kind=train_only"]),
    # sequence-level distillation: the same text as ProFuser (the pool winners' answers, then the gold pairs)
    # with CE only, so the table separates what the soft targets add from what the extra text adds
    "seqkd": ("sequence-level KD (seqkd)", ["schedule.kind=two_stage", "loss.lam=1.0"]),
}


def baseline_stages(cfg: TrainConfig, train_cmd: list[str]) -> list[tuple[str, list]]:
    """The baseline runs and the final table (none when demo.baselines is empty)."""
    names = list(cfg.demo.baselines)
    if not names:
        return []
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(f"demo.baselines: {unknown} unknown (known: {', '.join(BASELINES)})")
    out = Path(cfg.output_dir)
    runs = [train_cmd + BASELINES[n][1] + [f"output_dir={out}-{n}", "eval.data=null"] for n in names]
    models = [f"ProFuser ({cfg.schedule.kind}, the demo's run)={out / 'final'}"]
    models += [f"{BASELINES[n][0]}={out}-{n}/final" for n in names]
    models += [f"{label}={spec}" for label, spec in
               reference_models(cfg.model.student, source_specs(cfg)).items()]
    tests = [("heldout.jsonl", "table")] + ([("test_pool.jsonl", "table-pool")] if cfg.demo.n_test_pool else [])
    tables = [_profuser("eval", "--data", str(_run_dir(cfg) / data), "--max-examples", str(cfg.eval.max_examples),
                        "--max-length", str(cfg.data.max_length), "--out", str(_run_dir(cfg) / folder),
                        *[a for m in models for a in ("--model", m)]) for data, folder in tests]
    return [("baselines", runs), ("table", tables)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_inputs(cfg: TrainConfig, run: Path) -> dict[str, dict]:
    """What each stage reads besides its command line and the stages before it (content hashes, sizes)."""
    d = cfg.demo
    return {
        "prepare": {"train.jsonl": _sha256(run / "train.jsonl"), "infer.jsonl": _sha256(run / "infer.jsonl"),
                    "corpus": d.corpus, "n_train": d.n_train, "n_pool": d.n_pool},
        "specialist": {"val.jsonl": _sha256(run / "val.jsonl")},
        "train": {f"{f}.jsonl": _sha256(run / f"{f}.jsonl") for f in ("heldout", "val", "test_pool")},
    }


def stage_key(name: str, cmds: list[list[str]], inputs: dict, previous: str) -> str:
    """Chained key: every command (without the interpreter), the stage's inputs, the previous stage's key."""
    doc = {"stage": name, "cmds": [c[1:] for c in cmds], "inputs": inputs, "previous": previous}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def with_overwrite(name: str, cmds: list[list[str]]) -> list[list[str]]:
    """The stage's commands told to replace what other inputs built (they refuse / resume by default)."""
    if name in ("prepare", "teach", "generate"):
        return [c + ["--overwrite"] for c in cmds]
    if name == "specialist":
        return [cmds[0] + ["--overwrite"], cmds[1] + ["checkpoint.resume=never"]]
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
    """One command of a stage: `prepare` (it loads no model: nothing to hand back to the OS) in this process
    through the same function its command runs, every other command in a process of its own."""
    if cmd[1:4] == ["-m", "profuser.engine.cli", "prepare"]:
        from ..errors import report_errors
        from ..passes import prepare

        parser = argparse.ArgumentParser(prog="profuser prepare")
        prepare.add_arguments(parser)
        return report_errors("profuser prepare", prepare.run_command, parser.parse_args(cmd[4:]))
    return subprocess.run(cmd, env=env).returncode


def run_pipeline(cfg: TrainConfig, config_path: str | None, overrides: list[str], *, force: bool = False,
                 until: str | None = None) -> Path:
    run = _run_dir(cfg)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    timings: dict[str, float] = {}
    split_corpus(cfg, run)
    inputs = stage_inputs(cfg, run)
    key = ""
    plan = stages(cfg, config_path, overrides)
    if until is not None and until not in [n for n, _ in plan]:
        raise ConfigError(f"--until {until}: not a stage of this demo ({', '.join(n for n, _ in plan)})")
    for name, cmds in plan:
        marker = run / f".done-{name}"
        key = stage_key(name, cmds, inputs.get(name, {}), key)
        old = _read_marker(marker)
        if not force and old is not None and old.get("key") == key and old.get("state") == "done":
            print(f"[demo] {name}: done earlier, skipped", flush=True)
            if name == until:  # --until a stage finished earlier: still nothing after it
                break
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
        if name == until:
            break
    report = Path(cfg.output_dir) / "report" / "report.md"
    if report.exists():
        print("\n" + report.read_text(), flush=True)
    for folder, which in (("table", "the out-of-pool test pairs"), ("table-pool", "the in-pool test pairs")):
        table = run / folder / "report.md"
        if cfg.demo.baselines and table.exists() and until is None:
            print(f"\n## The demo's run beside its baselines and sources: {which} (same config, steps and "
                  "batches)\n\n" + table.read_text(), flush=True)
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
    return [f"demo.n_train={s(cfg.demo.n_train)}", f"demo.n_pool={s(cfg.demo.n_pool)}",
            f"optim.max_steps={s(cfg.optim.max_steps)}", f"checkpoint.every={s(cfg.checkpoint.every)}",
            f"eval.every={s(cfg.eval.every)}", f"optim.warmup_steps={s(cfg.optim.warmup_steps)}"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = keys_help()
    p.add_argument("--config", default=None, help="experiment YAML or a shipped config's name (default: demo)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply example counts and steps (e.g. 4)")
    p.add_argument("--force", action="store_true", help="re-run every stage even if it finished before")
    p.add_argument("--until", default=None, help="stop after this stage (e.g. score: the stores a study trains from)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `profuser train`")
    add_config_arguments(p, TrainConfig, config_and_overrides=False)


def run_command(args: argparse.Namespace) -> int:
    args.config = args.config or str(shipped_config())
    given = flag_overrides(args) + list(args.overrides)
    try:
        cfg0 = load_config(args.config, given)
        # the held-out and validation files are written by the split stage next to the stores
        run = Path(cfg0.data.data_dir).parent
        split = [f"eval.data={run / 'heldout.jsonl'}"]
        if cfg0.demo.n_val:
            split.append(f"eval.validation={run / 'val.jsonl'}")
        overrides = given + scale_overrides(cfg0, args.scale) + split
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"profuser demo: config error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    run_pipeline(cfg, args.config, overrides, force=args.force, until=args.until)
    print(f"[demo] total {time.time() - t0:.0f} s", flush=True)
    return 0
