"""`profuser check`: everything a training run would refuse, found without loading a model or training.

    profuser check --config configs/demo.yaml [key=value ...]

1. the config: every key's type and range (config.validate; errors name the key and the file);
2. the stores of every mode the schedule uses: manifests (checksums, prepared fingerprints, completeness),
   every prepared and teacher shard (digest, page checksums, structure) and every teacher row's values
   (store/shards.py), with a count of invalid rows per store and the first reasons;
3. identities: each store's manifest names the source and mode of its folder, and the inference-mode vote
   recorded the stores that are on disk now (store.check_vote_identities);
4. data.max_length against the templated prompts (the student's tokenizer only).
Exit 0 when training would start and read every row; 1 when it would fail (bad_row_policy=error and an
invalid row, a missing or damaged shard, ...) or, with bad_row_policy=drop, when rows would be dropped
(the report says how many), so scripts notice.
"""

from __future__ import annotations

import argparse
import sys

from .. import store
from ..config import TrainConfig, load_config
from ..config_cli import add_config_arguments, flag_overrides, keys_help
from ..loader.stream import check_max_length, check_stores
from ..models import load_tokenizer
from ..trainer.schedule import active_modes


def check_store(root, source: str, mode: str) -> tuple[int, int, list[str]]:
    """(rows, invalid rows, first reasons) of one (source, mode) store; StoreError on a damaged shard."""
    pm = store.PreparedManifest.load(root)
    st = store.TeacherStore(root, source, mode, prepared=pm)
    rows = invalid = 0
    reasons: list[str] = []
    for j in range(pm.n_shards):
        shard = st.shard(j, store.read_prepared_shard(root, j, pm))
        rows += shard.n_rows
        invalid += int(shard.invalid.sum())
        for i in sorted(shard.problems or {})[: max(0, 3 - len(reasons))]:
            reasons.append(f"{shard.path}: row {i}: {shard.problem(i)}")
    return rows, invalid, reasons


def check(cfg, out=print) -> int:
    modes = active_modes(cfg)
    check_stores(cfg, modes)
    bad = 0
    for mode in modes:
        key, root = cfg.data.store_dir(mode)
        for source in cfg.data.sources:
            rows, invalid, reasons = check_store(root, source, mode)
            out(f"{mode:5s} {source}: {rows} rows, {invalid} invalid ({root})")
            for r in reasons:
                out(f"      {r}")
            bad += invalid
        if mode == "infer":  # the vote's winners must be read from the stores the vote scored
            out(f"infer votes: {len(store.read_votes(root, cfg.data.sources))} examples, each source's store is "
                "the one the vote scored")
    check_max_length(cfg, load_tokenizer(cfg.model.student), modes)
    if bad:
        action = "would stop training (bad_row_policy=error)" if cfg.data.bad_row_policy == "error" else \
            "would be dropped (bad_row_policy=drop)"
        out(f"check: {bad} invalid row(s) {action}")
        return 1
    out(f"check: config, {len(modes)} mode(s) x {len(cfg.data.sources)} source(s) of stores and data.max_length "
        "are fine")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = keys_help()
    p.add_argument("--config", help="YAML experiment file or a shipped config's name (as for `profuser train`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(p, TrainConfig, config_and_overrides=False)


def run_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, flag_overrides(args) + list(args.overrides))
    return check(cfg, out=lambda s: print(s, file=sys.stdout, flush=True))
