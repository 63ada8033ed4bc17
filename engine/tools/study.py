"""`profuser study`: schedules x seeds from one training config, every model evaluated the same way.

    profuser study --config configs/study.yaml                   # train what is missing, evaluate, tabulate
    profuser study --config configs/study.yaml --variants sft two_stage --seeds 0

The study config (configs/study.yaml):

    base: demo.yaml                 a training config (relative to the study file); its stores must exist
    overrides: {optim.max_steps: 40}  applied to every run (a mapping, or a list of "key=value")
    variants: {sft: {schedule.kind: sft}, two_stage: {schedule.kind: two_stage}, ...}
    seeds: [0, 1, 2]
    baseline: sft                   the variant every other one is compared with, example by example
    comparisons: [[two_stage, sft], [two_stage, seqkd]]   pairs compared seed by seed (the criterion)
    build_stores: false             true: `profuser demo --until score` on the base first (split, stores, vote)
    eval: {data: [...], lm_eval: true, win_rate: false, ...}   StudyEval: the test sets and metrics

Runs. Variant v with seed s is a normal `profuser train` run in <output_dir>/runs/<v>/seed<s> (its own process,
its exported step picked on val.jsonl beside the base's stores when that file has pairs: eval.validation,
resumable: a killed study re-run resumes the run from its checkpoint, and a run whose export
<run>/final exists is not redone). Same steps, same tokens per step and, for one seed, the same data order in
every variant (a mode's stream advances only on the steps that use it). Seed-major order, each run evaluated
right after it is trained, so a study stopped part-way has every variant for its first seeds.

Evaluation, the same for every exported model and for the untouched target (`model.student` of the base):
    bits/byte   held-out NLL per byte of the gold answers (trainer/evaluate.py)
    acc         the lm-eval multiple-choice task built from the same held-out pairs (trainer/lm_eval_task.py)
    win         greedy answers to the held-out prompts judged against the target's greedy answers by the
                scorers of `profuser score` (a plurality vote of the two; a tie counts half)
Each model's results are cached beside it (study_eval.json, keyed by the evaluation settings).

Test sets: eval.data, default the demo's heldout.jsonl (out-of-pool) and test_pool.jsonl (in-pool, when it has
pairs) beside the base's data_dir. Per test set, a table: per variant the mean and the spread (sample standard
deviation over seeds) of each metric, and the paired difference to the baseline: per example, the variant's
value minus the baseline's with the same seed, averaged over seeds, with a 95% bootstrap interval over
examples. And per comparison (a, b): the per-seed differences a - b (same seed: same data order), their mean
and the 95% t-interval over seeds; `excludes_zero` says whether that interval lies on one side of zero
(the criterion of configs/study_pool.yaml). Written as <output_dir>/study.md, study.json and study.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError, load_config
from ..config_cli import add_config_arguments, config_from_args, load
from ..config_tree import config_path

METRICS = {"bits_per_byte": "bits/byte (lower is better)", "acc": "lm-eval acc", "win": "win rate vs target"}


@dataclass
class StudyEval:
    # test sets (JSONL of pairs), each tabulated on its own; None: heldout.jsonl (out-of-pool) and
    # test_pool.jsonl (in-pool, when it has pairs) beside the base's data_dir, as `profuser demo` writes them
    data: list[str] | None = None
    max_examples: int | None = None  # held-out examples evaluated (None: all)
    max_length: int | None = 512  # prompt + response tokens per example
    batch_size: int = 8  # examples per forward
    lm_eval: bool = True  # the lm-eval multiple-choice task built from the held-out pairs
    win_rate: bool = False  # greedy answers voted against the target's (slow on a CPU)
    scorers: list[str] = field(default_factory=lambda: ["similarity"])  # the win-rate vote's scorers
    max_new_tokens: int = 48  # greedy answer length (win rate)
    seed: int = 0  # distractor draw of the lm-eval task


@dataclass
class StudyConfig:
    base: str | None = None  # the training config every variant starts from (relative to the study file)
    output_dir: str = "runs/study"  # runs/<variant>/seed<s>/, the evaluations and study.{md,json,png}
    overrides: dict = field(default_factory=dict)  # key: value applied to the base for every variant
    variants: dict = field(default_factory=dict)  # name: {key: value} overrides of one variant
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every variant trains with each
    baseline: str = "sft"  # the variant every other one is compared with
    bootstrap: int = 2000  # bootstrap resamples of the paired intervals
    # a finished run (its export written) keeps only the export: a checkpoint holds the weights AND the
    # optimizer state (~3 GB for Gemma-3-270M in fp32), 18 runs of which would not fit most disks
    keep_checkpoints: bool = False
    # pairs [a, b] of variants compared seed by seed (a - b, t-interval over seeds): the success criterion
    comparisons: list[list[str]] = field(default_factory=list)
    build_stores: bool = False  # run `profuser demo --until score` on the base (its overrides) before training
    eval: StudyEval = field(default_factory=StudyEval)  # how every model is evaluated

    def __post_init__(self):
        if not self.variants:
            raise ConfigError("study: `variants` is empty")
        if self.baseline not in self.variants:
            raise ConfigError(f"study: baseline {self.baseline!r} is not one of the variants {list(self.variants)}")
        if not self.seeds:
            raise ConfigError("study: `seeds` is empty")
        for name, ov in self.variants.items():
            if not isinstance(ov, (dict, type(None))):
                raise ConfigError(f"study: variants.{name} must be a mapping of key: value overrides")
        for pair in self.comparisons:
            if not (isinstance(pair, list) and len(pair) == 2 and all(v in self.variants for v in pair)):
                raise ConfigError(f"study: comparisons: {pair!r} is not a pair of variants {list(self.variants)}")


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """The study file (a path or a shipped config's name) through the one config mechanism
    (config_cli.load): ConfigError naming the file and key for an unknown key or a bad value. `base`
    is resolved relative to the study file."""
    return with_base_resolved(load(StudyConfig, path, overrides), path)


def with_base_resolved(cfg: StudyConfig, path: str | Path | None) -> StudyConfig:
    if cfg.base and path and not Path(cfg.base).is_absolute():
        cfg.base = str((config_path(path).parent / cfg.base).resolve())
    return cfg


def as_overrides(ov) -> list[str]:
    if isinstance(ov, dict):
        return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in ov.items()]
    return [str(x) for x in ov or []]


def run_dir(cfg: StudyConfig, variant: str, seed: int) -> Path:
    return Path(cfg.output_dir) / "runs" / variant / f"seed{seed}"


def train_command(cfg: StudyConfig, variant: str, seed: int) -> list[str]:
    cmd = [sys.executable, "-m", "profuser.engine.train"]
    if cfg.base:
        cmd += ["--config", cfg.base]
    base = load_config(cfg.base, as_overrides(cfg.overrides))
    val = Path(base.data.data_dir).parent / "val.jsonl"
    validation = [f"eval.validation={val}"] if val.is_file() and val.stat().st_size else []
    return cmd + as_overrides(cfg.overrides) + validation + as_overrides(cfg.variants[variant]) + [
        f"output_dir={run_dir(cfg, variant, seed)}", f"seed={seed}", "eval.data=null", "checkpoint.export=true"]


def build_stores(cfg: StudyConfig, log=print) -> None:
    """`profuser demo --until score` on the base with the study's overrides: split, stores, specialist, vote
    (each stage skipped when it finished with the same inputs)."""
    cmd = [sys.executable, "-m", "profuser.engine.cli", "demo", *(["--config", cfg.base] if cfg.base else []),
           "--until", "score", *as_overrides(cfg.overrides)]
    log("[study] stores: " + " ".join(cmd[2:]))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"study: building the stores failed (exit {r.returncode}): {' '.join(cmd)}")


def train_run(cfg: StudyConfig, variant: str, seed: int, log=print) -> None:
    """One (variant, seed) run, unless its export exists; its wall seconds summed into <run>/study_wall.json."""
    out = run_dir(cfg, variant, seed)
    if (out / "final" / "config.json").is_file():
        log(f"[study] {variant} seed {seed}: done ({out}/final)")
        return
    cmd = train_command(cfg, variant, seed)
    log(f"[study] {variant} seed {seed}: training -> {out}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"study: run {variant} seed {seed} failed (exit {r.returncode}): {' '.join(cmd)}")
    wall_file = out / "study_wall.json"
    prev = json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else 0.0
    wall_file.write_text(json.dumps({"seconds": prev + time.perf_counter() - t0}))
    if not cfg.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# evaluation of one model
# ---------------------------------------------------------------------------------------------------------


TEST_SETS = {"heldout": "out-of-pool", "test_pool": "in-pool"}  # the demo's test files and their names


def test_sets(cfg: StudyConfig, base) -> dict[str, Path]:
    """{name: JSONL} of the test sets: eval.data, or the demo's (those with pairs) beside the base's data_dir."""
    if cfg.eval.data:
        return {Path(p).stem: Path(p) for p in cfg.eval.data}
    run = Path(base.data.data_dir).parent
    got = {name: run / f"{f}.jsonl" for f, name in TEST_SETS.items()
           if (run / f"{f}.jsonl").is_file() and (run / f"{f}.jsonl").stat().st_size}
    if not got:
        raise ConfigError(f"study: no test set: eval.data is empty and {run} has no heldout.jsonl with pairs "
                          "(make demo, or build_stores: true, writes it)")
    return got


def eval_key(cfg: StudyConfig, heldout: Path) -> str:
    from ..trainer.evaluate import PARTS

    doc = {"eval": asdict(cfg.eval), "answers": "left-padded batches", "parts": list(PARTS),
           "heldout_sha256": hashlib.sha256(heldout.read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def greedy_answers(spec: str, examples: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    from ..models import load_model, load_tokenizer
    from ..trainer.evaluate import generate_samples

    lm, tok = load_model(spec).eval(), load_tokenizer(spec)
    out = [s["generated"] for s in generate_samples(lm, tok, examples, max_new_tokens=max_new_tokens,
                                                    device=torch.device("cpu"), batch_size=batch_size)]
    del lm
    return out


def win_vs(cfg: StudyConfig, examples: list[dict], answers: list[str], reference: list[str]) -> list[float]:
    """Per example 1 / 0.5 / 0: `answers` beat / tie / lose to `reference` under the scorers' plurality vote."""
    from ..passes.score import make_scorer, vote

    prompts = [e["prompt"] for e in examples]
    gold = [e["response"] for e in examples]
    scores = {}
    for spec in cfg.eval.scorers:
        sc = make_scorer(spec)
        scores[spec] = np.stack([sc.score(prompts, reference, gold), sc.score(prompts, answers, gold)], 1)
    _, votes, zsum = vote(scores)
    out = np.where(votes[:, 1] > votes[:, 0], 1.0, np.where(votes[:, 1] < votes[:, 0], 0.0, 0.5))
    tie = votes[:, 1] == votes[:, 0]
    out[tie] = np.where(zsum[tie, 1] > zsum[tie, 0], 1.0, np.where(zsum[tie, 1] < zsum[tie, 0], 0.0, 0.5))
    return out.tolist()


def evaluate_model(cfg: StudyConfig, spec: str, cache: Path, examples: list[dict], key: str, task_dir: Path | None,
                   target_answers: list[str] | None, log=print) -> dict:
    """Per-example metrics of one model, cached in `cache` under `key`."""
    if cache.is_file():
        got = json.loads(cache.read_text())
        if got.get("key") == key:
            return got
    import torch

    from ..models import load_model, load_tokenizer
    from ..trainer.evaluate import nll_rows

    log(f"[study] evaluating {spec}")
    lm, tok = load_model(spec).eval(), load_tokenizer(spec)
    with torch.no_grad():
        rows = nll_rows(lm, tok, examples, max_length=cfg.eval.max_length, batch_size=cfg.eval.batch_size,
                        device=torch.device("cpu"), parts=True)
    del lm
    res = {"key": key, "model": str(spec), "ids": [e["example_id"] for e in examples],
           "nll": [r[0] for r in rows], "bytes": [r[2] for r in rows], "parts": [r[3] for r in rows]}
    if task_dir is not None:
        from ..trainer.lm_eval_task import run_task

        got = run_task(spec, task_dir, batch_size=cfg.eval.batch_size)
        res["acc"] = [got["per_example"][i]["acc"] for i in res["ids"]]
    if cfg.eval.win_rate:  # the target's own answers are cached too: they are the reference of every win rate
        res["answers"] = greedy_answers(spec, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        if target_answers is not None:
            res["win"] = win_vs(cfg, examples, res["answers"], target_answers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res))
    return res


# ---------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------


def metric_of(res: dict, metric: str, idx: np.ndarray | None = None) -> float:
    """The aggregate of one model's per-example results (over the examples `idx`, default all)."""
    idx = np.arange(len(res["nll"])) if idx is None else idx
    if metric == "bits_per_byte":
        return float(np.asarray(res["nll"])[idx].sum() / (np.asarray(res["bytes"])[idx].sum() * math.log(2)))
    return float(np.asarray(res[metric])[idx].mean())


def paired(runs: list[dict], base: list[dict], metric: str, n_boot: int, seed: int = 0) -> dict:
    """Mean over seeds of (variant - baseline, same seed) and its 95% bootstrap interval over examples."""
    n = len(base[0]["nll"])
    rng = np.random.default_rng(seed)

    def stat(idx):
        return float(np.mean([metric_of(r, metric, idx) - metric_of(b, metric, idx) for r, b in zip(runs, base)]))

    boots = [stat(rng.integers(0, n, n)) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan"))
    return {"diff": stat(np.arange(n)), "ci95": [float(lo), float(hi)]}


# Student's t quantile t_{0.975, df} for df = 1..10 (scipy.stats.t.ppf; more seeds use df = 10, a wider interval)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def seed_interval(diffs: list[float]) -> list[float]:
    """95% t-interval of the mean of per-seed paired differences ([nan, nan] with one seed)."""
    n = len(diffs)
    if n < 2:
        return [float("nan"), float("nan")]
    half = float(T975[min(n - 1, len(T975)) - 1] * np.std(diffs, ddof=1) / math.sqrt(n))
    return [float(np.mean(diffs) - half), float(np.mean(diffs) + half)]


def compare(cfg: StudyConfig, results: dict, metrics: list[str]) -> list[dict]:
    """Each comparison (a, b): per-seed a - b, the mean, its t-interval over seeds and the example bootstrap."""
    out = []
    for a, b in cfg.comparisons:
        for m in metrics:
            diffs = [metric_of(results[a][s], m) - metric_of(results[b][s], m) for s in cfg.seeds]
            ci = seed_interval(diffs)
            boot = paired([results[a][s] for s in cfg.seeds], [results[b][s] for s in cfg.seeds], m, cfg.bootstrap)
            out.append({"a": a, "b": b, "metric": m, "per_seed": diffs, "mean": float(np.mean(diffs)),
                        "seed_ci95": ci, "example_ci95": boot["ci95"],
                        "excludes_zero": bool(ci[0] > 0 or ci[1] < 0) if np.isfinite(ci[0]) else None})
    return out


def tabulate(cfg: StudyConfig, results: dict, target: dict, walls: dict, references: dict | None = None) -> dict:
    """The table of one test set: the untouched target, every source (`references`: {label: results}; one
    model each, no seeds) and every variant over the seeds, with the paired differences and comparisons."""
    metrics = ["bits_per_byte"] + (["acc"] if cfg.eval.lm_eval else []) + (["win"] if cfg.eval.win_rate else [])
    table = {label: {m: {"mean": metric_of(res, m), "sd": 0.0, "n": 1} for m in metrics
                     if m == "bits_per_byte" or m in res}
             for label, res in {"target": target, **(references or {})}.items()}
    base = [results[cfg.baseline][s] for s in cfg.seeds]
    for variant in cfg.variants:
        runs = [results[variant][s] for s in cfg.seeds]
        row = {}
        for m in metrics:
            vals = [metric_of(r, m) for r in runs]
            row[m] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                      "n": len(vals), "per_seed": vals}
        table[variant] = row
    for variant, row in table.items():
        if variant not in cfg.variants or variant == cfg.baseline:
            continue
        runs = [results[variant][s] for s in cfg.seeds]
        for m in metrics:
            d = row[m]["vs_baseline"] = paired(runs, base, m, cfg.bootstrap)
            b = table[cfg.baseline][m]
            # the example bootstrap says nothing about another seed: a difference counts only when the two
            # means are further apart than their seed spreads together; one seed has no spread (None)
            d["beyond_seed_spread"] = (bool(abs(row[m]["mean"] - b["mean"]) > row[m]["sd"] + b["sd"])
                                       if len(cfg.seeds) > 1 else None)
    # where in the answer each model's bits go (bits per answer, mean over examples and seeds)
    parts = {label: parts_bits([res]) for label, res in {"target": target, **(references or {})}.items()}
    parts.update({v: parts_bits([results[v][s] for s in cfg.seeds]) for v in cfg.variants})
    return {"metrics": metrics, "table": table, "n_examples": len(target["nll"]),
            "comparisons": compare(cfg, results, metrics), "parts": parts}


def parts_bits(runs: list[dict]) -> dict:
    """{part: bits per answer} of PARTS, the mean over the runs (seeds) of the mean over examples."""
    from ..trainer.evaluate import PARTS

    if not all("parts" in r for r in runs):
        return {}
    per = np.mean([np.asarray(r["parts"]).mean(0) for r in runs], 0) / math.log(2)
    return dict(zip(PARTS, per.tolist()))


def is_model(spec: str, log=print) -> bool:
    """Whether a source's spec is a model the study can evaluate (a store written by other means may name a
    tokenizer folder or a model that is gone): one line says which source is left out of the table."""
    from ..models import resolve_model

    try:
        resolve_model(spec)
        return True
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        log(f"[study] source {spec}: not evaluated ({exc})")
        return False


def source_shares(base) -> dict:
    """Per source, the share of examples it wins: the vote on the pool (inference mode) and MinCE per byte on
    the gold pairs (training mode), from `profuser score`'s summary.json; {} when there is none."""
    from ..store import read_json

    path = Path(base.data.infer_data_dir or base.data.data_dir) / "scores" / "summary.json"
    if not path.is_file():
        return {}
    got = read_json(path, what="score summary")
    mince = (got.get("train_mince_share") or {}).get("per_byte", {})
    return {s: {"vote_share": got.get("infer_win_share", {}).get(s), "mince_share": mince.get(s)}
            for s in dict.fromkeys([*got.get("infer_win_share", {}), *mince])}


# per-mode columns of metrics.jsonl the study averages: (column prefix, the table's title)
MODE_STATS = {
    "kept_mass": "Kept teacher mass: of the teachers' stored top-k probability, the share aligned onto the "
                 "target's vocabulary (mean over steps and seeds)",
    "student_mass": "Student mass on the teachers' support: the target's probability on the token ids the "
                    "aligned teachers name, the part of its distribution the KD term sees (mean over steps and "
                    "seeds)",
}


def mode_means(runs: list[Path], column: str) -> dict:
    """{mode: mean <column>_<mode> over the training steps and the runs (seeds)} from metrics.jsonl (a MODE_STATS
    column); a mode no run trained on, or a column older runs did not log, is absent."""
    got: dict = {}
    for d in runs:
        f = d / "metrics.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
        for r in rows:
            for k, v in r.items():
                if k.startswith(f"{column}_") and r.get("kind") == "train" and v == v:  # v == v: not NaN
                    got.setdefault(k.removeprefix(f"{column}_"), []).append(v)
    return {m: float(np.mean(v)) for m, v in got.items()}


def mode_markdown(values: dict, column: str) -> str:
    rows = {v: k for v, k in values.items() if k}
    if not rows:
        return ""
    modes = sorted({m for k in rows.values() for m in k})
    lines = [f"\n## {MODE_STATS[column]}\n", "| variant | " + " | ".join(modes) + " |",
             "|---|" + "---:|" * len(modes)]
    lines += [f"| {v} | " + " | ".join(f"{k[m]:.4f}" if m in k else "–" for m in modes) + " |"
              for v, k in rows.items()]
    return "\n".join(lines) + "\n"


def sources_markdown(shares: dict) -> str:
    lines = ["\n## Who wins: the share of examples each source wins\n",
             "| source | the vote on the pool (inference mode) | MinCE per byte on the gold pairs (training mode) |",
             "|---|---:|---:|"]
    for s, v in shares.items():
        cells = ["–" if v[k] is None else f"{100 * v[k]:.1f}%" for k in ("vote_share", "mince_share")]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_comparisons(doc: dict) -> str:
    if not doc["comparisons"]:
        return ""
    lines = ["\n| comparison | metric | per seed (a - b) | mean | 95% interval over seeds | excludes 0 |",
             "|---|---|---|---:|---|---|"]
    for c in doc["comparisons"]:
        per = ", ".join(f"{d:+.4f}" for d in c["per_seed"])
        lines.append(f"| {c['a']} - {c['b']} | {c['metric']} | {per} | {c['mean']:+.4f} | "
                     f"[{c['seed_ci95'][0]:+.4f}, {c['seed_ci95'][1]:+.4f}] | "
                     f"{'-' if c['excludes_zero'] is None else 'yes' if c['excludes_zero'] else 'no'} |")
    return "\n".join(lines) + "\n"


def markdown(doc: dict, baseline: str) -> str:
    ms = doc["metrics"]
    head = "| model | " + " | ".join(f"{METRICS[m]}" for m in ms) + " | " + \
        " | ".join(f"{m} vs {baseline} (95% CI)" for m in ms) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(ms))]
    for name, row in doc["table"].items():
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['sd']:.4f}" if m in row else "–" for m in ms]
        diffs = []
        for m in ms:
            d = row.get(m, {}).get("vs_baseline")
            mark = " *" if d and d.get("beyond_seed_spread") else ""
            diffs.append(f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{mark}" if d else "–")
        label = "target (untouched)" if name == "target" else name
        lines.append(f"| {label} | " + " | ".join(cells + diffs) + " |")
    lines.append(f"\nmean ± sd over seeds; differences to {baseline}: per example, same seed, averaged over seeds, "
                 f"95% bootstrap interval over examples; * the two means differ by more than their seed "
                 f"spreads together (sd + sd); without *, the difference is within the seed spread.")
    if all(r.get("bits_per_byte", {}).get("n", 2) == 1 for n, r in doc["table"].items() if n != "target"):
        lines.append("One seed: no seed spread, so no difference is marked; rank nothing on it alone.")
    return "\n".join(lines) + "\n" + markdown_comparisons(doc) + markdown_parts(doc)


def markdown_parts(doc: dict) -> str:
    from ..trainer.evaluate import PARTS

    rows = {n: p for n, p in doc.get("parts", {}).items() if p}
    if not rows:
        return ""
    lines = ["\nbits per answer by position (mean over examples and seeds): "
             + ", ".join(PARTS) + " (trainer/evaluate.py position_parts)\n",
             "| model | " + " | ".join(PARTS) + " | total |", "|---|" + "---:|" * (len(PARTS) + 1)]
    for name, p in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{p[k]:.2f}" for k in PARTS) + f" | {sum(p.values()):.2f} |")
    return "\n".join(lines) + "\n"


def plot(docs: dict, path: Path) -> None:
    """One row of bar charts (a metric each) per test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = next(iter(docs.values()))["metrics"]
    fig, axes = plt.subplots(len(docs), len(ms), figsize=(4.5 * len(ms), 3.6 * len(docs)), squeeze=False)
    for row, (test, doc) in zip(axes, docs.items()):
        names = list(doc["table"])
        for ax, m in zip(row, ms):
            rows = [(n, doc["table"][n][m]) for n in names if m in doc["table"][n]]
            ax.bar(range(len(rows)), [r["mean"] for _, r in rows], yerr=[r["sd"] for _, r in rows], capsize=3,
                   color=["#999999" if n == "target" else "#3b75af" for n, _ in rows])
            ax.set_xticks(range(len(rows)), [n for n, _ in rows], rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{test}: {METRICS[m]}", fontsize=9)
            lo = min(r["mean"] - r["sd"] for _, r in rows)
            hi = max(r["mean"] + r["sd"] for _, r in rows)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(cfg: StudyConfig, log=print) -> dict:
    """Train what is missing, evaluate every model on every test set, write study.{md,json,png}; returns the
    JSON document {config, tests: {name: {metrics, table, n_examples, comparisons}}, train_wall_s}."""
    from ..trainer.evaluate import load_eval_examples
    from ..trainer.lm_eval_task import write_task

    if cfg.build_stores:
        build_stores(cfg, log)
    base = load_config(cfg.base, as_overrides(cfg.overrides))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name, path in test_sets(cfg, base).items():
        examples = load_eval_examples(path, cfg.eval.max_examples)
        task = write_task(examples, out / f"lm_eval_task-{name}", seed=cfg.eval.seed) if cfg.eval.lm_eval else None
        sets[name] = (examples, eval_key(cfg, path), task)

    def evaluate(spec, folder, name, target_answers):
        examples, key, task = sets[name]
        return evaluate_model(cfg, spec, folder / f"study_eval-{name}.json", examples, key, task, target_answers,
                              log)

    targets = {n: evaluate(base.model.student, out / "target", n, None) for n in sets}
    # every source, evaluated the same way (its lead over the target is what fusion can pass on)
    from ..models import reference_models
    from ..trainer.evaluate import source_models

    srcs = {label: spec for label, spec in reference_models(base.model.student, source_models(
        base.data.data_dir, base.data.sources)).items() if label != "target (before)" and is_model(spec, log)}
    refs = {n: {label: evaluate(spec, out / "sources" / label.removeprefix("source "), n, None)
                for label, spec in srcs.items()} for n in sets}
    # seed-major, each run evaluated as soon as it is trained: a study stopped part-way has every variant
    # for its first seeds (`--seeds 0 1` then tabulates them without training anything)
    results: dict = {n: {variant: {} for variant in cfg.variants} for n in sets}
    walls = {}
    for seed in cfg.seeds:
        for variant in cfg.variants:
            train_run(cfg, variant, seed, log)
            d = run_dir(cfg, variant, seed)
            for n in sets:
                results[n][variant][seed] = evaluate(str(d / "final"), d, n, targets[n].get("answers"))
            f = d / "study_wall.json"
            if f.exists():
                walls[f"{variant}/seed{seed}"] = json.loads(f.read_text())["seconds"]
    tests = {n: tabulate(cfg, results[n], targets[n], walls, refs[n]) for n in sets}
    doc = {"config": asdict(cfg), "tests": tests, "train_wall_s": walls, "sources": source_shares(base),
           **{c: {v: mode_means([run_dir(cfg, v, s) for s in cfg.seeds], c) for v in cfg.variants}
              for c in MODE_STATS}}
    (out / "study.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = "".join(f"## {n} test set ({TEST_SETS.get(n, n)}, {t['n_examples']} examples)\n\n"
                   + markdown(t, cfg.baseline) + "\n" for n, t in tests.items())
    if doc["sources"]:
        text += sources_markdown(doc["sources"])
    text += "".join(mode_markdown(doc[c], c) for c in MODE_STATS)
    (out / "study.md").write_text(text)
    plot(tests, out / "study.png")
    log(text)
    return doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, StudyConfig)  # --config configs/study.yaml (or `study`), --seeds 0, key=value ...
    p.add_argument("--variants", dest="only_variants", nargs="+", default=None,
                   help="run a subset of the config's variants (the baseline is always kept)")


def run_command(args: argparse.Namespace) -> int:
    cfg = with_base_resolved(config_from_args(StudyConfig, args), args.config)
    if args.only_variants:
        unknown = [v for v in args.only_variants if v not in cfg.variants]
        if unknown:
            raise ConfigError(f"--variants: {unknown} not in {list(cfg.variants)}")
        keep = set(args.only_variants) | {cfg.baseline}
        cfg.variants = {k: v for k, v in cfg.variants.items() if k in keep}
    study(cfg)
    return 0
