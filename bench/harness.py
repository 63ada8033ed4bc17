"""Benchmark harness shared by the bench scripts: result rows, machine name, timing, peak memory,
one-subprocess-per-case runner, JSON / Markdown / PNG output.

Peak memory "above the inputs": on CPU the process resets its RSS high-water mark (VmHWM, by writing 5
to /proc/self/clear_refs) after the inputs exist, and reports VmHWM - RSS(inputs) after the timed
calls; on CUDA, torch.cuda.max_memory_allocated() - memory_allocated(inputs). Each case runs in its own
process, so one case's allocator cache or compiled code never leaks into another's numbers.
Time: forward + backward of one call, median of `reps` calls after `warmup` calls (the first call
includes torch.compile / Triton compile time and is reported separately as first_call_ms).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Row:
    """One measured (case, method): times in ms, memory in MiB."""

    bench: str
    case: str
    method: str
    shape: dict
    dtype: str
    device: str
    machine: str
    status: str = "ok"             # ok | skipped | failed
    note: str = ""
    time_ms: float | None = None   # median of reps
    times_ms: list = field(default_factory=list)
    first_call_ms: float | None = None
    peak_mem_mb: float | None = None
    loss: float | None = None
    time_vs_naive: float | None = None
    mem_vs_naive: float | None = None
    torch_version: str = torch.__version__
    timestamp: str = ""


def machine_name() -> str:
    """e.g. 'x86-64 2-core CPU, 24 GiB, torch 2.13.0+cpu' or 'NVIDIA H100 80GB HBM3, torch ...'."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    arch = platform.machine().replace("_", "-")
    cpu = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{arch} {os.cpu_count()}-core {cpu}, {mem_gib:.0f} GiB, torch {torch.__version__}"


def machine_slug() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def _status_kb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the state at construction (inputs allocated), MiB."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = _status_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_mb(self) -> float:
        return self.total_peak_mb() - self.base / (2**20 if self.cuda else 1)

    def total_peak_mb(self) -> float:
        """The peak since construction including what existed then (the model, optimizer states), MiB."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_kb("VmHWM")


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int = 1, reps: int = 3):
    """(first_call_ms, [ms per timed call]) of fn (forward + backward inside)."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    first = once()
    for _ in range(warmup - 1):
        once()
    return first, [once() for _ in range(reps)]


def run_subprocess(argv: list[str], timeout_s: float) -> dict:
    """Run one case as `python argv...`; it prints one JSON line starting with 'ROW ' on stdout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        p = subprocess.run([sys.executable] + argv, capture_output=True, text=True, timeout=timeout_s,
                           env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "note": f"timed out after {timeout_s:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"status": "failed", "note": f"exit {p.returncode}: " + " | ".join(tail)[-300:]}


def emit(row: Row) -> None:
    print("ROW " + json.dumps(dataclasses.asdict(row)), flush=True)


def add_ratios(rows: list[Row], baseline: str = "naive") -> None:
    """time_vs_naive / mem_vs_naive against the baseline method of the same case."""
    base = {r.case: r for r in rows if r.method == baseline and r.status == "ok"}
    for r in rows:
        b = base.get(r.case)
        if b is None or r.status != "ok":
            continue
        r.time_vs_naive = r.time_ms / b.time_ms if b.time_ms else None
        r.mem_vs_naive = r.peak_mem_mb / b.peak_mem_mb if b.peak_mem_mb else None


def markdown_table(rows: list[Row]) -> str:
    head = ("| case | method | fwd+bwd ms (median) | vs naive | peak MiB above inputs | vs naive | loss "
            "| note |\n|---|---|---:|---:|---:|---:|---:|---|")
    lines = [head]
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    for r in rows:
        lines.append(f"| {r.case} | {r.method} | {f(r.time_ms, '.0f')} | {f(r.time_vs_naive, '.2f')}x | "
                     f"{f(r.peak_mem_mb, '.0f')} | {f(r.mem_vs_naive, '.3f')}x | {f(r.loss, '.4f')} | "
                     f"{r.status if r.status != 'ok' else ''}{(' ' + r.note) if r.note else ''} |")
    return "\n".join(lines)


def write_json(rows: list[Row], path: str, meta: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)


def plot(rows: list[Row], path: str, title: str) -> None:
    """Two bar panels per case: time and peak memory, methods side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 3.2 * len(cases)), squeeze=False)
    for i, case in enumerate(cases):
        ok = [r for r in rows if r.case == case and r.status == "ok"]
        names = [r.method for r in ok]
        panels = (("time_ms", "fwd+bwd time (ms)"), ("peak_mem_mb", "peak MiB above inputs"))
        for j, (attr, label) in enumerate(panels):
            ax = axes[i][j]
            ax.barh(names, [getattr(r, attr) for r in ok], color="tab:blue")
            ax.set_xlabel(label)
            ax.set_title(case, fontsize=9)
            ax.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
