"""Loss and eval curves from a run's metrics.jsonl to PNG (`profuser plot RUN_DIR`).

Panels: (1) total loss and the per-mode losses L_infer / L_train against the optimizer step, with the
schedule weights w_infer / w_train on a second axis (the two_stage switch is visible); (2) CE and KD per
mode; (3) held-out NLL per token of the periodic/final evals (when there are eval rows); (4) tokens/s.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ..config_cli import Flag, add_config_arguments, config_from_args


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a metrics.jsonl (or of the run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {i}: not valid JSON ({e})") from None
    return [r for r in rows if r.get("kind") == "train"], [r for r in rows if r.get("kind") == "eval"]


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(metrics: str | Path, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics)
    if not train:
        raise ValueError(f"{metrics}: no train rows to plot")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    for key, style in (("loss", "k-"), ("loss_infer", "C0-"), ("loss_train", "C1-")):
        x, y = _series(train, key)
        if x:
            ax.plot(x, y, style, label=key)
    ax.set(xlabel="step", ylabel="loss", title="fusion loss")
    ax.legend(loc="upper left")
    ax2 = ax.twinx()
    for key, style in (("w_infer", "C0:"), ("w_train", "C1:")):
        x, y = _series(train, key)
        ax2.plot(x, y, style, label=key, alpha=0.7)
    ax2.set(ylabel="schedule weight", ylim=(-0.05, 1.1))
    ax2.legend(loc="upper right")
    ax = axes[0, 1]
    for key in ("ce_infer", "kd_infer", "ce_train", "kd_train"):
        x, y = _series(train, key)
        if x:
            ax.plot(x, y, label=key)
    ax.set(xlabel="step", title="CE and KD per mode (per target token)")
    ax.legend()
    ax = axes[1, 0]
    x, y = _series(evals, "nll_per_token")
    if x:
        ax.plot(x, y, "o-", label="held-out NLL / token")
        xb, yb = _series(evals, "nll_per_byte")
        ax.plot(xb, yb, "s-", label="held-out NLL / byte")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no eval rows (set eval.data)", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", title="held-out evaluation")
    ax = axes[1, 1]
    x, y = _series(train, "tokens_per_s")
    ax.plot(x, y)
    ax.set(xlabel="step", ylabel="target tokens / s", title="throughput")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass
class PlotConfig:
    """Options of `profuser plot`."""

    run: str  # run folder (output_dir) or its metrics.jsonl
    out: str | None = None  # PNG path (default: <run>/curves.png)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PlotConfig, flags={"run": Flag("RUN")})


def run_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(PlotConfig, args)
    run_dir = Path(cfg.run)
    out = Path(cfg.out) if cfg.out else (run_dir if run_dir.is_dir() else run_dir.parent) / "curves.png"
    print(plot(cfg.run, out))
    return 0
