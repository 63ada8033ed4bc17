"""Crash-safe training checkpoints on top of DeepSpeed's save_checkpoint / load_checkpoint.

Layout (`<output_dir>/checkpoints/`):

    latest                      text file holding the tag of the newest COMPLETE checkpoint (DeepSpeed's
                                own format, so deepspeed's zero_to_fp32 and load_checkpoint read it too)
    step00000040/               DeepSpeed files (model / ZeRO optimizer partitions of every rank)
        trainer_rank00000.pt    per rank: step, loader states, RNG states (torch, numpy, python), epochs
        config.yaml             the resolved config
    tmp-step00000060/           a save in progress (ignored; removed by the next save)

Why a crash during a save never corrupts the previous checkpoint: every rank writes into `tmp-<tag>`,
all ranks meet at a barrier, then rank 0 renames the folder to `<tag>` (an atomic rename on POSIX) and
replaces `latest` through a temporary file + os.replace. A kill before the rename leaves only a tmp folder;
a kill between the rename and the pointer update leaves `latest` on the previous complete checkpoint.
The filesystem must be shared by all ranks (as DeepSpeed itself assumes by default).

`export_student` turns a checkpoint into a standard transformers folder (ZeRO-3: zero_to_fp32).
"""

from __future__ import annotations

import copy
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None. A `latest` pointing nowhere is an error."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = ckpt_dir / tag
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names checkpoint {tag!r} but {path} does not exist")
    return path


def save(engine: Any, ckpt_dir: str | Path, tag: str, trainer_state: dict, config_yaml: str, *,
         rank: int, update_latest: bool = True, keep_last: int = 0) -> Path:
    """Write checkpoint `tag` from every rank (collective). Returns the final folder.

    trainer_state: this rank's extra state (step, loader states, ...); RNG states are added here.
    """
    ckpt_dir = Path(ckpt_dir)
    tmp_tag, final = f"tmp-{tag}", ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("tmp-*"):  # an earlier save that was killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    # save_latest=False: `latest` is ours to update, after the folder is complete
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
    tmp = ckpt_dir / tmp_tag
    state = {"rng": rng_state(), **trainer_state}  # a caller-captured "rng" (NaN checkpoints) wins
    torch.save(state, tmp / f"trainer_rank{rank:05d}.pt")
    if rank == 0:
        (tmp / "config.yaml").write_text(config_yaml)
    _barrier()
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if update_latest:
            pointer_tmp = ckpt_dir / "latest.tmp"
            pointer_tmp.write_text(tag)
            os.replace(pointer_tmp, ckpt_dir / "latest")
            _prune(ckpt_dir, keep_last, keep=tag)
    _barrier()
    return final


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for name in tags[:-keep_last]:
        if name != keep:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


class ResumeError(RuntimeError):
    """A checkpoint this run cannot continue from; the message names the checkpoint and what differs."""


def load(engine: Any, path: str | Path, *, rank: int, world_size: int) -> dict:
    """Restore engine (model, optimizer, lr scheduler) and return this rank's trainer state (RNG restored).

    A checkpoint is resumed only by the same number of ranks (any split over nodes): ZeRO partitions and
    each rank's loader position belong to that world size. Another world size is refused before DeepSpeed
    reads anything (docs/training.md, "Resume")."""
    path = Path(path)
    state_file = path / f"trainer_rank{rank:05d}.pt"
    written = sorted(path.glob("trainer_rank*.pt"))
    if not state_file.is_file() or len(written) != world_size:
        raise ResumeError(f"checkpoint {path} was written by {len(written)} rank(s) but this run has {world_size}: "
                          "resume with the same world size (nodes x processes per node may differ), or start "
                          "over with checkpoint.resume=never")
    state = torch.load(state_file, weights_only=False)
    if state.get("world_size", world_size) != world_size:
        raise ResumeError(f"{state_file}: written with world size {state['world_size']}, this run has {world_size}")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    set_rng_state(state.pop("rng"))
    return state


def export_student(lm, tok, checkpoint: Path, out: Path, *, stage: int, rank: int) -> Path:
    """Write the student as a transformers folder (safetensors + config + tokenizer), atomically (rank 0).

    ZeRO-3 parameters are partitioned, so the fp32 weights are consolidated from the checkpoint with
    DeepSpeed's zero_to_fp32 helpers; with stages 0-2 every rank holds the full module.
    """
    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            from transformers import AutoModelForCausalLM

            sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
            sd = {k.removeprefix("lm."): v for k, v in sd.items()}
            fresh = AutoModelForCausalLM.from_config(copy.deepcopy(lm.config), dtype=torch.float32)
            missing, unexpected = fresh.load_state_dict(sd, strict=False)
            tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
            if fresh.config.tie_word_embeddings:
                tied |= {"lm_head.weight"}
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"export: checkpoint {checkpoint} does not match the student "
                                   f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
            fresh.tie_weights()
            fresh.config.use_cache = True
            fresh.save_pretrained(str(tmp))
        else:
            lm.config.use_cache = True
            lm.save_pretrained(str(tmp))
            lm.config.use_cache = False
        tok.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    _barrier()
    return out
