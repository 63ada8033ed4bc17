"""The Python API: every pipeline step as a function taking the same keys as its command (and its YAML).

    import profuser
    profuser.prepare(data_dir="runs/x", inputs=["data.jsonl"])                        # -> PreparedManifest
    profuser.teach(data_dir="runs/x", sources=["smollm2-135m-instruct", "/models/b"])  # -> {source: stats}
    profuser.prepare(data_dir="runs/x-pool", inputs=["prompts.jsonl"], prompts_only=True)
    profuser.generate(data_dir="runs/x-pool", sources=[...], max_new_tokens=256)       # -> {source: stats}
    profuser.score(data_dir="runs/x-pool", sources=["smollm2-135m-instruct", "b"], scorers=["judge:..."])
    profuser.train("configs/demo.yaml", **{"optim.lr": 3e-5, "output_dir": "runs/x/train"})   # -> summary

Each function resolves its config exactly as its command does (config_tree.merge + build: the dataclass
defaults <- the YAML file, when `config` is given <- the keyword arguments, dotted keys for nested ones), so a
wrong key or value raises ConfigError naming it. `train` runs in this process (one rank; a process group of
its own is set up and left for the next call); use a launcher (`deepspeed`, `torchrun`) for several ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import load_config
from .config_tree import build, merge


def resolve(cls, config: str | Path | None, kwargs: dict[str, Any]):
    """cls from the YAML `config` (optional) and keyword arguments (`a.b=v` as a dotted key or a nested dict)."""
    flags = [(key, value, f"argument {key}=") for key, value in kwargs.items()]
    tree, origins = merge(config, flags)
    return build(cls, tree, origins)


def prepare(config: str | Path | None = None, **kwargs):
    """`profuser prepare`: instruction data -> the prepared set (passes/prepare.py PrepareConfig keys)."""
    from .passes.prepare import PrepareConfig
    from .passes.prepare import prepare as run

    return run(resolve(PrepareConfig, config, kwargs))


def teach(config: str | Path | None = None, **kwargs) -> dict:
    """`profuser teach`: every source teacher-forced on the gold responses (passes/options.py PassConfig keys)."""
    from .passes.options import PassConfig
    from .passes.teach import teach as run

    return run(resolve(PassConfig, config, kwargs))


def generate(config: str | Path | None = None, **kwargs) -> dict:
    """`profuser generate`: every source answers the prompts (passes/generate.py GenerateConfig keys)."""
    from .passes.generate import GenerateConfig
    from .passes.generate import generate as run

    return run(resolve(GenerateConfig, config, kwargs))


def score(config: str | Path | None = None, **kwargs) -> dict:
    """`profuser score`: the scorers vote for each prompt's best answer (passes/score.py ScoreConfig keys)."""
    from .passes.score import ScoreConfig
    from .passes.score import score as run

    return run(resolve(ScoreConfig, config, kwargs))


def train(config: str | Path | None = None, **kwargs) -> dict:
    """`profuser train` in this process: TrainConfig keys (dotted: `**{"optim.lr": 3e-5}`); returns the summary
    (start_step, the last metrics row, eval, export, report, selected step)."""
    from .train import train as run

    flags = [(key, value, f"argument {key}=") for key, value in kwargs.items()]
    return run(load_config(config, flags=flags))
