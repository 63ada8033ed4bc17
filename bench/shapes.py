"""Shape registry for the benchmarks: real model dimensions, never hard-coded in a bench script.

Each entry is the student's lm_head shape (hidden size H, vocabulary V) as in the model's config.
gpu_only marks shapes too large for a CPU run (the [N x V] naive baseline would not fit in 24 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int   # H
    vocab: int    # V
    gpu_only: bool = False


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("smollm2-135m", hidden=576, vocab=49152),
        ModelShape("gemma3-270m", hidden=640, vocab=262144),
        ModelShape("llama3-8b", hidden=4096, vocab=128256, gpu_only=True),
        ModelShape("gemma3-12b", hidden=3840, vocab=262144, gpu_only=True),
        ModelShape("tiny", hidden=40, vocab=301),  # bench/gpu_suite.py --dry-run
    )
}


def get(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(MODELS)}") from None
