"""Synthetic-but-realistic teacher stores without running a teacher: for the loader and training tests and
bench/bench_loader.py (the loader measured without model forwards).

Real text (the shipped WordNet corpus plus multilingual / digit / whitespace / emoji responses that
split differently in every tokenizer), real tokenizers, the real chat encoding (chat.encode_example, as
`profuser teach` does) and the store's own writer (store.TeacherShard.to_table, write_table_atomic,
manifests). Only the top-k distributions are random: ids uniform over the teacher vocabulary with the
true token on top most of the time, log-probs descending, scaled per (source, example) so every source
wins MinCE sometimes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import models, store
from ..passes.prepare import shipped_corpus
from ..text import chat
from ..text.align import tokenizer_hash

EXTRA = [
    "Tokyo (東京) is the capital of Japan; Kyōto was the old one.",
    "Café au lait costs €3.50 — or 12345 yen at 9:30 a.m.",
    "Use `x = [i**2 for i in range(10)]`  to square\tthe numbers.\nThen print(x).",
    "Ünïcödé, naïve façade, jalapeño 🌶️ and a smile 😀!",
    "  Leading and trailing spaces, and    runs of spaces.  ",
    "Numbers: 3.14159, 2,718, 1e-9 and 0x1F; dates like 2024-05-17.",
    "Привет, мир! Ελληνικά και العربية مع English.",
    "",
]


def corpus(n: int, *, extra_every: int = 4, system_every: int = 7, history_every: int = 0) -> list[dict]:
    """n examples {example_id, prompt, response, system, history} from the shipped corpus, every
    `extra_every`-th response replaced by a tricky one, every `system_every`-th given a system prompt and
    every `history_every`-th made the second turn of a conversation (history: the previous row's exchange)."""
    rows = []
    with open(shipped_corpus()) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    while len(rows) < n:  # more than the corpus: cycle with new ids
        r = dict(rows[len(rows) % 3000])
        r["id"] = f"{r['id']}-{len(rows)}"
        rows.append(r)
    out = []
    for i, r in enumerate(rows):
        tricky = extra_every and i % extra_every == 1
        resp = EXTRA[(i // extra_every) % len(EXTRA)] if tricky else r["response"]
        multi = history_every and i % history_every == 2
        out.append({"example_id": r["id"], "prompt": r["prompt"], "response": resp,
                    "system": "You are terse." if system_every and i % system_every == 3 else None,
                    "history": [{"role": "user", "content": rows[i - 1]["prompt"]},
                                {"role": "assistant", "content": rows[i - 1]["response"]}] if multi else None})
    return out


def write_prepared(data_dir, examples: list[dict], shard_size: int,
                   fingerprint: str = "fp-test") -> store.PreparedManifest:
    store.prepared_dir(data_dir).mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(examples) // shard_size)
    pm = store.PreparedManifest(fingerprint=fingerprint, n_examples=len(examples), shard_size=shard_size,
                                n_shards=n_shards)
    for j in range(n_shards):
        part = examples[j * shard_size:(j + 1) * shard_size]
        pm.shards.append(store.write_prepared_shard(data_dir, j, pa.Table.from_pylist(part,
                                                                                      schema=store.PREPARED_SCHEMA)))
    pm.save(data_dir)
    return pm


def records(tok, examples: list[dict], responses: list[str], k: int, rng: np.random.Generator,
            true_top: float = 0.7) -> store.TeacherShard:
    """Teacher records of `examples` with the given responses: real predicted tokens, random top-k."""
    offs, tids, tlps, kids, klps, nb = [], [], [], [], [], []
    V = len(tok)
    for ex, resp in zip(examples, responses):
        enc = chat.encode_example(tok, ex["prompt"], resp, system=ex["system"], history=ex.get("history"))
        R = enc.pred_ids.shape[0]
        scale = rng.uniform(0.3, 3.0)  # per (source, example): spreads the MinCE winners
        lp = -np.cumsum(rng.exponential(scale, (R, k)), axis=1)  # descending, all < 0
        lp -= np.log(np.exp(lp).sum(1, keepdims=True) + 0.05)  # the top-k of one distribution: sum < 1
        ids = rng.integers(0, V, (R, k))
        top = rng.random(R) < true_top
        ids[top, 0] = enc.pred_ids[top]
        tok_lp = np.where(top, lp[:, 0], lp[:, -1] - rng.exponential(scale, R))
        offs.append(enc.pred_offsets)
        tids.append(enc.pred_ids)
        tlps.append(tok_lp)
        kids.append(ids)
        klps.append(lp)
        nb.append(chat.predicted_bytes(resp, enc.pred_offsets))
    lens = [t.shape[0] for t in tids]
    return store.TeacherShard(
        example_ids=[e["example_id"] for e in examples], responses=list(responses),
        prompt_shas=[store.prompt_fingerprint(e["prompt"], e["system"], e.get("history")) for e in examples],
        tok_off=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        offsets=np.concatenate(offs).astype(np.int32), token_ids=np.concatenate(tids).astype(np.int32),
        token_logprobs=np.concatenate(tlps).astype(np.float32),
        topk_ids=np.concatenate(kids).astype(np.int32),
        topk_logprobs=np.concatenate(klps).astype(np.float32), n_bytes=np.asarray(nb, np.int32))


def write_teacher(data_dir, source: str, mode: str, tok, model: str, examples: list[dict],
                  pm: store.PreparedManifest, *, k: int = 8, seed: int = 0,
                  responses: list[str] | None = None, mutate=None, true_top: float = 0.7,
                  edit=None) -> store.TeacherManifest:
    """Write every shard of one (source, mode) store. mutate(j, table) -> table lets tests corrupt data;
    edit(shard: TeacherShard) edits the records in place before they are written (e.g. chosen candidates);
    true_top: share of positions whose first top-k slot is the realised token."""
    d = store.teacher_dir(data_dir, source, mode)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    responses = responses if responses is not None else [e["response"] for e in examples]
    try:  # a model name that is no alias and no folder (a test's stand-in) has no fingerprint
        fingerprint = models.model_fingerprint(model)
    except ValueError:
        fingerprint = None
    m = store.TeacherManifest(source=source, model=model, mode=mode, tokenizer_hash=tokenizer_hash(tok),
                              vocab_size=len(tok), k=k, prepared_fingerprint=pm.fingerprint,
                              shard_size=pm.shard_size, n_shards=pm.n_shards, model_fingerprint=fingerprint)
    for j in range(pm.n_shards):
        a, z = j * pm.shard_size, min((j + 1) * pm.shard_size, len(examples))
        rb = records(tok, examples[a:z], responses[a:z], k, rng, true_top=true_top)
        if edit is not None:
            edit(rb)
        table = rb.to_table()
        if mutate is not None:
            table = mutate(j, table)
        info = store.write_table_atomic(table, d / store.shard_name(j))
        m.completed[str(j)] = {"file": store.shard_name(j), "rows": z - a, "tokens": int(rb.tok_off[-1]),
                               "bytes": info.bytes, "sha256": info.sha256, "counters": {"n_rows": z - a}}
    m.save(data_dir)
    return m


def write_votes(data_dir, example_ids: list[str], winners: list[str]) -> Path:
    return store.write_votes(data_dir, example_ids, winners, [{w: 1} for w in winners], [{}] * len(winners))


def infer_response(source: str, example: dict) -> str:
    """A different 'generated' response per source (so tests can see whose response the loader used)."""
    words = example["response"].split(" ")
    return f"{source} says: " + " ".join(reversed(words))
