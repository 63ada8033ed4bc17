"""Teacher shards: one class writes them (teach, generate) and reads them (loader, score), with every value
checked against the text and the vocabulary before it can reach a gradient.

A row is invalid (TeacherShard.invalid, with a reason naming the row's problem) when any of these fails:
    prompt fingerprint   equals the prepared row's (system, prompt): the teacher saw this conversation
    gold response        equals the prepared row's (training mode)
    offsets              inside the response, starts non-decreasing
    n_bytes              == text.chat.predicted_bytes(response, offsets)
    ids                  token ids in [0, V_teacher), top-k ids in [-1, V_teacher)
    log-probs            finite and <= LOGPROB_TOL at non-empty top-k slots, descending (within the tolerance),
                         the token's own log-prob finite, <= LOGPROB_TOL and <= its row's top-1; the top-k
                         probabilities of a position sum to at most exp(TOPK_MASS_TOL) (~1.01)
    nll_sum              >= 0 and the sum of the stored token log-probs (within float16 rounding)
    NaN                  a row marked by teach/generate --nan-policy drop (nll_sum NaN)
Structural problems (columns, list lengths, rows of another prepared set) fail the whole shard. Readers
apply their policy to invalid rows: the loader's bad_row_policy (error naming file, row and example id,
or drop and count), `profuser score` excludes them from the vote.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from profuser.kernels.params import LOGPROB_TOL, TOPK_MASS_TOL

from ..text.chat import predicted_bytes_rows
from .files import StoreError, read_table, shard_name, verify_digest
from .manifests import PreparedManifest, TeacherManifest, prompt_fingerprint, read_prepared_shard

TEACHER_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("response", pa.string()),
    ("pred_offsets", pa.list_(pa.int32())),
    ("token_ids", pa.list_(pa.int32())),
    ("token_logprobs", pa.list_(pa.float16())),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_logprobs", pa.list_(pa.float16())),
    ("nll_sum", pa.float64()),
    ("n_tokens", pa.int32()),
    ("n_bytes", pa.int32()),
    ("prompt_sha", pa.string()),  # schema 2: store.prompt_fingerprint of the row's (system, prompt)
])


def _list_flat(col) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets [n + 1] int64, flat values) of a list column, without Python objects."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offs = arr.offsets.to_numpy().astype(np.int64)
    return offs - offs[0], arr.values.to_numpy(zero_copy_only=False)[offs[0]:offs[-1]]


def _pylist(x) -> list:
    return x.to_pylist() if isinstance(x, pa.Array) else list(x)


@dataclass
class TeacherShard:
    """One source's records for one shard (TEACHER_SCHEMA) as flat arrays; row i owns the tokens
    [tok_off[i], tok_off[i + 1]) of every per-token array.

    example_ids, responses, prompt_shas: list[str] or pa.StringArray [n] (prompt_shas None: schema 1);
    tok_off int64 [n + 1]; offsets int32 [sum R, 2]; token_ids int32 [sum R]; token_logprobs [sum R]
    (float32 when written, float16 when read); topk_ids int32 [sum R, K]; topk_logprobs [sum R, K]; n_bytes
    [n]; nll_sum float64 [n] (None: summed from the float32 token log-probs before they are rounded to
    float16 on write). path: where it was read; problems: {row: reason} found by `validate`.
    """

    example_ids: list | pa.Array
    responses: list | pa.Array
    tok_off: np.ndarray
    offsets: np.ndarray
    token_ids: np.ndarray
    token_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    n_bytes: np.ndarray
    prompt_shas: list | pa.Array | None = None
    nll_sum: np.ndarray | None = None
    path: Path | None = None
    problems: dict | None = None

    def __post_init__(self):
        if self.nll_sum is None:
            tlp = np.asarray(self.token_logprobs, np.float64)
            nll = np.zeros(self.n_rows)
            full = self.n_tokens > 0  # reduceat over the non-empty rows: each sums [start, next start)
            if full.any():
                nll[full] = -np.add.reduceat(tlp, self.tok_off[:-1][full])
            self.nll_sum = nll

    @property
    def n_rows(self) -> int:
        return len(self.tok_off) - 1

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1]) if self.topk_ids.ndim == 2 else 0

    @property
    def n_tokens(self) -> np.ndarray:
        return np.diff(self.tok_off)

    def to_table(self) -> pa.Table:
        """The Parquet table (TEACHER_SCHEMA); log-probs are stored as float16."""
        if self.prompt_shas is None:
            raise ValueError("TeacherShard.to_table: prompt_shas is required (store.prompt_fingerprint per row)")
        off = self.tok_off.astype(np.int32)

        def lst(values, per):
            return pa.ListArray.from_arrays(pa.array(off * per, pa.int32()), pa.array(values.reshape(-1)))

        return pa.Table.from_arrays([
            pa.array(self.example_ids, pa.string()), pa.array(self.responses, pa.string()),
            lst(self.offsets.astype(np.int32), 2), lst(self.token_ids.astype(np.int32), 1),
            lst(self.token_logprobs.astype(np.float16), 1), lst(self.topk_ids.astype(np.int32), self.k),
            lst(self.topk_logprobs.astype(np.float16), self.k), pa.array(self.nll_sum, pa.float64()),
            pa.array(self.n_tokens.astype(np.int32), pa.int32()), pa.array(self.n_bytes.astype(np.int32), pa.int32()),
            pa.array(self.prompt_shas, pa.string()),
        ], schema=TEACHER_SCHEMA)

    @classmethod
    def from_table(cls, t: pa.Table, path, k: int) -> "TeacherShard":
        """Flat arrays of a shard table, after the structural checks (columns, list lengths vs n_tokens and
        k); StoreError naming the file and row otherwise."""
        missing = [f.name for f in TEACHER_SCHEMA if f.name not in t.column_names and f.name != "prompt_sha"]
        if missing:
            raise StoreError(f"{path}: teacher shard lacks columns {missing}")
        tok_off, token_ids = _list_flat(t["token_ids"])
        R = np.diff(tok_off)
        n_tokens = t["n_tokens"].to_numpy()
        for i in np.nonzero(R != n_tokens)[0][:1]:
            raise StoreError(f"{path}: row {i}: n_tokens={n_tokens[i]} but token_ids has {R[i]} entries")
        flat = {}
        for name, per in (("pred_offsets", 2), ("token_logprobs", 1), ("topk_ids", k), ("topk_logprobs", k)):
            o, v = _list_flat(t[name])
            for i in np.nonzero(np.diff(o) != per * R)[0][:1]:
                raise StoreError(f"{path}: row {i}: {name} has {np.diff(o)[i]} entries, expected {per} x {R[i]}")
            flat[name] = v
        return cls(example_ids=t["example_id"].combine_chunks(), responses=t["response"].combine_chunks(),
                   tok_off=tok_off, offsets=flat["pred_offsets"].astype(np.int32, copy=False).reshape(-1, 2),
                   token_ids=token_ids.astype(np.int32, copy=False),
                   token_logprobs=flat["token_logprobs"].astype(np.float16, copy=False),
                   topk_ids=flat["topk_ids"].astype(np.int32, copy=False).reshape(-1, k),
                   topk_logprobs=flat["topk_logprobs"].astype(np.float16, copy=False).reshape(-1, k),
                   n_bytes=t["n_bytes"].to_numpy().astype(np.int64),
                   prompt_shas=t["prompt_sha"].combine_chunks() if "prompt_sha" in t.column_names else None,
                   nll_sum=t["nll_sum"].to_numpy(zero_copy_only=False).astype(np.float64), path=Path(path))

    # ---- value checks -------------------------------------------------------------------------------

    def validate(self, prepared: pa.Table | None = None, *, gold: bool = False,
                 vocab_size: int | None = None) -> dict:
        """Check every row (module header); returns and keeps {row: reason} of the invalid rows. Rows of
        another prepared set (count or example ids) raise StoreError naming the file: nothing aligns."""
        ids = _pylist(self.example_ids)
        if prepared is not None:
            if len(ids) != prepared.num_rows:
                raise StoreError(f"{self.path}: {len(ids)} rows but the prepared shard has {prepared.num_rows}")
            for i, (a, b) in enumerate(zip(ids, prepared["example_id"].to_pylist())):
                if a != b:
                    raise StoreError(f"{self.path}: row {i}: example_id {a!r} but the prepared shard has {b!r} "
                                     f"(store of another prepared set)")
        problems: dict[int, str] = {}

        def flag(rows, reason):
            for i in np.atleast_1d(rows).tolist():
                problems.setdefault(int(i), reason)

        responses = _pylist(self.responses)
        # offsets inside the response, starts non-decreasing within a row: per token, all rows at once
        lens = np.fromiter((len(r) for r in responses), np.int64, len(responses))
        row_of = np.repeat(np.arange(self.n_rows), self.n_tokens)
        o = self.offsets.astype(np.int64)
        off_bad = (o[:, 0] < 0) | (o[:, 1] < o[:, 0]) | (o[:, 1] > lens[row_of])
        off_bad[1:] |= (np.diff(o[:, 0]) < 0) & (row_of[1:] == row_of[:-1])
        bad_rows = np.zeros(self.n_rows, bool)
        bad_rows[row_of[off_bad]] = True
        for i in np.nonzero(bad_rows)[0].tolist():
            flag(i, f"pred_offsets do not fit its response of {lens[i]} characters")
        counted = predicted_bytes_rows(responses, np.where(off_bad[:, None], 0, o), self.tok_off)
        for i in np.nonzero((counted != self.n_bytes) & ~bad_rows)[0].tolist():
            flag(i, f"n_bytes={self.n_bytes[i]} but the predicted text has {counted[i]} bytes (end-of-turn included)")
        self._check_values(flag, vocab_size)
        if prepared is not None:  # the row against the conversation it claims to be about
            systems, prompts = prepared["system"].to_pylist(), prepared["prompt"].to_pylist()
            histories = prepared["history"].to_pylist() if "history" in prepared.column_names else [None] * len(prompts)
            if self.prompt_shas is not None:
                for i, (sha, p, s, h) in enumerate(zip(_pylist(self.prompt_shas), prompts, systems, histories)):
                    if sha != prompt_fingerprint(p, s, h):
                        flag(i, "its prompt fingerprint differs from the prepared row's (the prompt, system "
                                "prompt or an earlier turn was edited after this store was written)")
            if gold:
                for i, (a, b) in enumerate(zip(responses, prepared["response"].to_pylist())):
                    if a != b:
                        flag(i, "stored response differs from the prepared gold response")
        self.problems = problems
        return problems

    def _check_values(self, flag, vocab_size: int | None) -> None:
        row_of = np.repeat(np.arange(self.n_rows), self.n_tokens)
        nan_row = np.isnan(self.nll_sum)
        if nan_row.any():
            flag(np.nonzero(nan_row)[0], "NaN log-probabilities (marked by --nan-policy drop)")

        def tokens(mask, reason):
            if mask.any():
                flag(np.unique(row_of[np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]]), reason)

        V = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
        tokens((self.token_ids < 0) | (self.token_ids >= V), f"token id outside [0, {V})")
        tokens((self.topk_ids < -1) | (self.topk_ids >= V), f"top-k id outside [-1, {V})")
        lp = self.topk_logprobs.astype(np.float32)
        filled = self.topk_ids >= 0
        tokens(filled & ~np.isfinite(lp), "non-finite top-k log-probability")
        tokens(filled & (lp > LOGPROB_TOL), "positive top-k log-probability")
        if self.k > 1:
            both = filled[:, 1:] & filled[:, :-1]
            tokens(both & (np.diff(lp, axis=1) > LOGPROB_TOL), "top-k log-probabilities not descending")
        with np.errstate(over="ignore", invalid="ignore"):
            mass = np.where(filled & np.isfinite(lp), np.exp(np.minimum(lp, 80.0)), 0.0).sum(1)
        tokens(mass > np.exp(TOPK_MASS_TOL), "top-k probabilities sum above 1 (not log_softmax values)")
        tlp = self.token_logprobs.astype(np.float32)
        tokens(~np.isfinite(tlp), "non-finite token log-probability")
        tokens(tlp > LOGPROB_TOL, "positive token log-probability")
        if self.k:
            tokens(filled[:, 0] & (tlp > lp[:, 0] + LOGPROB_TOL), "token log-probability above its top-1")
        stored = np.zeros(self.n_rows)
        absum = np.zeros(self.n_rows)
        full = self.n_tokens > 0
        if full.any():
            t64 = tlp.astype(np.float64)
            stored[full] = -np.add.reduceat(t64, self.tok_off[:-1][full])
            absum[full] = np.add.reduceat(np.abs(t64), self.tok_off[:-1][full])
        off = ~nan_row & ((self.nll_sum < -LOGPROB_TOL)
                          | (np.abs(self.nll_sum - stored) > 2e-3 * absum + 1e-2) | ~np.isfinite(self.nll_sum))
        flag(np.nonzero(off & np.isfinite(stored))[0], "nll_sum is not the sum of its token log-probabilities")

    @functools.cached_property
    def invalid(self) -> np.ndarray:
        """bool [n]: rows with a problem (validate) or marked NaN."""
        bad = np.isnan(self.nll_sum)
        if self.problems:
            bad[list(self.problems)] = True
        return bad

    def problem(self, i: int) -> str:
        """Why row i is invalid."""
        return (self.problems or {}).get(i) or "NaN log-probabilities (marked by --nan-policy drop)"


def read_teacher_shard(path: Path, k: int, prepared: pa.Table | None, *, gold: bool, vocab_size: int | None = None,
                       sha256: str | None = None, validated: dict | None = None) -> TeacherShard:
    """The one reader of teacher shards: verify the digest (once per process), read with page checksums,
    check the structure, validate every value (TeacherShard.validate). Invalid rows are flagged, never
    dropped here: the reader's policy decides (in inference mode only the vote winner's rows matter).

    validated: {(path, mtime_ns, size, gold): problems} already found; an unchanged file is not re-checked
    in later epochs (the checks loop over rows in Python: about a third of a shard's first read).
    """
    if Path(path).is_file():
        verify_digest(path, sha256, what="teacher shard")
    shard = TeacherShard.from_table(read_table(path, what="teacher shard"), path, k)
    st = Path(path).stat()
    key = (str(path), st.st_mtime_ns, st.st_size, gold)
    if validated is not None and key in validated:
        shard.problems = validated[key]
    else:
        problems = shard.validate(prepared, gold=gold, vocab_size=vocab_size)
        if validated is not None:
            validated[key] = problems
    return shard


class TeacherStore:
    """One (source, mode) store opened for reading: its manifest checked against the prepared set (and the
    tokenizer / vocabulary / model the caller expects), every shard complete with the prepared row counts.

    store = TeacherStore(data_dir, "smollm2", "train")
    shard = store.shard(j, prepared_table)     # a validated TeacherShard
    """

    def __init__(self, data_dir, source: str, mode: str, *, prepared: PreparedManifest | None = None,
                 tokenizer_hash: str | None = None, vocab_size: int | None = None):
        self.data_dir, self.source, self.mode = Path(data_dir), source, mode
        self.prepared = prepared or PreparedManifest.load(data_dir)
        self.manifest_path = TeacherManifest.path(data_dir, source, mode)
        self.manifest = m = TeacherManifest.load(data_dir, source, mode)
        if (m.source, m.mode) != (source, mode):  # folders swapped or copied: another source's answers
            raise StoreError(f"{self.manifest_path}: holds the {m.mode}-mode store of source {m.source!r} "
                             f"(model {m.model!r}), but sits in the folder of source {source!r}, mode {mode!r}: "
                             "were teachers/<source>/<mode> folders swapped or copied? Move it back, or re-run "
                             "the pass for this source")
        m.check(self.manifest_path, prepared=self.prepared, tokenizer_hash=tokenizer_hash, vocab_size=vocab_size)
        missing = [j for j in range(m.n_shards) if str(j) not in m.completed]
        if missing:
            more = "..." if len(missing) > 10 else ""
            raise StoreError(f"{self.manifest_path}: shards {missing[:10]}{more} of {m.n_shards} are not completed "
                             f"(missing shard; run `profuser teach/generate` again to finish)")
        for j in range(m.n_shards):
            rows = int(m.completed[str(j)].get("rows", self.prepared.shard_rows(j)))
            if rows != self.prepared.shard_rows(j):
                raise StoreError(f"{self.manifest_path}: shard {j} has {rows} rows but the prepared shard has "
                                 f"{self.prepared.shard_rows(j)}")

    def shard_path(self, j: int) -> Path:
        return self.manifest_path.parent / shard_name(j)

    def shard(self, j: int, prepared: pa.Table | None = None, *, validated: dict | None = None) -> TeacherShard:
        """Shard j, validated against prepared shard j (read here when not given)."""
        if prepared is None:
            prepared = read_prepared_shard(self.data_dir, j, self.prepared)
        return read_teacher_shard(self.shard_path(j), self.manifest.k, prepared, gold=self.mode == "train",
                                  vocab_size=int(self.manifest.vocab_size),
                                  sha256=self.manifest.completed[str(j)].get("sha256"), validated=validated)
