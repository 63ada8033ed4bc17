"""Student-side batch encoding and padded collation for the streaming loader.

Two jobs, both on flat numpy arrays so the loader never loops over tokens in Python:

1. `StudentEncoder.encode_batch`: the student's tokenization of many (prompt, response) pairs at once.
   It gives exactly what `text.chat.encode_example` gives for each pair (tests/engine/loader/
   test_student_encoder.py checks it on real text, truncation included) at a fraction of the cost. On short
   instruction data the chat template, not the response, dominates, so:
     - all responses go through one fast-tokenizer batch call (with offsets);
     - a *template plan* per distinct system prompt: the template is rendered once with a sentinel
       prompt, giving prefix = head + prompt + tail. The head up to its last special token and the tail
       from its first special token are tokenized once (a special token splits the text, so the pieces
       on either side tokenize independently); per example only head' + prompt + tail' is tokenized
       (e.g. "user\n" + prompt), in one batch call. A plan is used only after it reproduces
       chat.render_parts and the full prefix tokenization exactly on probe prompts (edge whitespace,
       markup, non-ASCII, empty), and each batch re-renders its first example as a spot check. A template
       that rewrites or branches on the prompt fails the checks and is rendered per example (exact path).
   Tokenizers without a chat template or a fast backend go through encode_example one by one.

2. `collate`: pad a list of processed examples into the batch dict of docs/contracts.md section 4.
   Labels are already shifted: labels[b, p] = input_ids[b, p + 1] at the predicted positions p, -100
   elsewhere. Teacher tensors are scattered at the same positions: teacher_ids[t, b, p, :] is the top-k of
   the teacher token aligned to the student token predicted at p (-1 = none), logprobs -inf there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..text import chat
from ..text.literal_text import encode_text, encode_texts, prefix_segments, special_tokens, template_ids

log = logging.getLogger("profuser.loader")
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



def _cat(xs: list, shape: tuple, dtype=np.int32) -> np.ndarray:
    """np.concatenate that also takes an empty list (an empty array of `shape`)."""
    return np.concatenate(xs) if xs else np.zeros(shape, dtype)

def _in_order(n: int, parts: list[tuple[list[int], EncodedBatch]]) -> EncodedBatch:
    """One batch of n examples from batches of some of them: parts [(their indices among the n, batch)]."""
    encs: list = [None] * n
    for idx, b in parts:
        for j, i in enumerate(idx):
            a, z, p, q = b.ids_off[j], b.ids_off[j + 1], b.pred_off[j], b.pred_off[j + 1]
            encs[i] = chat.EncodedExample(b.input_ids[a:z], b.pred_pos[p:q], b.pred_offsets[p:q], b.pred_ids[p:q])
    return _from_examples(encs)


def _from_examples(encs: list[chat.EncodedExample]) -> EncodedBatch:
    lens = np.array([e.input_ids.shape[0] for e in encs], dtype=np.int64)
    rs = np.array([e.pred_ids.shape[0] for e in encs], dtype=np.int64)
    return EncodedBatch(
        input_ids=_cat([e.input_ids for e in encs], (0,), np.int32),
        ids_off=np.concatenate([[0], np.cumsum(lens)]),
        pred_pos=_cat([e.pred_pos for e in encs], (0,), np.int32),
        pred_ids=_cat([e.pred_ids for e in encs], (0,), np.int32),
        pred_offsets=_cat([e.pred_offsets for e in encs], (0, 2), np.int32),
        pred_off=np.concatenate([[0], np.cumsum(rs)]),
    )


_SENTINEL = "\x00\x02PROFUSER_PROMPT\x02\x00"
_PROBES = ("What is a cat?", "  padded \n\n prompt  ", "<b>&amp; {{ x }} {% raw %}'\"",
           "Ünïcödé 東京 😀", "", "line one\nline two\t", " ")


class _Plan:
    """prefix(prompt) = head + prompt + tail for one system prompt; ids = head_ids + ids(mid) + tail_ids, where
    mid is the run of text around the prompt between two template special tokens (text/literal_text.py)."""

    def __init__(self, tok, system):
        prefix, self.suffix = chat.render_parts(tok, _SENTINEL, system)
        if prefix.count(_SENTINEL) != 1 or _SENTINEL in self.suffix:
            raise ValueError("the prompt is not inserted verbatim")
        self.head, self.tail = prefix.split(_SENTINEL)
        segs = prefix_segments(tok, _SENTINEL, system, lambda t, p, s, h: chat.render_parts(t, p, s, h)[0])
        if segs is None:
            raise ValueError("the template rewrites its content")
        k = next(i for i, (text, special) in enumerate(segs) if not special and _SENTINEL in text)
        self.mid_head, self.mid_tail = segs[k][0].split(_SENTINEL)
        table = special_tokens(tok)[0]

        def ids(part):
            return [x for text, special in part for x in ([table[text]] if special else encode_text(tok, text))]

        self.head_ids, self.tail_ids = ids(segs[:k]), ids(segs[k + 1:])
        for probe in _PROBES:  # strings and ids must match the exact path
            if chat.render_parts(tok, probe, system) != (self.head + probe + self.tail, self.suffix):
                raise ValueError("the template rewrites or branches on the prompt")
            if self.prefix_ids(tok, [probe])[0] != chat.templated_prompt_ids(tok, probe, system):
                raise ValueError("the pieces around the special tokens do not tokenize independently")

    def prefix_ids(self, tok, prompts: list[str]) -> list[list[int]]:
        mids = encode_texts(tok, [self.mid_head + p + self.mid_tail for p in prompts])
        return [self.head_ids + list(m) + self.tail_ids for m in mids]


class StudentEncoder:
    """Batched chat.encode_example for one tokenizer (see the module header); keeps template plans."""

    def __init__(self, tok):
        self.tok = tok
        self.fast = bool(getattr(tok, "is_fast", False)) and bool(getattr(tok, "chat_template", None))
        self._plans: dict = {}

    def _plan(self, system):
        if system not in self._plans:
            try:
                self._plans[system] = _Plan(self.tok, system)
            except Exception as exc:  # noqa: BLE001 - any failure means: render this system's prompts one by one
                log.info("student encoding: the fast template plan does not hold for system prompt %r (%s: %s); "
                         "rendering its prompts one by one (same result, slower)", system, type(exc).__name__, exc)
                self._plans[system] = None
        return self._plans[system]

    def _parts(self, prompts, systems) -> tuple[list, list]:
        """(prefix ids, suffix string) per example, through the plans where they hold."""
        tok, n = self.tok, len(prompts)
        pre, suf = [None] * n, [None] * n
        by_plan, rendered = {}, []
        for i in range(n):
            ok = isinstance(prompts[i], str) and (systems[i] is None or isinstance(systems[i], str))
            if ok and self._plan(systems[i]) is not None:
                by_plan.setdefault(systems[i], []).append(i)
            else:
                rendered.append(i)
        for system, idx in by_plan.items():
            plan, p0 = self._plans[system], prompts[idx[0]]
            if chat.render_parts(tok, p0, system) != (plan.head + p0 + plan.tail, plan.suffix):
                log.warning("student encoding: the template plan failed its spot check on a prompt (system %r); "
                            "rendering these prompts one by one from now on", system)
                self._plans[system] = None  # never use this plan again
                rendered += idx
                continue
            for i, ids in zip(idx, plan.prefix_ids(tok, [prompts[i] for i in idx])):
                pre[i], suf[i] = ids, plan.suffix
        for i in rendered:
            if isinstance(prompts[i], str):  # _assemble rejects the others
                pre[i], suf[i] = chat.templated_prompt_ids(tok, prompts[i], systems[i]), \
                    chat.render_parts(tok, prompts[i], systems[i])[1]
        return pre, suf

    def encode_batch(self, prompts: list[str], responses: list[str], systems: list[str | None], *,
                     max_length: int | None = None, errors: list | None = None,
                     histories: list | None = None) -> EncodedBatch:
        """Encode n conversations like chat.encode_example (see EncodedBatch for the shapes).

        errors: when a list is given, an example that encode_example would reject (ValueError: prompt
        longer than max_length, ids that do not describe the text) is encoded as empty (L = R = 0) and
        (i, message) is appended; otherwise the ValueError propagates. histories: the earlier turns per
        example (None: a single exchange); rows with some go through encode_example one by one (the template
        plans describe a single exchange; multi-turn rows cut their history to max_length there), the others
        through the plans, and the two are put back in order.
        """
        multi = [i for i, h in enumerate(histories or ()) if h]
        if not self.fast or len(multi) == len(prompts) > 0:
            return _encode_each(self.tok, prompts, responses, systems, max_length, errors, histories)
        if not multi:
            pre, suf = self._parts(prompts, systems)
            return _assemble(self.tok, prompts, responses, pre, suf, max_length, errors)
        single = [i for i in range(len(prompts)) if not histories[i]]
        parts = []
        for idx, multi_turn in ((single, False), (multi, True)):
            errs = None if errors is None else []
            args = ([prompts[i] for i in idx], [responses[i] for i in idx], [systems[i] for i in idx])
            parts.append((idx, self.encode_batch(*args, max_length=max_length, errors=errs,
                                                 histories=[histories[i] for i in idx] if multi_turn else None)))
            if errors is not None:
                errors += [(idx[j], msg) for j, msg in errs]
        return _in_order(len(prompts), parts)


def _encode_each(tok, prompts, responses, systems, max_length, errors, histories=None) -> EncodedBatch:
    encs = []
    for i in range(len(prompts)):
        try:
            encs.append(chat.encode_example(tok, prompts[i], responses[i], system=systems[i],
                                            history=None if histories is None else histories[i],
                                            max_length=max_length))
        except ValueError as exc:
            if errors is None:
                raise
            errors.append((i, str(exc)))
            encs.append(chat.EncodedExample(np.zeros(0, np.int32), np.zeros(0, np.int32),
                                            np.zeros((0, 2), np.int32), np.zeros(0, np.int32)))
    return _from_examples(encs)


def _assemble(tok, prompts, responses, prefix_ids, suffixes, max_length, errors) -> EncodedBatch:
    """prefix ids + response ids + suffix ids per example, with encode_example's truncation rule."""
    n = len(prompts)
    distinct = sorted({s for s in suffixes if s})
    sfx = {text: template_ids(tok, text) for text in distinct}
    sfx[""] = []
    texts = [r if isinstance(r, str) else "" for r in responses]
    resp_ids_all, resp_off_all = encode_texts(tok, texts, offsets=True) if n else ([], [])

    ids_chunks, pos_chunks, pid_chunks, off_chunks = [], [], [], []
    lens = np.zeros(n, np.int64)
    rs = np.zeros(n, np.int64)
    for i in range(n):
        response = responses[i]
        try:
            if not isinstance(prompts[i], str) or not isinstance(response, str):
                raise ValueError("prompt and response must be str")
            pre = prefix_ids[i]
            suffix_ids = list(sfx[suffixes[i] or ""])
            if not pre:
                raise ValueError("the templated prompt encodes to no tokens")
            if response:
                resp_ids = np.asarray(resp_ids_all[i], dtype=np.int32)
                raw = np.asarray(resp_off_all[i], np.int32).reshape(-1, 2)
                resp_off = chat.canonical_offsets(raw, response)
            else:
                resp_ids, resp_off = np.zeros(0, np.int32), np.zeros((0, 2), np.int32)
            eot = chat.end_of_turn_id(tok, suffix_ids)
            if not suffix_ids:
                suffix_ids = [eot]
            P = len(pre)
            resp_ids, resp_off, suffix_ids = chat.truncate(P, resp_ids, resp_off, suffix_ids, max_length)
            n_resp = len(resp_ids)
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
    return EncodedBatch(input_ids=_cat(ids_chunks, (0,)), ids_off=np.concatenate([[0], np.cumsum(lens)]),
                        pred_pos=_cat(pos_chunks, (0,)), pred_ids=_cat(pid_chunks, (0,)),
                        pred_offsets=_cat(off_chunks, (0, 2)), pred_off=np.concatenate([[0], np.cumsum(rs)]))


@dataclass
class ProcessedShard:
    """The examples of one shard that this rank keeps, ready to collate (S = sum of predicted tokens).

    enc: EncodedBatch of the kept examples; teacher_ids [T, S, K] int32 (-1 = no aligned teacher
    token), teacher_logprobs [T, S, K] float16, teacher_weights [T, S] float32; row_index [rows of the
    shard] int64: example index of each shard row, -1 = not on this rank or dropped; example_ids list[str];
    mode: config.MODE_ID of the shard's mode (0 infer, 1 train).
    """

    enc: EncodedBatch
    teacher_ids: np.ndarray
    teacher_logprobs: np.ndarray
    teacher_weights: np.ndarray
    row_index: np.ndarray
    example_ids: list
    mode: int


def empty_batch(n_teachers: int, B: int, L: int, k: int, pad_id: int) -> dict:
    """The arrays of a [B, L] batch with nothing placed: input_ids pad_id, attention_mask 0, labels -100,
    teacher_ids -1, teacher_logprobs -inf, teacher_weights 0, mode 0."""
    return {"input_ids": np.full((B, L), pad_id, np.int64), "attention_mask": np.zeros((B, L), np.int64),
            "labels": np.full((B, L), IGNORE_INDEX, np.int64),
            "teacher_ids": np.full((n_teachers, B, L, k), -1, np.int32),
            "teacher_logprobs": np.full((n_teachers, B, L, k), -np.inf, np.float16),
            "teacher_weights": np.zeros((n_teachers, B, L), np.float32), "mode": np.zeros(B, np.int64)}


def place(arrays: dict, b: int, at: int, sh: ProcessedShard, i: int) -> int:
    """Write example i of `sh` into row b of `arrays` (empty_batch) from column `at`: its tokens, mask,
    labels and teacher targets at its predicted positions, the row's mode. Returns its token count."""
    e = sh.enc
    a, z = e.ids_off[i], e.ids_off[i + 1]
    n = int(z - a)
    arrays["input_ids"][b, at:at + n] = e.input_ids[a:z]
    arrays["attention_mask"][b, at:at + n] = 1
    a, z = e.pred_off[i], e.pred_off[i + 1]
    pos = at + e.pred_pos[a:z]
    arrays["labels"][b, pos] = e.pred_ids[a:z]
    arrays["teacher_ids"][:, b, pos] = sh.teacher_ids[:, a:z]
    arrays["teacher_logprobs"][:, b, pos] = sh.teacher_logprobs[:, a:z]
    arrays["teacher_weights"][:, b, pos] = sh.teacher_weights[:, a:z]
    arrays["mode"][b] = sh.mode
    return n


def collate(items: list[tuple[ProcessedShard, int]], *, n_teachers: int, k: int, pad_id: int,
            pad_to_multiple_of: int = 1) -> dict:
    """Pad examples into one batch (docs/contracts.md section 4).

    items: (shard, i) pairs, i an example index in the ProcessedShard `shard`. Returns input_ids /
    attention_mask / labels [B, L] int64, teacher_ids [T, B, L, K] int32, teacher_logprobs [T, B, L, K]
    float16, teacher_weights [T, B, L] float32, mode [B] int64, example_ids list[str], n_tokens int.
    L = longest example rounded up to pad_to_multiple_of.
    """
    lens = [int(sh.enc.ids_off[i + 1] - sh.enc.ids_off[i]) for sh, i in items]
    m = max(int(pad_to_multiple_of), 1)
    L = -(-max(lens, default=0) // m) * m
    arrays = empty_batch(n_teachers, len(items), L, k, pad_id)
    for b, (sh, i) in enumerate(items):
        place(arrays, b, 0, sh, i)
    out = {key: torch.from_numpy(v) for key, v in arrays.items()}
    out["example_ids"] = [sh.example_ids[i] for sh, i in items]
    out["n_tokens"] = int((arrays["labels"] != IGNORE_INDEX).sum())
    return out
