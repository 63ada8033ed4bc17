"""Count host synchronisations: every torch entry point that makes the host wait for the device.

    with count_syncs() as counts:      # {entry point: calls}
        step(batch); loss.backward()
    with pause_counting(): ...         # code that is not ours (a model's own forward)

Value reads (item / tolist / bool / int / float / index / numpy), data-dependent shapes (nonzero, unique,
unique_consecutive, masked_select) and boolean-mask indexing all wait for the device on CUDA. Counting them
at the Python level works on the CPU too, so a test can prove a code path sync-free without a GPU; on a GPU
torch.cuda.set_sync_debug_mode adds the syncs inside C++ ops (bench/gpu_suite.py uses both).
"""

from __future__ import annotations

import contextlib

import torch

SYNC_POINTS = [(torch.Tensor, a) for a in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                                          "numpy", "nonzero", "unique", "unique_consecutive", "masked_select")] + \
              [(torch, a) for a in ("nonzero", "unique", "unique_consecutive", "masked_select")]
_STATE = {"paused": 0}


@contextlib.contextmanager
def pause_counting():
    _STATE["paused"] += 1
    try:
        yield
    finally:
        _STATE["paused"] -= 1


def paused_forward(module: torch.nn.Module) -> torch.nn.Module:
    """Wrap module.forward so that counting pauses while it runs (returns the module)."""
    forward = module.forward

    def inner(*a, **k):
        with pause_counting():
            return forward(*a, **k)

    module.forward = inner
    return module


@contextlib.contextmanager
def count_syncs():
    """{entry point: number of calls} made while active, outside pause_counting()."""
    counts: dict[str, int] = {}
    saved = []

    def wrap(name, fn):
        def inner(*a, **k):
            if not _STATE["paused"]:
                counts[name] = counts.get(name, 0) + 1
            return fn(*a, **k)
        return inner

    for owner, name in SYNC_POINTS:
        fn = getattr(owner, name)
        saved.append((owner, name, fn))
        setattr(owner, name, wrap(name, fn))
    getitem = torch.Tensor.__getitem__

    def getitem_checked(self, idx):
        parts = idx if isinstance(idx, tuple) else (idx,)
        if not _STATE["paused"] and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            counts["bool-index"] = counts.get("bool-index", 0) + 1
        return getitem(self, idx)

    torch.Tensor.__getitem__ = getitem_checked
    try:
        yield counts
    finally:
        torch.Tensor.__getitem__ = getitem
        for owner, name, fn in saved:
            setattr(owner, name, fn)
