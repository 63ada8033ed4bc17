"""Student-side batch encoding and padded collation for the streaming loader.

Two jobs, both on flat numpy arrays so the loader never loops over tokens in Python:

1. `encode_batch`: the student's tokenization of many (prompt, response) pairs at once. It gives exactly
   what `profuser.engine.chat.encode_example` gives for each pair (tests/test_data_encode.py checks it on
   real text, truncation included), but tokenizes all prefixes, responses and suffixes with one fast-
   tokenizer batch call each instead of three calls per example (about 5x faster on short examples).
   Tokenizers without offsets, or without a fast backend, go through encode_example one by one.

2. `collate`: pad a list of processed examples into the batch dict of docs/contracts.md section 4.
   Labels are already shifted: labels[b, p] = input_ids[b, p + 1] at the predicted positions p, -100
   elsewhere. Teacher tensors are scattered at the same positions: teacher_ids[t, b, p, :] is the top-k of
   the teacher token aligned to the student token predicted at p (-1 = none), logprobs -inf there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import chat

IGNORE_INDEX = -100


@dataclass
class EncodedBatch:
    """n encoded examples, concatenated (example i owns [off[i], off[i + 1]) of each flat array).

    input_ids [sum L] int32, ids_off [n + 1] int64; pred_pos / pred_ids [sum R] int32, pred_offsets
    [sum R, 2] int32, pred_off [n + 1] int64.
    """

    input_ids: np.ndarray
    ids_off: np.ndarray
    pred_pos: np.ndarray
    pred_ids: np.ndarray
    pred_offsets: np.ndarray
    pred_off: np.ndarray


def _from_examples(encs: list[chat.EncodedExample]) -> EncodedBatch:
    lens = np.array([e.input_ids.shape[0] for e in encs], dtype=np.int64)
    rs = np.array([e.pred_ids.shape[0] for e in encs], dtype=np.int64)
    cat = (lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt))
    return EncodedBatch(
        input_ids=cat([e.input_ids for e in encs], (0,), np.int32),
        ids_off=np.concatenate([[0], np.cumsum(lens)]),
        pred_pos=cat([e.pred_pos for e in encs], (0,), np.int32),
        pred_ids=cat([e.pred_ids for e in encs], (0,), np.int32),
        pred_offsets=cat([e.pred_offsets for e in encs], (0, 2), np.int32),
        pred_off=np.concatenate([[0], np.cumsum(rs)]),
    )


def _fast_ok(tok) -> bool:
    return bool(getattr(tok, "is_fast", False)) and bool(getattr(tok, "chat_template", None))


def encode_batch(tok, prompts: list[str], responses: list[str], systems: list[str | None], *,
                 max_length: int | None = None, errors: list | None = None) -> EncodedBatch:
    """Encode n conversations like chat.encode_example (see EncodedBatch for the shapes).

    errors: when a list is given, an example that encode_example would reject (ValueError: prompt longer
    than max_length, ids that do not describe the text) is encoded as empty (L = R = 0) and
    (i, message) is appended; otherwise the ValueError propagates.
    """
    n = len(prompts)
    if not _fast_ok(tok):
        encs = []
        for i in range(n):
            try:
                encs.append(chat.encode_example(tok, prompts[i], responses[i], system=systems[i],
                                                max_length=max_length))
            except ValueError as exc:
                if errors is None:
                    raise
                errors.append((i, str(exc)))
                encs.append(chat.EncodedExample(np.zeros(0, np.int32), np.zeros(0, np.int32),
                                                np.zeros((0, 2), np.int32), np.zeros(0, np.int32)))
        return _from_examples(encs)

    parts = [chat.render_parts(tok, prompts[i], systems[i]) for i in range(n)]
    # one batch call per part kind; suffixes are nearly always identical, tokenize each distinct one once
    prefix_ids = tok([p for p, _ in parts], add_special_tokens=False)["input_ids"] if n else []
    distinct = sorted({s for _, s in parts})
    sfx = dict(zip(distinct, tok(distinct, add_special_tokens=False)["input_ids"])) if distinct else {}
    sfx[""] = []
    enc = tok(list(responses), add_special_tokens=False, return_offsets_mapping=True) if n else None

    ids_chunks, pos_chunks, pid_chunks, off_chunks = [], [], [], []
    lens = np.zeros(n, np.int64)
    rs = np.zeros(n, np.int64)
    for i in range(n):
        response = responses[i]
        try:
            if not isinstance(prompts[i], str) or not isinstance(response, str):
                raise ValueError("prompt and response must be str")
            pre = prefix_ids[i]
            suffix_ids = list(sfx[parts[i][1]])
            if not pre:
                raise ValueError("the templated prompt encodes to no tokens")
            if response:
                resp_ids = np.asarray(enc["input_ids"][i], dtype=np.int32)
                resp_off = chat.canonical_offsets(np.asarray(enc["offset_mapping"][i], np.int32).reshape(-1, 2),
                                                  response)
            else:
                resp_ids, resp_off = np.zeros(0, np.int32), np.zeros((0, 2), np.int32)
            eot = chat.end_of_turn_id(tok, suffix_ids)
            if not suffix_ids:
                suffix_ids = [eot]
            # the truncation rule of chat.encode_example, verbatim
            P, n_resp = len(pre), len(resp_ids)
            if max_length is not None and P + n_resp + len(suffix_ids) > max_length:
                if P >= max_length:
                    raise ValueError(f"max_length={max_length} leaves no room for the response: the templated "
                                     f"prompt alone has {P} tokens")
                keep = min(n_resp, max_length - P)
                suffix_ids = suffix_ids[: max_length - P - n_resp] if keep == n_resp else []
                resp_ids, resp_off, n_resp = resp_ids[:keep], resp_off[:keep], keep
        except ValueError as exc:
            if errors is None:
                raise
            errors.append((i, str(exc)))
            continue
        ends_turn = len(suffix_ids) > 0
        ids = np.concatenate([np.asarray(pre, np.int32), resp_ids, np.asarray(suffix_ids, np.int32)])
        R = n_resp + int(ends_turn)
        pos = np.arange(P - 1, P - 1 + R, dtype=np.int32)
        off = np.empty((R, 2), np.int32)
        off[:n_resp] = resp_off
        if ends_turn:
            off[n_resp] = len(response)
        ids_chunks.append(ids)
        pos_chunks.append(pos)
        pid_chunks.append(ids[pos + 1])
        off_chunks.append(off)
        lens[i], rs[i] = ids.shape[0], R
    cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, np.int32))
    return EncodedBatch(input_ids=cat(ids_chunks, (0,)), ids_off=np.concatenate([[0], np.cumsum(lens)]),
                        pred_pos=cat(pos_chunks, (0,)), pred_ids=cat(pid_chunks, (0,)),
                        pred_offsets=cat(off_chunks, (0, 2)), pred_off=np.concatenate([[0], np.cumsum(rs)]))


def collate(items: list[tuple[object, int]], *, n_teachers: int, k: int, pad_id: int,
            pad_to_multiple_of: int = 1) -> dict:
    """Pad examples into one batch (docs/contracts.md section 4).

    items: (shard, i) pairs, `shard` a processed shard (profuser.engine.data.ProcessedShard) and i an
    example index in it. Returns input_ids / attention_mask / labels [B, L] int64, teacher_ids
    [T, B, L, K] int32, teacher_logprobs [T, B, L, K] float16, teacher_weights [T, B, L] float32, mode [B]
    int64, example_ids list[str], n_tokens int. L = longest example rounded up to pad_to_multiple_of.
    """
    B = len(items)
    lens = [int(sh.enc.ids_off[i + 1] - sh.enc.ids_off[i]) for sh, i in items]
    L = max(lens) if lens else 0
    m = max(int(pad_to_multiple_of), 1)
    L = -(-L // m) * m
    input_ids = np.full((B, L), pad_id, np.int64)
    attn = np.zeros((B, L), np.int64)
    labels = np.full((B, L), IGNORE_INDEX, np.int64)
    tids = np.full((n_teachers, B, L, k), -1, np.int32)
    tlps = np.full((n_teachers, B, L, k), -np.inf, np.float16)
    tw = np.zeros((n_teachers, B, L), np.float32)
    mode = np.zeros(B, np.int64)
    for b, (sh, i) in enumerate(items):
        e = sh.enc
        a, z = e.ids_off[i], e.ids_off[i + 1]
        input_ids[b, : z - a] = e.input_ids[a:z]
        attn[b, : z - a] = 1
        a, z = e.pred_off[i], e.pred_off[i + 1]
        pos = e.pred_pos[a:z]
        labels[b, pos] = e.pred_ids[a:z]
        tids[:, b, pos] = sh.teacher_ids[:, a:z]
        tlps[:, b, pos] = sh.teacher_logprobs[:, a:z]
        tw[:, b, pos] = sh.teacher_weights[:, a:z]
        mode[b] = sh.mode
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attn),
        "labels": torch.from_numpy(labels),
        "teacher_ids": torch.from_numpy(tids),
        "teacher_logprobs": torch.from_numpy(tlps),
        "teacher_weights": torch.from_numpy(tw),
        "mode": torch.from_numpy(mode),
        "example_ids": [sh.example_ids[i] for sh, i in items],
        "n_tokens": int((labels != IGNORE_INDEX).sum()),
    }
