"""Sequence packing: a micro-batch's examples laid end to end into rows of at most `row_tokens` tokens.

Padding a batch to its longest example spends the forward on pad positions when lengths are uneven
(instruction data: a few dozen to thousands of tokens). Packing instead fills each row with whole examples,
first-fit in the order the loader yields them (deterministic: the same order gives the same rows, so a
resumed run continues the same packed rows), and

    position_ids  restart at 0 for every example, so the model sees each example at its own positions;
    attention     stays inside an example: the batch carries no attention mask and transformers builds
                  the block-diagonal causal mask from position_ids (masking_utils.find_packed_sequence_indices
                  for sdpa / eager; varlen flash-attention on GPUs), verified by tests/engine/loader/
                  test_packing.py on the pinned version (an edited example leaves its neighbours' logits
                  bit-identical);
    targets       labels, teacher top-k, advantage weights and the mode follow each example's positions.

The padding after a row's last example gets positions 0, 1, ... (a sequence of its own: it attends to
nothing real, and nothing real attends to it - causality). Batch keys as collate.collate, plus position_ids
[B, L] int64 and example_row [n] int64 (the row of each example, example_ids in row order), `packed` True.
"""

from __future__ import annotations

import numpy as np
import torch

from .collate import IGNORE_INDEX, empty_batch, place


def first_fit(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows: each example goes to the first row it still fits in (a longer
    one than row_tokens gets a row of its own). [n] -> rows of example indices, in order of first use."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(row_tokens - n, 0))
    return rows


def collate_packed(items: list, *, n_teachers: int, k: int, pad_id: int, row_tokens: int,
                   pad_to_multiple_of: int = 1) -> dict:
    """Pack (ProcessedShard, i) examples into rows of <= row_tokens tokens (see the module docstring).

    Returns input_ids / attention_mask / position_ids / labels [B, L] int64, teacher_ids [T, B, L, K] int32,
    teacher_logprobs [T, B, L, K] float16, teacher_weights [T, B, L] float32, mode [B] int64 (every example of
    a row has the row's mode), example_ids list[str] [n] in row order, example_row [n] int64, n_tokens int,
    packed True. attention_mask is ones over the real tokens of a row (a row is right-padded).
    """
    lens = [int(sh.enc.ids_off[i + 1] - sh.enc.ids_off[i]) for sh, i in items]
    rows = first_fit(lens, row_tokens)
    fill = [sum(lens[i] for i in row) for row in rows]
    m = max(int(pad_to_multiple_of), 1)
    L = -(-max(fill, default=0) // m) * m
    arrays = empty_batch(n_teachers, len(rows), L, k, pad_id)
    pos_ids = np.zeros((len(rows), L), np.int64)
    order, example_row = [], []
    for b, row in enumerate(rows):
        at = 0
        for j in row:
            sh, i = items[j]
            if at and sh.mode != arrays["mode"][b]:
                raise ValueError("collate_packed: one row holds examples of two modes (streams are per mode)")
            n = place(arrays, b, at, sh, i)
            pos_ids[b, at:at + n] = np.arange(n)
            order.append(sh.example_ids[i])
            example_row.append(b)
            at += n
        pos_ids[b, at:] = np.arange(L - at)  # the padding: a sequence of its own
    out = {key: torch.from_numpy(v) for key, v in arrays.items()}
    out.update(position_ids=torch.from_numpy(pos_ids), example_ids=order,
               example_row=torch.tensor(example_row, dtype=torch.int64),
               n_tokens=int((arrays["labels"] != IGNORE_INDEX).sum()), packed=True)
    return out
