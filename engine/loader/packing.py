"""Sequence packing: a micro-batch's examples laid end to end into rows of at most `row_tokens` tokens.

Padding a batch to its longest example spends the forward on pad positions when lengths are uneven
(instruction data: a few dozen to thousands of tokens). Packing instead fills each row with whole examples,
first-fit in the order the loader yields them (deterministic: the same order gives the same rows, so a
resumed run continues the same packed rows), into rows of `row_tokens` or, when that lays out fewer
positions, of the batch's longest example (`layout`: a packed batch never has more positions than the
padded one), and

    position_ids  restart at 0 for every example, so the model sees each example at its own positions;
    attention     stays inside an example: the batch carries no attention mask; for sdpa / eager / flex
                  transformers builds the block-diagonal causal mask from position_ids
                  (masking_utils.find_packed_sequence_indices, any number of rows); flash-attention gets the
                  sequences' bounds as varlen arguments (`forward_kwargs`), because transformers infers them
                  from position_ids only for a batch of ONE row (modeling_flash_attention_utils.
                  _is_packed_sequence on the pinned 5.24: with several rows every token would attend to the
                  examples before it in its row) and would read the device in every layer to do so. Verified
                  by tests/engine/loader/test_packing.py on the pinned version and, for the model and
                  attention implementation of a run, by trainer/packing_check.py before its first step;
    targets       labels, teacher top-k, advantage weights and the mode follow each example's positions.

The padding after a row's last example gets positions 0, 1, ... (a sequence of its own: it attends to
nothing real, and nothing real attends to it - causality). Batch keys as collate.collate, plus position_ids
[B, L] int64, example_row [n] int64 (the row of each example, example_ids in row order), cu_seq_lens [S + 1]
int32 and max_seq_len int (`varlen_bounds`), `packed` True.
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


def layout(lengths: list[int], row_tokens: int, multiple: int = 1) -> list[list[int]]:
    """The rows of a packed micro-batch: first fit into rows of row_tokens, or into rows of the longest
    example's length when that takes fewer positions (rows x width rounded up to `multiple`). The second
    never takes more than the padded batch (each row at most the longest example, at most one row per
    example), so packing never costs positions; the first fills rows further under a token budget."""
    if not lengths:
        return []
    m = max(int(multiple), 1)

    def positions(rows: list[list[int]]) -> int:
        return len(rows) * -(-max(sum(lengths[i] for i in r) for r in rows) // m) * m

    candidates = [first_fit(lengths, row_tokens)]
    if max(lengths) < row_tokens:
        candidates.append(first_fit(lengths, max(lengths)))
    return min(candidates, key=positions)  # a tie keeps the fuller rows of row_tokens


def varlen_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, L] positions -> (cu_seq_lens [S + 1] int32, max_seq_len): the bounds of the S sequences in the B * L
    tokens read row after row, as flash-attention's varlen functions take them. A sequence starts where a
    position does not continue the one before it (transformers' find_packed_sequence_indices reads the
    same) and at every row's start."""
    B, L = position_ids.shape
    flat = position_ids.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1] + 1
    start[::max(L, 1)] = True
    cu = torch.cat([torch.nonzero(start).squeeze(1), torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if flat.numel() else 0


def forward_kwargs(batch: dict, attn_implementation: str | None) -> dict:
    """The backbone's keyword arguments for a packed batch (module docstring): position_ids, no mask, and on
    flash-attention the varlen bounds (transformers' FlashAttentionKwargs)."""
    from transformers.utils.generic import is_flash_attention_requested  # transformers' own rule, not a copy

    kw = {"attention_mask": None, "position_ids": batch["position_ids"]}
    if is_flash_attention_requested(requested_attention_implementation=attn_implementation):
        cu, longest = batch["cu_seq_lens"], int(batch["max_seq_len"])
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return kw


def collate_packed(items: list, *, n_teachers: int, k: int, pad_id: int, row_tokens: int,
                   pad_to_multiple_of: int = 1) -> dict:
    """Pack (ProcessedShard, i) examples into rows of <= row_tokens tokens (see the module docstring).

    Returns input_ids / attention_mask / position_ids / labels [B, L] int64, cu_seq_lens [S + 1] int32 and
    max_seq_len int (varlen_bounds), teacher_ids [T, B, L, K] int32,
    teacher_logprobs [T, B, L, K] float16, teacher_weights [T, B, L] float32, mode [B] int64 (every example of
    a row has the row's mode), example_ids list[str] [n] in row order, example_row [n] int64, n_tokens int,
    packed True. attention_mask is ones over the real tokens of a row (a row is right-padded).
    """
    lens = [int(sh.enc.ids_off[i + 1] - sh.enc.ids_off[i]) for sh, i in items]
    m = max(int(pad_to_multiple_of), 1)
    rows = layout(lens, row_tokens, m)
    fill = [sum(lens[i] for i in row) for row in rows]
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
    cu, longest = varlen_bounds(torch.from_numpy(pos_ids))
    out.update(position_ids=torch.from_numpy(pos_ids), example_ids=order, cu_seq_lens=cu, max_seq_len=longest,
               example_row=torch.tensor(example_row, dtype=torch.int64),
               n_tokens=int((arrays["labels"] != IGNORE_INDEX).sum()), packed=True)
    return out
