"""`profuser repoint`: tell a store where its source model lives now (the model folder moved, or the store was
copied to a machine where the models are elsewhere).

    profuser repoint --data-dir runs/wn --source gemma3 --model /new/place/gemma-3-270m [--force]

A manifest records each source canonically (an alias, or the absolute path of its folder) and the model's
fingerprint (models.model_fingerprint: config, tokenizer and template files, weight file names and sizes).
Repointing checks that the new folder holds the same model (same fingerprint and tokenizer hash) and
rewrites the `model` of every mode's manifest of that source; --force accepts another fingerprint (a
re-saved copy of the same weights, say), never another tokenizer.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .. import store
from ..config import MODES
from ..config_cli import add_config_arguments, config_from_args
from ..models import canonical_spec, load_tokenizer, model_fingerprint
from ..text.align import tokenizer_hash


def repoint(data_dir, source: str, model: str, *, force: bool = False, log=print) -> list[str]:
    """Rewrite `source`'s manifests (every mode present) to `model`. Returns the manifests rewritten."""
    fingerprint, tok_hash = model_fingerprint(model), tokenizer_hash(load_tokenizer(model))
    done = []
    for mode in MODES:
        path = store.TeacherManifest.path(data_dir, source, mode)
        if not path.is_file():
            continue
        m = store.TeacherManifest.load(data_dir, source, mode)
        if m.tokenizer_hash != tok_hash:
            raise store.StoreError(f"{path}: {model} has another tokenizer than the one this store was written with "
                                   "(tokenizer_hash differs): not the same model")
        if m.model_fingerprint not in (None, fingerprint) and not force:
            raise store.StoreError(f"{path}: {model} has another fingerprint ({fingerprint[:19]}) than the model this "
                                   f"store was written with ({m.model_fingerprint[:19]}); --force if it is a re-saved "
                                   "copy of the same weights")
        log(f"{path}: model {m.model} -> {canonical_spec(model)}")
        m.model, m.model_fingerprint = canonical_spec(model), fingerprint
        m.save(data_dir)
        done.append(str(path))
    if not done:
        raise store.StoreError(f"{data_dir}: no store of source {source!r} (no teachers/{source}/<mode>/manifest.json)")
    return done


@dataclass
class RepointConfig:
    """Options of `profuser repoint`."""

    data_dir: str  # the store folder whose manifests name the moved model
    source: str  # the source's store name (folder under teachers/)
    model: str  # where the source's model folder is now (or its alias)
    force: bool = False  # accept a different model fingerprint (same tokenizer)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, RepointConfig)


def run_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(RepointConfig, args)
    repoint(cfg.data_dir, cfg.source, cfg.model, force=cfg.force)
    return 0
