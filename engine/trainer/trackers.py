"""Experiment trackers of `log.report_to` (rank 0): TensorBoard, Weights & Biases, MLflow, through each library's
own API - what `report_to` is in the Hugging Face trainers.

    tensorboard  event files in <output_dir>/tensorboard (torch.utils.tensorboard)
    wandb        wandb.init(project=log.project, name=log.run_name, config=<the resolved config>, dir=output_dir);
                 WANDB_MODE=offline writes the run under <output_dir>/wandb for a later `wandb sync`
    mlflow       an MLflow run in experiment log.project (MLFLOW_TRACKING_URI: a server, or a file store), the
                 resolved config as its parameters

Every metrics.jsonl row goes to every tracker: numbers only, named `<kind>/<key>` (train/loss, eval/bits_per_byte).
A resumed run continues the same tracker run: the W&B run id and the MLflow run id are kept in
<output_dir>/trackers.json. A tracker whose library is missing fails at start, naming the extra to install
(`pip install "profuser[trackers]"`), never after hours of training.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

from ..commands import MissingExtraError


def _numbers(row: dict) -> dict[str, float]:
    prefix = row.get("kind", "train")
    return {f"{prefix}/{k}": float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]  # MLflow caps a parameter's value
    return out


def _need(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"log.report_to: {tracker} needs the package {module} "
                                f"(pip install \"profuser[trackers]\")") from exc


class Tracker(ABC):
    @abstractmethod
    def log(self, row: dict, step: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class TensorBoard(Tracker):
    def __init__(self, output_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, row, step):
        for k, v in _numbers(row).items():
            self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.close()


class Wandb(Tracker):
    def __init__(self, output_dir: Path, config: dict, project: str, name: str, run_id: str | None):
        wandb = _need("wandb", "wandb")
        self.run = wandb.init(project=project, name=name, config=config, dir=str(output_dir), id=run_id,
                              resume="allow" if run_id else None)
        self.id = self.run.id

    def log(self, row, step):
        self.run.log(_numbers(row), step=step)

    def close(self):
        self.run.finish()


class Mlflow(Tracker):
    def __init__(self, config: dict, project: str, name: str, run_id: str | None):
        self.mlflow = _need("mlflow", "mlflow")
        if run_id is None:
            self.mlflow.set_experiment(project)
            run = self.mlflow.start_run(run_name=name)
            self.mlflow.log_params(_flat(config))
        else:  # a resumed run goes on in the same MLflow run
            run = self.mlflow.start_run(run_id=run_id)
        self.id = run.info.run_id

    def log(self, row, step):
        self.mlflow.log_metrics(_numbers(row), step=step)

    def close(self):
        self.mlflow.end_run()


def open_trackers(names: list[str], output_dir: str | Path, *, start_step: int, config: dict, project: str,
                  run_name: str | None) -> list[Tracker]:
    """The trackers of log.report_to, continuing the runs that <output_dir>/trackers.json recorded."""
    out = Path(output_dir)
    ids_path = out / "trackers.json"
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() and start_step > 0 else {}
    name = run_name or out.name
    trackers: list[Tracker] = []
    for t in names:
        if t == "tensorboard":
            trackers.append(TensorBoard(out, start_step))
        elif t == "wandb":
            trackers.append(Wandb(out, config, project, name, ids.get("wandb")))
            ids["wandb"] = trackers[-1].id
        elif t == "mlflow":
            trackers.append(Mlflow(config, project, name, ids.get("mlflow")))
            ids["mlflow"] = trackers[-1].id
    if ids:  # the ids of the runs a resume continues (tensorboard needs none)
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return trackers
