"""The training recipe's view of the loader: one endless stream of batches per mode, built from TrainConfig.

    streams = build_streams(cfg, tokenizer, modes=["infer", "train"], rank=r, world_size=W)
    batch = streams["train"].next()          # the next batch; a new epoch (new order) starts by itself
    streams["train"].state_dict()            # {"loader": FusionLoader.state_dict(), "epoch": n}

The global rank picks this process's shards and rows (FusionLoader: j % W == r); the local rank plays no
part in data. A mode's store lives in data.data_dir, or data.infer_data_dir for inference mode when set.
"""

from __future__ import annotations

import warnings

import numpy as np

from .. import store
from ..config import TrainConfig
from .loader import FusionLoader


def check_stores(cfg: TrainConfig, modes: list[str]) -> None:
    """Every store the run reads exists and matches its prepared set (seconds, before any model loads)."""
    for mode in modes:
        key, root = cfg.data.store_dir(mode)
        store.require_stores(root, cfg.data.sources, mode, what=key, k=cfg.data.k)


class BatchStream:
    """Iterates a FusionLoader epoch after epoch; its state_dict is the loader's plus the epoch number."""

    def __init__(self, loader: FusionLoader, mode: str, rank: int):
        self.loader, self.mode, self.rank, self.epoch = loader, mode, rank, 0
        self._it = None

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is None:
                raise RuntimeError(
                    f"rank {self.rank}: the {self.mode}-mode store in {self.loader.root} yields no batch for "
                    "this rank "
                    f"({self.loader.n_shards} shards, {self.loader.world_size} ranks; every example was dropped, "
                    f"or data.max_length is shorter than every templated prompt)") from None
            return batch

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, sd: dict) -> None:
        self.loader.load_state_dict(sd["loader"])
        self.epoch = sd["epoch"]
        self._it = None


def build_streams(cfg: TrainConfig, tok, modes: list[str], rank: int, world_size: int) -> dict[str, BatchStream]:
    """One BatchStream per mode in `modes`, each over its own FusionLoader."""
    streams = {}
    for mode in modes:
        loader = FusionLoader(cfg.data, tok, student=cfg.model.student, mode=mode, seed=cfg.seed, rank=rank,
                              world_size=world_size)
        streams[mode] = BatchStream(loader, mode, rank)
    return streams


def check_vocab_rows(loader: FusionLoader, vocab_rows: int, student: str) -> None:
    """Every mapped teacher id must index a row of the student's lm_head ([vocab_rows, H])."""
    for name, vm in zip(loader.source_names, loader.vocab_maps):
        if vm is not None and vm.numel() and int(vm.max()) >= vocab_rows:
            raise ValueError(f"model.student={student}: its lm_head has {vocab_rows} rows but the vocab map of "
                             f"source {name!r} maps to id {int(vm.max())}; the store was built for another "
                             "student tokenizer")


def check_max_length(cfg: TrainConfig, tok, modes: list[str], sample: int = 512) -> None:
    """data.max_length against the stores' prompts, before any model loads: ConfigError when the templated
    prompts of a mode's first `sample` examples all leave no room for a response token (every example
    would be dropped); a warning with the count when some do."""
    from ..config import ConfigError
    from .collate import StudentEncoder

    L = cfg.data.max_length
    for mode in modes:
        key, root = cfg.data.store_dir(mode)
        pm = store.PreparedManifest.load(root)
        rows = store.read_prepared_shard(root, 0, pm).slice(0, sample)
        # without the earlier turns of multi-turn rows: encode_example cuts those to fit, never the prompt
        enc = StudentEncoder(tok).encode_batch(rows["prompt"].to_pylist(), [""] * rows.num_rows,
                                               rows["system"].to_pylist())
        prompt_len = np.array([enc.pred_pos[a] + 1 for a in enc.pred_off[:-1].tolist()])  # templated prompt tokens
        too_long = int((prompt_len >= L).sum())
        if too_long == len(prompt_len):
            raise ConfigError(f"data.max_length={L}: shorter than every templated prompt of the first {too_long} "
                              f"{mode}-mode examples in {key}={root} (the shortest has {int(prompt_len.min())} "
                              "tokens): every example would be dropped")
        if too_long:
            warnings.warn(f"data.max_length={L}: {too_long} of the first {len(prompt_len)} {mode}-mode examples in "
                          f"{root} have a longer templated prompt and will be dropped", stacklevel=2)
