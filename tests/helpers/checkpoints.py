"""Checkpoint fakes for the fault tests: an engine that writes DeepSpeed-like files, checkpoints of it, and a
pickle that runs code when unpickled (it creates a marker file)."""

from __future__ import annotations

import os
from pathlib import Path

from profuser.engine.trainer import checkpoint as ckpt


class FakeEngine:
    """What ckpt.save needs of a DeepSpeed engine: files written into the tag folder."""

    def __init__(self, fail: OSError | None = None):
        self.fail = fail

    def save_checkpoint(self, root, tag, save_latest=False):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
        if self.fail:
            raise self.fail
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(8192))


def fake_checkpoints(root: Path, steps=(2, 4)) -> Path:
    d = root / "checkpoints"
    for step in steps:
        ckpt.save(FakeEngine(), d, ckpt.tag_for(step), {"step": step, "loaders": {}, "world_size": 1}, "x: 1\n",
                  config_digest="digest", rank=0, world_size=1, keep_last=3)
    return d


class Planted:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))
