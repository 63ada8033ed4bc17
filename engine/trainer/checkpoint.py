"""Crash-safe, verifiable training checkpoints on top of DeepSpeed's save_checkpoint / load_checkpoint.

Layout (`<output_dir>/checkpoints/`):

    latest                      text file holding the tag of the newest COMPLETE checkpoint (DeepSpeed's
                                own format, so deepspeed's zero_to_fp32 and load_checkpoint read it too)
    step00000040/               DeepSpeed files (model / ZeRO optimizer partitions of every rank)
        trainer_rank00000.pt    per rank: step, loader states, RNG states; tensors and plain types only,
                                loaded with torch.load(weights_only=True): it can run no code
        config.yaml             the resolved config
        profuser_checkpoint.json  step, world size, the config's resume digest, every file's size and
                                sha256, the digests of the data trained on (stores, vote, vocabulary maps:
                                FusionLoader.input_digests), and the JSON's own checksum
    tmp-step00000060/           a save in progress (ignored; removed by the next save)

Why a crash during a save never corrupts the previous checkpoint: every rank writes into `tmp-<tag>`,
all ranks meet at a barrier, then rank 0 renames the folder to `<tag>` (an atomic rename on POSIX) and
replaces `latest` through fileio.write_text_atomic. A kill before the rename leaves only a tmp folder;
a kill between the rename and the pointer update leaves `latest` on the previous complete checkpoint.
The filesystem must be shared by all ranks (as DeepSpeed itself assumes by default).

Resume verifies before DeepSpeed reads anything: the folder must carry profuser_checkpoint.json, its
config digest must be this run's (config.resume_digest; checkpoint.allow_foreign=true overrides), its
world size this run's, the data this run reads must be the data it trained on (else a ResumeError naming the parts
that changed; checkpoint.allow_changed_data=true goes on), every file its recorded size and sha256 (each
rank hashes a share), and the folder must hold nothing else: DeepSpeed loads every file matching its name
patterns, so a file the record does not list (a planted `zero_pp_rank_0_mp_rank_0-_model_states.pt`) is
refused with a ResumeError naming it. A corrupt checkpoint is skipped with a warning and the previous one
is used. Every file is then unpickled
with torch.load(weights_only=True): tensors, plain values and the few DeepSpeed classes its states hold
(DEEPSPEED_STATE_CLASSES); anything else is refused, never run (allow_foreign=true trusts the folder).

`export_student` turns a checkpoint into a standard transformers folder (ZeRO-3: zero_to_fp32).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..fileio import DiskFullError, is_disk_full, write_text_atomic
from ..store import canonical_checksum, file_sha256
from ..text.chat import fallback_chat_template

TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


INFO = "profuser_checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, ...); the message names the folder. Nothing partial is kept."""


class CheckpointDiskFullError(DiskFullError, CheckpointError):
    """The disk filled up during a checkpoint save (an OSError ENOSPC, or torch.save's bare "unexpected pos"
    RuntimeError on a full filesystem); the message names the folder. Nothing partial is kept."""


class ResumeError(RuntimeError):
    """A checkpoint this run cannot continue from; the message names the checkpoint and what differs."""

    exit_code = 2


def rng_state() -> dict:
    """Every RNG's state as tensors and plain types (what torch.load(weights_only=True) accepts)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, newest first: the one `latest` names, then older step folders."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return []
    tag = pointer.read_text(errors="replace").strip()
    if not (TAG_RE.match(tag) and (ckpt_dir / tag).is_dir()):
        steps = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)), reverse=True)
        warnings.warn(f"{pointer} names {tag!r}, which is no checkpoint here (damaged pointer); trying the step "
                      f"folders instead: {[p.name for p in steps]}", stacklevel=2)
        return steps
    older = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name) and p.name < tag),
                   reverse=True)
    return [ckpt_dir / tag] + older


def _share(names: list[str], rank: int, world: int) -> list[str]:
    """The files this rank hashes: every world-th, so the ranks split the work of a large checkpoint."""
    return sorted(names)[rank::world]


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0])
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = flag.to(device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _gather(obj, world: int) -> list:
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save(engine: Any, ckpt_dir: str | Path, tag: str, trainer_state: dict, config_yaml: str, *, config_digest: str,
         rank: int, world_size: int, update_latest: bool = True, keep_last: int = 0,
         inputs: dict | None = None) -> Path:
    """Write checkpoint `tag` from every rank (collective). Returns the final folder.

    trainer_state: this rank's extra state (step, loader states, ...); RNG states are added here. inputs:
    {part: digest} of the data trained on (FusionLoader.input_digests), checked on resume. A failure on any
    rank (a full disk) removes the whole temporary folder and raises CheckpointError on every rank.
    """
    ckpt_dir = Path(ckpt_dir)
    tmp_tag, final = f"tmp-{tag}", ckpt_dir / tag
    tmp = ckpt_dir / tmp_tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("tmp-*"):  # an earlier save that was killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    error = None
    try:
        # save_latest=False: `latest` is ours to update, after the folder is complete
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
        state = {"rng": rng_state(), **trainer_state}  # a caller-captured "rng" (NaN checkpoints) wins
        torch.save(state, tmp / f"trainer_rank{rank:05d}.pt")
        if rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
    except Exception as exc:  # noqa: BLE001 - any failure: every rank must learn of it, nothing partial kept
        error = exc
    if not _all_ok(error is None):
        full = error is not None and is_disk_full(error, ckpt_dir)  # before the cleanup frees the space
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = "no space left on device" if full else \
            f"{type(error).__name__}: {error}" if error else "another rank failed to write its part"
        msg = f"{tmp}: checkpoint not saved ({why}); nothing partial was kept, the previous checkpoint is intact"
        raise (CheckpointDiskFullError(errno.ENOSPC, msg) if full else CheckpointError(msg)) from error
    _barrier()
    names = [p.name for p in tmp.iterdir() if p.is_file()]
    mine = {n: {"bytes": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)}
            for n in _share(names, rank, world_size)}
    files = {k: v for part in _gather(mine, world_size) for k, v in part.items()}
    if rank == 0:
        info = {"step": int(trainer_state["step"]), "world_size": world_size, "config_digest": config_digest,
                "files": files, "inputs": inputs or {}}
        info["checksum"] = canonical_checksum(info)
        (tmp / INFO).write_text(json.dumps(info, indent=1, sort_keys=True))
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if update_latest:
            write_text_atomic(ckpt_dir / "latest", tag)
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


def read_info(path: Path) -> dict | None:
    """The checkpoint's profuser_checkpoint.json, or None when it is missing or fails its checksum."""
    try:
        info = json.loads((path / INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("checksum") == canonical_checksum(info) else None


def check(path: Path, info: dict, *, world_size: int, config_digest: str, allow_foreign: bool = False,
          inputs: dict | None = None, allow_changed_data: bool = False) -> None:
    """Raise ResumeError when this run may not resume from `path` (refusals are the same on every rank)."""
    recorded = info.get("inputs")
    if recorded and inputs is not None and not allow_changed_data:  # a checkpoint before records: nothing to compare
        changed = sorted(k for k in set(recorded) | set(inputs) if recorded.get(k) != inputs.get(k))
        if changed:
            raise ResumeError(f"{path}: trained on other data than this run reads: {'; '.join(changed[:4])}"
                              f"{' ...' if len(changed) > 4 else ''} changed since (a store rebuilt, re-scored or "
                              "replaced under the same data_dir); continue anyway with --allow-changed-data "
                              "(checkpoint.allow_changed_data=true), or start over with checkpoint.resume=never")
    if info["world_size"] != world_size:
        raise ResumeError(f"checkpoint {path} was written by {info['world_size']} rank(s) but this run has "
                          f"{world_size}: resume with the same world size (nodes x processes per node may differ), "
                          "or start over with checkpoint.resume=never")
    if info.get("config_digest") not in (None, config_digest) and not allow_foreign:
        raise ResumeError(f"{path}: written by another configuration (resume digest {info['config_digest'][:12]} "
                          f"!= {config_digest[:12]}: the model, data, loss, schedule, optimizer or DeepSpeed "
                          "settings differ); resume it anyway with checkpoint.allow_foreign=true")


def intact(path: Path, files: dict | None, *, rank: int, world_size: int) -> str | None:
    """Collective: None when every file has its recorded size and sha256 (each rank hashes a share), else
    the first problem found on this rank (or that another rank found one)."""
    problem = None
    for name in _share(list(files or {}), rank, world_size):
        f, want = path / name, files[name]
        if not f.is_file():
            problem = f"{f} is missing"
        elif f.stat().st_size != want["bytes"]:
            problem = f"{f} has {f.stat().st_size} bytes, {want['bytes']} were written"
        elif file_sha256(f) != want["sha256"]:
            problem = f"{f} differs from the sha256 recorded when it was written"
        if problem:
            break
    if not _all_ok(problem is None):
        return problem or "another rank found a damaged file"
    return None


def unlisted(path: Path, files: dict | None) -> list[str]:
    """Entries of checkpoint folder `path` its record does not list (None: no record to compare with)."""
    if files is None:
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in files and p.name != INFO)


# What DeepSpeed 0.19's ZeRO states pickle besides tensors and plain values (optimizer states: the loss
# scaler, the ZeRO stage enum, stage 1-2's fragment addresses). Plain data classes: rebuilding them runs no code.
DEEPSPEED_STATE_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                           "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                           "deepspeed.runtime.zero.config.ZeroStageEnum",
                           "deepspeed.utils.tensor_fragment.fragment_address")


def _safe_classes() -> list:
    import importlib

    out = []
    for name in DEEPSPEED_STATE_CLASSES:
        module, _, cls = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class cannot be in its files
            pass
    return out


def torch_load_safe(path: Path, map_location=None, *, allow_foreign: bool = False):
    """torch.load with weights_only=True (+ DEEPSPEED_STATE_CLASSES); ResumeError naming the file when it holds
    anything else. allow_foreign: unpickle anything (a folder the user trusts)."""
    try:
        with torch.serialization.safe_globals(_safe_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_foreign:
            raise ResumeError(f"{path}: holds objects other than tensors and plain values (refused: loading it "
                              f"could run code): {str(exc).splitlines()[0]}") from None
        return torch.load(path, map_location=map_location, weights_only=False)


def load(engine: Any, path: str | Path, *, rank: int, allow_foreign: bool = False) -> dict:
    """Restore engine (model, optimizer, lr scheduler) and return this rank's trainer state (RNG restored).
    Call after `check` and `intact`. Every file loads through torch_load_safe: a planted pickle is refused,
    never run (an older checkpoint's numpy RNG state needs allow_foreign)."""
    path = Path(path)
    state = torch_load_safe(path / f"trainer_rank{rank:05d}.pt", allow_foreign=allow_foreign)
    ce = engine.checkpoint_engine  # DeepSpeed's own reader calls torch.load(weights_only=False)
    ce.load = lambda f, map_location=None: torch_load_safe(Path(f), map_location, allow_foreign=allow_foreign)
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    finally:
        del ce.load  # the instance attribute: back to the class's method
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint {path}")
    set_rng_state(state.pop("rng"))
    return state


def resume_point(paths: list[Path], *, rank: int, world_size: int, config_digest: str,
                 allow_foreign: bool = False, inputs: dict | None = None,
                 allow_changed_data: bool = False) -> Path | None:
    """The newest of `paths` this run may resume from and whose files are intact. A damaged one (a file or its
    own record fails its checksum) is skipped with a warning naming what failed, and the previous one is
    used; a refused one (another world size or configuration) raises ResumeError."""
    for path in paths:
        info = read_info(path)
        if info is None and allow_foreign:  # trusted by the user: no record to check the files against
            info = {"world_size": len(list(path.glob("trainer_rank*.pt"))), "files": None}
        if info is None:
            problem = f"{path / INFO} is missing or fails its checksum"
        else:
            check(path, info, world_size=world_size, config_digest=config_digest, allow_foreign=allow_foreign,
                  inputs=inputs, allow_changed_data=allow_changed_data)
            extra = unlisted(path, info.get("files"))
            if extra:  # DeepSpeed would load a planted state file: never fall back silently, never load it
                raise ResumeError(f"{path / extra[0]}: not listed in {INFO} (written after the checkpoint: "
                                  f"{len(extra)} such entr{'y' if len(extra) == 1 else 'ies'}, {extra[:3]}); "
                                  "DeepSpeed could load it, so the checkpoint is refused: remove what was added, "
                                  "or start over with checkpoint.resume=never")
            problem = intact(path, info.get("files"), rank=rank, world_size=world_size)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to the previous one", stacklevel=2)
    if paths:
        raise ResumeError(f"no usable checkpoint among {[p.name for p in paths]} in {paths[0].parent}: damaged, or not "
                          "written by profuser train (a checkpoint folder can carry pickles that run code: resume "
                          "from one without its profuser_checkpoint.json only if you trust it, with "
                          "checkpoint.allow_foreign=true); or start over with checkpoint.resume=never")
    return None


def save_lora(lm, out: Path, dtype: torch.dtype) -> None:
    """A LoRA student: the adapter alone (model.lora.export=adapter) or the target with the adapter folded in
    (merged: a copy, so training goes on with the adapter unmerged)."""
    peft_model = lm.peft_model
    if getattr(lm, "lora_export", "merged") == "adapter":
        peft_model.save_pretrained(str(out))
        return
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.config.use_cache = True
    merged.to(dtype).save_pretrained(str(out))
    del merged


EXPORT_MARKER = "profuser_export.json"  # in every export: the folder is a profuser export, replaceable


def export_student(lm, tok, checkpoint: Path, out: Path, *, stage: int, rank: int,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write the student as a transformers folder (safetensors + config + tokenizer), atomically (rank 0).
    A tokenizer without a chat template gets the fallback one it was trained with (text/chat.py).

    ZeRO-3 parameters are partitioned, so the fp32 weights are consolidated from the checkpoint with
    DeepSpeed's zero_to_fp32 helpers (a LoRA run's frozen base and adapter both: the same adapter is put on a
    fresh base, loaded, then merged or saved alone); with stages 0-2 every rank holds the full module.
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
            lora = getattr(lm, "peft_model", None)
            if lora is not None:  # the same adapter on the fresh base: the state dict names both (base_layer, lora_A/B)
                from peft import get_peft_model

                peft_fresh = get_peft_model(fresh, copy.deepcopy(lora.peft_config["default"]))
                object.__setattr__(fresh, "peft_model", peft_fresh)
                object.__setattr__(fresh, "lora_export", getattr(lm, "lora_export", "merged"))
            missing, unexpected = fresh.load_state_dict(sd, strict=False)
            tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
            if fresh.config.tie_word_embeddings:
                tied |= {"lm_head.weight"}
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"export: checkpoint {checkpoint} does not match the student "
                                   f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
            fresh.tie_weights()
            fresh.config.use_cache = True
            if lora is not None:
                save_lora(fresh, tmp, dtype)
            else:
                fresh.to(dtype).save_pretrained(str(tmp))
        elif getattr(lm, "peft_model", None) is not None:  # a LoRA run (stages 0-2: the module is whole here)
            save_lora(lm, tmp, dtype)
        else:
            lm.config.use_cache = True
            if dtype == torch.float32:
                lm.save_pretrained(str(tmp))
            else:  # a cast copy of the weights; the training module keeps its own dtype
                state = {k: v.detach().to(dtype) for k, v in lm.state_dict().items()}
                saved_dtype = lm.config.dtype
                lm.config.dtype = dtype
                lm.save_pretrained(str(tmp), state_dict=state)
                lm.config.dtype = saved_dtype
            lm.config.use_cache = False
        tok.save_pretrained(str(tmp))
        if not getattr(tok, "chat_template", None):  # e.g. the Gemma-3 GGUF: the layout it was trained with
            (tmp / "chat_template.jinja").write_text(fallback_chat_template(tok), encoding="utf-8")
        (tmp / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(checkpoint) if checkpoint else None}) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    _barrier()
    return out
