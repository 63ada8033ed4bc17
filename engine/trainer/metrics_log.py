"""Training logs: a tqdm progress bar, `metrics.jsonl` and the trackers of log.report_to (trackers.py; rank 0 only).

Every row of metrics.jsonl is one JSON object with at least `step` and `kind` ("train" | "eval"); train
rows carry loss, per-mode loss components (ce/kd per mode), w_infer/w_train, lr, grad_norm, tokens/s,
peak memory and wall time. `profuser plot` reads this file. On resume the file is truncated to the rows
with step <= the resumed step, so a resumed run's log reads like an uninterrupted one.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from .trackers import open_trackers


def peak_memory_mb() -> float:
    """Peak accelerator memory (CUDA) or, on CPU, the peak resident set size of this process, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 1024


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, rank: int, total_steps: int, start_step: int = 0,
                 report_to: list[str] = (), config: dict | None = None, project: str = "profuser",
                 run_name: str | None = None, progress: bool = True):
        self.active = rank == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self._trackers = []
        self._bar = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # resume: drop rows from steps that will be redone
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self._fh = open(self.path, "a")
        self._trackers = open_trackers(list(report_to), output_dir, start_step=start_step, config=config or {},
                                       project=project, run_name=run_name)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             file=sys.stderr, mininterval=0.5)

    def log(self, row: dict) -> None:
        if not self.active:
            return
        row = {"time": round(time.time(), 3), **row}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        for tracker in self._trackers:
            tracker.log(row, row["step"])

    def progress(self, n: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(postfix, refresh=False)

    def write(self, msg: str) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            tracker.close()
        self._fh.close()
