"""Streaming loader: prepared set + student tokenization + every source's stored top-k -> padded batches.

Data flow for one shard j (docs/contracts.md sections 3 and 4). Shard j of the prepared set and of every
source store cover the same rows in the same order, so a shard is the unit of work:

    prepared/part-j        example_id, prompt, response, system
    teachers/<t>/<mode>/part-j   per row: the teacher's predicted tokens (offsets, ids, logprobs, top-k)
         |  check example_id equality (error names file and row), offsets, counts, NaN (error or drop)
         v
    student encoding       collate.StudentEncoder: chat template, response-only predicted positions
         v
    alignment              align.align_offsets(student pred_offsets, teacher pred_offsets) per example and
                           teacher -> global teacher token index per student predicted token (-1 = none);
                           identity for a source with the student's tokenizer and the same tokens
         v
    gather + weights       one fancy index per teacher into the flat [sum R, K] top-k arrays; advantage
                           weights (loader/advantage.py) per example or per token
         v
    ProcessedShard         flat arrays (collate.py); collate.collate pads any of its examples into a batch

Ids stay teacher ids (the loss maps them with `loader.vocab_maps`, built once per teacher).

Order, sharding, resume. An epoch's order is a pure function of (seed, epoch, rank, world_size) and the
manifests: the rank's shards are permuted, their rows streamed through a shuffle buffer (the classic
reservoir: a full buffer emits a uniformly chosen slot that the next row refills), all on integer keys
(shard, row) before any data is read. Ranks: when n_shards % world_size == 0 rank r takes shards
j % W == r (it reads only those); otherwise every rank reads every shard and keeps the rows whose global
index k = j * shard_size + row has k % W == r. Either way every example is on exactly one rank.
`state_dict()` is {epoch, consumed keys}; resuming recomputes the order and continues at the same key,
so the following batches are identical. A shard is processed when its first key comes up and freed after
its last one, so memory is bounded by the buffer span, not by the dataset.

`iter(loader)` yields the rest of the current epoch, then advances to the next epoch (new order).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .. import store
from ..config import MODE_ID, MODES, DataConfig, check_section
from ..models import load_tokenizer, pad_id
from ..text.align import align_mined, align_offsets_batch, build_vocab_map, token_strings, tokenizer_hash
from ..text.vocab_map import vocab_info as _vocab_info
from . import collate as _collate
from . import packing, spans
from .advantage import example_metric, position_weights, tie_priority

DataError = store.StoreError  # bad or inconsistent input data; the message names the file (and row)


# ---------------------------------------------------------------------------------------------------------
# processed shards and the epoch order
# ---------------------------------------------------------------------------------------------------------


def buffer_shuffle(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Permutation [n] of a stream of n items through a shuffle buffer of `size` slots.

    The first `size` items fill the buffer; each later item replaces a uniformly chosen slot whose item
    is emitted; the buffer is emitted in random order at the end. An item moves at most ~size places
    earlier, so readers only need the shards spanned by the buffer.
    """
    if size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size = min(size, n)
    buf = list(range(size))
    picks = rng.integers(0, size, n - size).tolist()
    out = []
    for i, j in zip(range(size, n), picks):
        out.append(buf[j])
        buf[j] = i
    tail = np.asarray(buf, dtype=np.int64)[rng.permutation(size)]
    return np.concatenate([np.asarray(out, dtype=np.int64), tail])


# ---------------------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------------------


class FusionLoader:
    """Iterate padded fusion batches (docs/contracts.md section 4) from a prepared set and teacher stores.

    Args:
        cfg: config.DataConfig, the `data` section of training (data_dir / infer_data_dir, sources, k,
            max_length, micro_batch_size, advantage, ce_metric, shuffle_buffer, vocab_map, bad_row_policy, ...);
            its choices and ranges are checked here too (config.check_section).
        tokenizer: the student's tokenizer (fast, with its chat template).
        student: the student's model spec; a source whose manifest model equals it and whose tokenizer hash
            equals the student tokenizer's is "the student itself" (see data.student_as_candidate).
        mode: "train" (gold responses, every source teaches) | "infer" (the vote winner's response, only the
            winner teaches); the stores are read from cfg.store_dir(mode).
        seed: the epoch order's seed (training's top-level `seed`).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        teacher_tokenizers: optional {source: tokenizer}; otherwise loaded from the manifest's model with
            profuser.engine.models.load_tokenizer when needed (vocab maps, "mined" alignment). Either way a
            tokenizer whose hash differs from the manifest's tokenizer_hash is an error.
        source_models: optional {source: model spec}; the manifest's model must equal it and its tokenizer
            must hash to the manifest's tokenizer_hash.
    Attributes:
        source_names: list[str] [T]; k: K; vocab_maps: list[torch.IntTensor [V_t] | None] [T];
        is_student [T] / candidates [T]: bool arrays; stats: counters (examples, dropped_bad, dropped_long).
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, student: str, mode: str = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, teacher_tokenizers: dict | None = None,
                 source_models: dict[str, str] | None = None):
        check_section(cfg, "data")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, int(rank), int(world_size)
        self.student, self.mode, self.seed, self.source_models = student, mode, int(seed), dict(source_models or {})
        root = self.root = cfg.store_dir(mode)[1]
        self.prepared = store.PreparedManifest.load(root)
        self.n_shards, self.shard_size = self.prepared.n_shards, self.prepared.shard_size
        self._rows = np.array([self.prepared.shard_rows(j) for j in range(self.n_shards)], dtype=np.int64)
        self.source_names = list(cfg.sources)
        self.stores = [self._open_store(name) for name in self.source_names]
        self.manifests = [st.manifest for st in self.stores]
        stored_k = [m.k for m in self.manifests]
        self.k = int(cfg.k) if cfg.k is not None else min(stored_k)
        for st, kt in zip(self.stores, stored_k):
            if self.k > kt:
                raise DataError(f"{st.manifest_path}: stores k={kt} but data.k={self.k}")

        self._student_hash = tokenizer_hash(tokenizer)
        self.is_student = np.array([m.tokenizer_hash == self._student_hash and m.is_model(student)
                                    for m in self.manifests], dtype=bool)
        self.candidates = ~self.is_student | bool(cfg.student_as_candidate)
        if not self.candidates.any():
            raise ValueError(f"no candidate teacher: every source in {self.source_names} is the student "
                             f"{student!r} and data.student_as_candidate is False")
        self.priority = tie_priority(self.is_student)
        self._teacher_toks = {}
        for what, names in (("teacher_tokenizers", teacher_tokenizers), ("source_models", self.source_models)):
            unknown = sorted(set(names or {}) - set(self.source_names))
            if unknown:
                raise ValueError(f"{what} names {unknown}, which are not in sources {self.source_names}")
        for name, tok in (teacher_tokenizers or {}).items():
            self._set_teacher_tok(self.source_names.index(name), tok)
        for name in self.source_models:  # a configured model: check its tokenizer against the store now
            self.teacher_tokenizer(self.source_names.index(name))
        self._votes = self._read_votes(root) if mode == "infer" else None
        self._vocab_maps = self._extended = None
        self._encoder = _collate.StudentEncoder(tokenizer)
        self._order_cache = None
        self._validated: dict = {}  # (path, mtime_ns, size, gold) -> invalid rows found by the store validator
        self.epoch, self._consumed = 0, 0
        self.stats = {"examples": 0, "dropped_bad": 0, "dropped_long": 0}

    # ---- manifests, votes, tokenizers ---------------------------------------------------------------

    def _open_store(self, name: str) -> store.TeacherStore:
        st = store.TeacherStore(self.root, name, self.mode, prepared=self.prepared)
        configured = self.source_models.get(name)
        if configured is not None and not st.manifest.is_model(configured):
            raise DataError(f"{st.manifest_path}: model is {st.manifest.model!r} but source_models "
                            f"names {configured!r} (another model)")
        return st

    def _set_teacher_tok(self, t: int, tok):
        self.manifests[t].check(self.stores[t].manifest_path, tokenizer_hash=tokenizer_hash(tok))
        self._teacher_toks[t] = tok

    def teacher_tokenizer(self, t: int):
        """Source t's tokenizer (loaded from its configured or manifest model, hash-checked)."""
        if t not in self._teacher_toks:
            name = self.source_names[t]
            spec = self.source_models.get(name, self.manifests[t].model)
            self._set_teacher_tok(t, load_tokenizer(spec))
        return self._teacher_toks[t]

    def _read_votes(self, root: Path) -> dict:
        """{example_id: source index} of the vote winners (store.read_votes)."""
        index = {name: t for t, name in enumerate(self.source_names)}
        return {eid: index[w] for eid, w in store.read_votes(root, self.source_names).items()}

    @property
    def base_vocab_maps(self) -> list:
        """[T] torch.int32 [V_t] teacher id -> student id (-1 = none); None = the student's vocabulary."""
        if self._vocab_maps is None:
            maps = []
            for t, m in enumerate(self.manifests):
                if m.tokenizer_hash == self._student_hash:
                    maps.append(None)
                    continue
                vm = build_vocab_map(self.teacher_tokenizer(t), self.tokenizer,
                                     method=self.cfg.vocab_map, teacher_size=int(m.vocab_size))
                maps.append(torch.from_numpy(np.ascontiguousarray(vm, dtype=np.int32)))
            self._vocab_maps = maps
        return self._vocab_maps

    @property
    def vocab_maps(self) -> list:
        """What the loss maps teacher ids with: base_vocab_maps, and under span_rule "chain" each extended by an
        identity block [V_t + V_s] (entry V_t + s = s: the chain-rule targets, loader/spans.py)."""
        if self.cfg.span_rule != "chain":
            return self.base_vocab_maps
        if self._extended is None:
            size = _vocab_info(self.tokenizer).size
            self._student_fallback = np.asarray(_vocab_info(self.tokenizer).byte_fallback, bool)
            self._extended = [None if vm is None else torch.from_numpy(spans.extend_map(vm.numpy(), size))
                              for vm in self.base_vocab_maps]
        return self._extended

    def input_digests(self) -> dict[str, str]:
        """What this loader trains on, one short digest per part: the prepared set, each source's store
        (TeacherManifest.identity), the vote (inference mode) and each vocabulary map. Checkpoints record them;
        a resume against other data names the part that changed."""
        def digest(obj) -> str:
            return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

        mode = self.mode
        out = {f"{mode}: prepared set": digest([self.prepared.fingerprint, self.prepared.shards])}
        for name, m, vm in zip(self.source_names, self.manifests, self.base_vocab_maps):
            out[f"{mode}: teachers/{name}/{mode}"] = digest(m.identity())
            out[f"vocabulary map of {name}"] = "the student's" if vm is None else \
                hashlib.sha256(vm.numpy().tobytes()).hexdigest()[:16]
        if self._votes is not None:
            out["infer: scores/votes"] = digest(sorted(self._votes.items()))
        return out

    # ---- order and state ----------------------------------------------------------------------------

    def _rank_rows(self, j: int) -> np.ndarray:
        """Rows of shard j that belong to this rank (all of them under shard-level sharding)."""
        W = self.world_size
        if self.n_shards % W == 0:
            return np.arange(self._rows[j]) if j % W == self.rank else np.zeros(0, np.int64)
        first = (self.rank - j * self.shard_size) % W
        return np.arange(first, self._rows[j], W, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[M, 2] int64 (shard, row) keys of this rank in the order of `epoch`; no data is read."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        shards = np.arange(self.n_shards, dtype=np.int64)
        if self.n_shards % self.world_size == 0:
            shards = shards[shards % self.world_size == self.rank]
        shuffle = self.cfg.shuffle_buffer > 1
        rng = np.random.default_rng([abs(int(self.seed)), int(epoch)])
        if shuffle:
            shards = rng.permutation(shards)
        parts = [np.stack([np.full(r.shape, j), r], 1) for j in shards for r in [self._rank_rows(int(j))]]
        keys = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        order = keys[buffer_shuffle(len(keys), self.cfg.shuffle_buffer if shuffle else 1, rng)]
        self._order_cache = (epoch, order)
        return order

    def __len__(self) -> int:
        """Batches per epoch on this rank (an upper bound when rows are dropped; with data.micro_batch_tokens the
        count of micro_batch_size batches, an estimate: the budget's batches are known only when read)."""
        n = len(self.epoch_order(0))
        return n // self.cfg.micro_batch_size if self.cfg.drop_last else math.ceil(n / self.cfg.micro_batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self._consumed, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "fingerprint": self.prepared.fingerprint,
                "stats": dict(self.stats)}

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (("seed", self.seed), ("world_size", self.world_size), ("rank", self.rank),
                          ("fingerprint", self.prepared.fingerprint)):
            if key in sd and sd[key] != mine:
                raise ValueError(f"loader state has {key}={sd[key]!r} but this loader has {mine!r}: "
                                 f"cannot resume the same order")
        self.epoch, self._consumed = int(sd["epoch"]), int(sd["consumed"])
        self.stats.update(sd.get("stats", {}))

    # ---- iteration ----------------------------------------------------------------------------------

    def __iter__(self):
        epoch, order = self.epoch, self.epoch_order(self.epoch)
        rev_shards, rev_first = np.unique(order[::-1, 0], return_index=True)
        last = dict(zip(rev_shards.tolist(), (len(order) - 1 - rev_first).tolist()))  # shard -> last position
        cache: dict[int, _collate.ProcessedShard] = {}
        batch, tokens, pos = [], 0, self._consumed
        B, budget = self.cfg.micro_batch_size, self.cfg.micro_batch_tokens
        while pos < len(order):
            j, row = int(order[pos, 0]), int(order[pos, 1])
            sh = cache.get(j)
            if sh is None:
                sh = cache[j] = self._process(j)
            i = int(sh.row_index[row])
            if i >= 0:
                n = int(sh.enc.ids_off[i + 1] - sh.enc.ids_off[i])
                if budget and batch and tokens + n > budget:  # a token budget: this example opens the next
                    out = self._collate(batch)
                    batch, tokens = [], 0
                    self._consumed = pos  # a resume re-reads this example first
                    yield out
                batch.append((sh, i))
                tokens += n
            if last[j] == pos:
                del cache[j]
            pos += 1
            if not budget and len(batch) == B:
                out = self._collate(batch)
                batch = []
                self._consumed = pos
                yield out
        if batch and not self.cfg.drop_last:
            out = self._collate(batch)
            self._consumed = pos
            yield out
        self.epoch, self._consumed = epoch + 1, 0

    def _collate(self, items) -> dict:
        self.stats["examples"] += len(items)
        args = dict(n_teachers=len(self.source_names), k=self.k, pad_id=pad_id(self.tokenizer),
                    pad_to_multiple_of=self.cfg.pad_to_multiple_of)
        if self.cfg.packing:
            return packing.collate_packed(items, row_tokens=self.cfg.max_tokens_per_row or self.cfg.max_length,
                                          **args)
        return _collate.collate(items, **args)

    # ---- one shard ----------------------------------------------------------------------------------

    def _process(self, j: int) -> _collate.ProcessedShard:
        cfg, T, K = self.cfg, len(self.source_names), self.k
        infer = self.mode == "infer"
        prep_path = store.prepared_dir(self.root) / store.shard_name(j)
        prep = store.read_prepared_shard(self.root, j, self.prepared)
        n = int(self._rows[j])
        pids = prep["example_id"].combine_chunks()
        recs = [st.shard(j, prep, validated=self._validated) for st in self.stores]

        sel = self._rank_rows(j)
        eids = pids.take(pa.array(sel)).to_pylist()
        if infer:
            winners = np.array([self._votes.get(e, -1) for e in eids], dtype=np.int64)
            if (winners < 0).any():
                e = eids[int(np.nonzero(winners < 0)[0][0])]
                votes = store.scores_dir(self.root) / "votes.parquet"
                raise DataError(f"{votes}: no vote for example {e!r}")
            use = np.arange(T)[:, None] == winners[None]                 # [T, n_sel] records in use
        else:
            winners = None
            use = np.ones((T, len(sel)), bool)
        bad = np.zeros(len(sel), bool)
        for t in range(T):
            bad |= use[t] & recs[t].invalid[sel]
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            t = int(np.nonzero(use[:, i] & np.array([r.invalid[sel[i]] for r in recs]))[0][0])
            why = f"{recs[t].path}: row {sel[i]} (example_id {eids[i]!r}): {recs[t].problem(int(sel[i]))}"
            if cfg.bad_row_policy == "error":
                raise DataError(f"{why} (bad_row_policy='drop' skips such rows)")
            self.stats["dropped_bad"] += int(bad.sum())
            warnings.warn(f"shard {j}: dropped {int(bad.sum())} example(s) with invalid teacher rows (first: "
                          f"{why}); {self.stats['dropped_bad']} so far", stacklevel=3)
            keep = ~bad
            sel, use, eids = sel[keep], use[:, keep], [e for e, k_ in zip(eids, keep) if k_]
            winners = winners[keep] if winners is not None else None

        idx = pa.array(sel)
        prompts = prep["prompt"].combine_chunks().take(idx).to_pylist()
        systems = prep["system"].combine_chunks().take(idx).to_pylist()
        histories = prep["history"].combine_chunks().take(idx).to_pylist()
        if infer:
            resp = [r.responses.take(idx).to_pylist() for r in recs]
            responses = [resp[w][i] for i, w in enumerate(winners.tolist())]
        else:
            responses = prep["response"].combine_chunks().take(idx).to_pylist()
        errors = []
        enc = self._encoder.encode_batch(prompts, responses, systems, max_length=cfg.max_length,
                                         errors=errors, histories=histories)
        ok = np.ones(len(sel), bool)
        for i, msg in errors:
            if "max_length" not in msg:
                where = recs[int(winners[i])].path if infer else prep_path
                raise DataError(f"{where}: row {sel[i]} (example_id {eids[i]!r}): cannot encode for the "
                                f"student: {msg}")
            ok[i] = False
        if not ok.all():
            self.stats["dropped_long"] += int((~ok).sum())
            warnings.warn(f"shard {j}: dropped {int((~ok).sum())} example(s) whose templated prompt exceeds "
                          f"data.max_length={cfg.max_length}; {self.stats['dropped_long']} so far", stacklevel=3)

        G = self._align(enc, recs, sel, use)                             # [T, S] global teacher token, -1
        S = G.shape[1]
        tids = np.full((T, S, K), -1, np.int32)
        tlps = np.full((T, S, K), -np.inf, np.float16)
        own_lp = np.full((T, S), np.nan)                                  # the teacher's log-prob of its token
        # [S] the student's token stands for its whole span (loader/spans.py); once per shard, for every teacher
        complete = spans.complete_tokens(enc.pred_offsets, enc.pred_off) if cfg.span_rule == "chain" else None
        for t, rec in enumerate(recs):
            hit = np.nonzero(G[t] >= 0)[0]
            if hit.size:
                g = G[t, hit]
                tids[t, hit] = rec.topk_ids[g, :K]
                tlps[t, hit] = rec.topk_logprobs[g, :K]
                own_lp[t, hit] = rec.token_logprobs[g]
            if complete is not None:
                self._chain(t, tids[t], tlps[t], own_lp[t], G[t], enc, rec, complete)
        tw = self._weights(enc, recs, sel, G, own_lp, winners)
        row_index = np.full(n, -1, np.int64)
        row_index[sel[ok]] = np.nonzero(ok)[0]
        return _collate.ProcessedShard(enc=enc, teacher_ids=tids, teacher_logprobs=tlps, teacher_weights=tw,
                                       row_index=row_index, example_ids=eids, mode=MODE_ID[self.mode])

    def _align(self, enc, recs, sel, use) -> np.ndarray:
        """[T, S] int64: global token index (into the teacher's flat arrays) aligned to each student
        predicted token, -1 where none. use [T, n_sel] says which (teacher, example) records to align.

        A source with the student's tokenizer (same tokenizer_hash) whose predicted ids equal the student's
        is aligned by identity: same text, same tokens, so row r predicts what the student predicts at r,
        byte pieces of a multi-byte character included (offsets alignment skips those by design).
        Everything else goes through align.align_offsets (or align_mined)."""
        T, S = len(recs), int(enc.pred_off[-1])
        G = np.full((T, S), -1, np.int64)
        po = enc.pred_off
        for t, rec in enumerate(recs):
            ex = [i for i in np.nonzero(use[t])[0].tolist() if po[i + 1] > po[i]]
            if self.manifests[t].tokenizer_hash == self._student_hash:
                rest = []
                for i in ex:
                    a, z = int(rec.tok_off[sel[i]]), int(rec.tok_off[sel[i] + 1])
                    n = po[i + 1] - po[i]
                    if n <= z - a and np.array_equal(rec.token_ids[a:a + n], enc.pred_ids[po[i]:po[i + 1]]):
                        G[t, po[i]:po[i + 1]] = np.arange(a, a + n)
                    else:
                        rest.append(i)
                ex = rest
            rows = sel[ex] if ex else np.zeros(0, np.int64)
            ta, tz = rec.tok_off[rows], rec.tok_off[rows + 1]
            if self.cfg.align_method == "offsets":        # one call into the C++ extension per teacher
                found = align_offsets_batch([enc.pred_offsets[po[i]:po[i + 1]] for i in ex],
                                            [rec.offsets[a:z] for a, z in zip(ta.tolist(), tz.tolist())])
            else:
                ttok = self.teacher_tokenizer(t)
                found = [align_mined(token_strings(self.tokenizer, enc.pred_ids[po[i]:po[i + 1]]),
                                     token_strings(ttok, rec.token_ids[a:z]), seq_index=int(row))
                         for i, a, z, row in zip(ex, ta.tolist(), tz.tolist(), rows.tolist())]
            for i, a, r in zip(ex, ta.tolist(), found):
                r = np.asarray(r, dtype=np.int64)
                G[t, po[i]:po[i + 1]] = np.where(r >= 0, r + a, -1)
        return G

    def _chain(self, t: int, tids, tlps, own_lp, G, enc, rec, complete) -> None:
        """span_rule "chain" for teacher t (loader/spans.py): chain-rule targets at spanning positions, then
        the byte-fallback guard; tids / tlps [S, K] and own_lp [S] edited in place."""
        base = None if self.base_vocab_maps[t] is None else len(self.base_vocab_maps[t])
        maps = self.vocab_maps  # builds the extended maps and the student's byte-fallback table once
        spans.chain_targets(tids, tlps, own_lp, G=G, student_span=enc.pred_offsets, student_ids=enc.pred_ids,
                            complete=complete, rec=rec, chain_base=base, stats=self.stats)
        if base is not None:
            spans.drop_fallback_targets(tids, tlps, vm=maps[t].numpy(), fallback=self._student_fallback,
                                        student_ids=enc.pred_ids, stats=self.stats)

    def _weights(self, enc, recs, sel, G, own_lp, winners) -> np.ndarray:
        """[T, S] float32 teacher weights at every student predicted token (0 where not aligned)."""
        cfg = self.cfg
        ex_of = np.repeat(np.arange(len(sel)), np.diff(enc.pred_off))
        metric = token_nll = None
        if winners is None and cfg.advantage_level == "example":
            def col(name):  # [T, n] per-example column of every teacher
                return np.stack([getattr(r, name)[sel] for r in recs])

            metric = example_metric(col("nll_sum"), col("n_tokens"), col("n_bytes"), cfg.ce_metric)
        elif winners is None:  # the chain rule's log-prob of the student's token at spanning positions
            token_nll = np.where(G >= 0, -own_lp, np.inf)
        return position_weights(G >= 0, ex_of, self.candidates, cfg.advantage, self.priority, metric=metric,
                                token_nll=token_nll, winners=winners)
