"""The run's output folder: owned by one training run, never a folder of the user's own files.

    claim(output_dir)                  rank 0, before anything is written: create or re-enter the folder
    write_owned(output_dir, name, s)   write a file inside it (atomically: never half a config.yaml)

A run owns `output_dir` when the folder holds the marker file `.profuser-run` (written when the run
created the folder, or found it empty). The folder is refused, with one line naming it, when it is:
    - empty, or the current folder, its parent, the filesystem root or the home folder (`output_dir=`
      from an unset shell variable trained into the current folder and overwrote its config.yaml): the
      rule is config.output_dir_problem, checked when the config loads, again here;
    - not empty and not a run's (no marker): a folder of the user's files.
A folder written by a profuser version before the marker (metrics.jsonl or checkpoints/latest in it) is
adopted: the marker is added and the run resumes as before.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..config import output_dir_problem
from ..fileio import write_text_atomic

MARKER = ".profuser-run"
LEGACY_TRACES = ("metrics.jsonl", "checkpoints/latest")  # a pre-marker run folder has one of these


class OutputDirError(ValueError):
    """output_dir is not a folder this run may write into; the message names it and why."""

    exit_code = 2


def claim(output_dir: str | Path) -> Path:
    """Create `output_dir` for this run, or re-enter one a run owns; OutputDirError otherwise."""
    why = output_dir_problem(str(output_dir))
    if why:
        raise OutputDirError(f"output_dir={str(output_dir)!r} {why}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir={out}: is a file, not a folder")
    marker = out / MARKER
    if marker.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()) and not any((out / t).exists() for t in LEGACY_TRACES):
        raise OutputDirError(f"output_dir={out}: not empty and not a profuser run folder (no {MARKER} marker): "
                             "its files are not this run's to overwrite; name a new or empty folder")
    write_owned(out, MARKER, json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}) + "\n")
    return out


def write_owned(output_dir: str | Path, name: str, text: str) -> Path:
    """Write `name` inside a claimed folder through a temporary file and a rename: a link or file a user put
    there is replaced, never written through."""
    path = Path(output_dir) / name
    write_text_atomic(path, text)
    return path
