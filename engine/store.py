"""The prepared set and the teacher store: Parquet shards, JSON manifests, atomic writes, validation.

Layout (docs/contracts.md section 3, docs/store_format.md):

    <data_dir>/prepared/manifest.json, part-00000.parquet ...          example_id, prompt, response, system
    <data_dir>/teachers/<source>/<mode>/manifest.json, part-*.parquet   one row per example (TEACHER_SCHEMA)
    <data_dir>/scores/<scorer>.parquet, scores/votes.parquet

Shard j of every (source, mode) covers exactly the rows of prepared shard j, in the same order, so a
shard is the unit of work, of resumption and of distribution (rank r of W owns shards j % W == r).

Atomicity. A shard is written to `part-0000j.parquet.tmp-<pid>` and `os.replace`d into place when
complete; the manifest (a JSON index of completed shards) is rewritten with the same tmp+replace under a
file lock, because several ranks complete shards of the same store concurrently. A killed run leaves at
most a tmp file (deleted on restart) and loses only the shard in progress. A shard file that exists but
is missing from the manifest (killed between the rename and the manifest update) is re-checked and
adopted rather than recomputed.

Bytes on disk. Per predicted token a record holds 2 offsets + 1 id + 1 log-prob + K ids + K log-probs:
8 + 4 + 2 + 6K bytes raw = 62 B at K=8. Parquet with zstd and BYTE_STREAM_SPLIT on the fixed-width list
values (splitting the bytes of int32/float16 into planes lets zstd see the near-constant high bytes of
ids and the shared exponents of log-probs) and no dictionary encoding on lists (ids rarely repeat within
a page) gets well under 40 B/token; measured figures are in the README
(section "Teacher passes and the store").
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MODES = ("train", "infer")
DEFAULT_SHARD_SIZE = 1024

PREPARED_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("prompt", pa.string()), ("response", pa.string()), ("system", pa.string()),
])
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
])
_LIST_COLUMNS = ("pred_offsets", "token_ids", "token_logprobs", "topk_ids", "topk_logprobs")


class StoreError(ValueError):
    """Missing, corrupt or inconsistent store data; the message names the file (and row)."""


@dataclass(frozen=True)
class WriteOptions:
    """Parquet writer settings (see the header for why these defaults)."""

    compression: str = "zstd"
    compression_level: int = 9
    byte_stream_split: bool = True
    row_group_size: int = 256


# ---------------------------------------------------------------------------------------------------------
# paths and atomic writes
# ---------------------------------------------------------------------------------------------------------


def shard_name(j: int) -> str:
    return f"part-{j:05d}.parquet"


def prepared_dir(data_dir) -> Path:
    return Path(data_dir) / "prepared"


def teacher_dir(data_dir, source: str, mode: str) -> Path:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not source or "/" in source or source.startswith("."):
        raise ValueError(f"source name {source!r} must be a plain folder name")
    return Path(data_dir) / "teachers" / source / mode


def scores_dir(data_dir) -> Path:
    return Path(data_dir) / "scores"


def owned_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards of rank `rank` among `world_size` processes: j % world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return list(range(rank, n_shards, world_size))


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, obj: dict) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_table_atomic(table: pa.Table, path: Path, opts: WriteOptions = WriteOptions()) -> int:
    """Write `table` as Parquet to tmp, fsync, rename to `path`. Returns the file size in bytes."""
    path = Path(path)
    encodings = {}
    if opts.byte_stream_split:
        for f in table.schema:
            is_list = pa.types.is_list(f.type)
            t = f.type.value_type if is_list else f.type
            if pa.types.is_float16(t) or pa.types.is_int32(t) or pa.types.is_float32(t):
                # the encoding applies to leaf columns: a list's values are "<name>.list.element"
                encodings[f"{f.name}.list.element" if is_list else f.name] = "BYTE_STREAM_SPLIT"
    tmp = _tmp_name(path)
    try:
        pq.write_table(table, tmp, compression=opts.compression, compression_level=opts.compression_level,
                       use_dictionary=[f.name for f in table.schema if f.name not in encodings
                                       and not pa.types.is_list(f.type)] or False,
                       column_encoding=encodings or None, row_group_size=opts.row_group_size,
                       write_statistics=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def remove_stale_tmp(folder: Path, shards: list[int] | None = None) -> int:
    """Delete tmp files left by killed runs (only those of `shards` when given). Returns the count."""
    n = 0
    names = [shard_name(j) for j in shards] if shards is not None else ["part-*.parquet"]
    for name in names:
        for p in glob.glob(str(folder / f"{name}.tmp-*")):
            Path(p).unlink(missing_ok=True)
            n += 1
    return n


def read_table(path: Path, columns=None, *, what: str = "shard") -> pa.Table:
    """Read a Parquet file; StoreError naming the file when it is missing or corrupt."""
    if not Path(path).is_file():
        raise StoreError(f"{path}: {what} file is missing")
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StoreError(f"{path}: corrupt or unreadable {what} ({type(exc).__name__}: {exc})") from exc


def read_json(path: Path, *, what: str = "manifest") -> dict:
    if not Path(path).is_file():
        raise StoreError(f"{path}: {what} not found")
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable {what} ({exc})") from exc
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: {what} is not a JSON object")
    return obj


# ---------------------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PreparedManifest:
    fingerprint: str
    n_examples: int
    shard_size: int
    n_shards: int
    sources: list = field(default_factory=list)  # input files: [{path, sha256, rows, skipped}]
    schema_version: int = SCHEMA_VERSION

    def shard_rows(self, j: int) -> int:
        if not 0 <= j < self.n_shards:
            raise IndexError(f"shard {j} out of range [0, {self.n_shards})")
        return min(self.shard_size, self.n_examples - j * self.shard_size)

    @classmethod
    def load(cls, data_dir) -> "PreparedManifest":
        path = prepared_dir(data_dir) / "manifest.json"
        obj = read_json(path, what="prepared manifest")
        _check_version(obj, path)
        try:
            m = cls(**{k: obj[k] for k in ("fingerprint", "n_examples", "shard_size", "n_shards")},
                    sources=obj.get("sources", []), schema_version=obj["schema_version"])
        except KeyError as exc:
            raise StoreError(f"{path}: prepared manifest lacks key {exc}") from exc
        if m.n_shards != -(-m.n_examples // m.shard_size):
            raise StoreError(f"{path}: n_shards={m.n_shards} does not match n_examples={m.n_examples} / "
                             f"shard_size={m.shard_size}")
        return m

    def save(self, data_dir) -> None:
        write_json_atomic(prepared_dir(data_dir) / "manifest.json", asdict(self))


def _check_version(obj: dict, path: Path) -> None:
    if obj.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {obj.get('schema_version')!r} is not {SCHEMA_VERSION} "
                         f"(written by another version of profuser)")


def read_prepared_shard(data_dir, j: int, manifest: PreparedManifest | None = None) -> pa.Table:
    """Prepared shard j, checked against the manifest's row count."""
    manifest = manifest or PreparedManifest.load(data_dir)
    path = prepared_dir(data_dir) / shard_name(j)
    t = read_table(path, what="prepared shard")
    if t.num_rows != manifest.shard_rows(j):
        raise StoreError(f"{path}: {t.num_rows} rows, the prepared manifest says {manifest.shard_rows(j)}")
    return t


@dataclass
class TeacherManifest:
    source: str
    model: str
    mode: str
    tokenizer_hash: str
    vocab_size: int
    k: int
    prepared_fingerprint: str
    shard_size: int
    n_shards: int
    completed: dict = field(default_factory=dict)  # "j" -> {file, rows, tokens, bytes}
    generation: dict | None = None
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def path(data_dir, source: str, mode: str) -> Path:
        return teacher_dir(data_dir, source, mode) / "manifest.json"

    @classmethod
    def load(cls, data_dir, source: str, mode: str) -> "TeacherManifest":
        path = cls.path(data_dir, source, mode)
        obj = read_json(path, what="teacher manifest")
        _check_version(obj, path)
        try:
            return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})
        except TypeError as exc:
            raise StoreError(f"{path}: teacher manifest is incomplete ({exc})") from exc

    def save(self, data_dir) -> None:
        write_json_atomic(self.path(data_dir, self.source, self.mode), asdict(self))

    def check(self, path, *, prepared: PreparedManifest | None = None, tokenizer_hash: str | None = None,
              vocab_size: int | None = None, k: int | None = None, model: str | None = None) -> None:
        """Raise StoreError naming `path` when the manifest does not match what the caller expects."""
        wanted = {}
        if prepared is not None:
            wanted.update(prepared_fingerprint=prepared.fingerprint, shard_size=prepared.shard_size,
                          n_shards=prepared.n_shards)
        for key, val in (("tokenizer_hash", tokenizer_hash), ("vocab_size", vocab_size), ("k", k),
                         ("model", model)):
            if val is not None:
                wanted[key] = val
        for key, val in wanted.items():
            if getattr(self, key) != val:
                what = "prepared set" if key in ("prepared_fingerprint", "shard_size", "n_shards") else "model"
                raise StoreError(f"{path}: {key} is {getattr(self, key)!r} but expected {val!r} "
                                 f"(store of another {what}; delete the folder or pass --overwrite)")

    @property
    def tokens(self) -> int:
        return sum(int(v["tokens"]) for v in self.completed.values())


def update_manifest(data_dir, source: str, mode: str, j: int, info: dict, *, generation: dict | None = None
                    ) -> TeacherManifest:
    """Mark shard j complete in the (shared) manifest: read-modify-write under a file lock."""
    from filelock import FileLock

    path = TeacherManifest.path(data_dir, source, mode)
    with FileLock(str(path) + ".lock"):
        m = TeacherManifest.load(data_dir, source, mode)
        m.completed[str(j)] = info
        if generation is not None:
            merged = dict(m.generation or {})
            for key, val in generation.items():  # counters add up over shards and ranks
                merged[key] = merged.get(key, 0) + val if key.startswith("n_") else val
            m.generation = merged
        m.save(data_dir)
    return m


# ---------------------------------------------------------------------------------------------------------
# teacher records
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RecordBatch:
    """Teacher records of several examples as flat arrays (row i owns tokens [off[i], off[i+1])).

    example_ids, responses: list[str] [n]; off int64 [n + 1]; pred_offsets int32 [sum R, 2];
    token_ids int32 [sum R]; token_logprobs float32 [sum R]; topk_ids int32 [sum R, K];
    topk_logprobs float32 [sum R, K]; n_bytes int32 [n].
    """

    example_ids: list
    responses: list
    off: np.ndarray
    pred_offsets: np.ndarray
    token_ids: np.ndarray
    token_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    n_bytes: np.ndarray

    def to_table(self) -> pa.Table:
        """The Parquet table (TEACHER_SCHEMA). nll_sum is summed from the fp32 log-probs, before fp16."""
        off = self.off.astype(np.int32)
        R = np.diff(self.off)
        K = self.topk_ids.shape[1] if self.topk_ids.ndim == 2 else 0
        tlp = self.token_logprobs.astype(np.float64)
        nll = -np.add.reduceat(tlp, self.off[:-1]) if tlp.size else np.zeros(len(R))
        nll[R == 0] = 0.0  # reduceat repeats the next value for empty rows

        def lst(values, per):
            return pa.ListArray.from_arrays(pa.array(off * per, pa.int32()), pa.array(values.reshape(-1)))

        return pa.Table.from_arrays([
            pa.array(self.example_ids, pa.string()),
            pa.array(self.responses, pa.string()),
            lst(self.pred_offsets.astype(np.int32), 2),
            lst(self.token_ids.astype(np.int32), 1),
            lst(self.token_logprobs.astype(np.float16), 1),
            lst(self.topk_ids.astype(np.int32), K),
            lst(self.topk_logprobs.astype(np.float16), K),
            pa.array(nll, pa.float64()),
            pa.array(R.astype(np.int32), pa.int32()),
            pa.array(self.n_bytes.astype(np.int32), pa.int32()),
        ], schema=TEACHER_SCHEMA)


def _flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    offs = arr.offsets.to_numpy().astype(np.int64)
    return offs - offs[0], arr.values.to_numpy(zero_copy_only=False)[offs[0]:offs[-1]]


def validate_teacher_table(t: pa.Table, path, k: int, *, prepared: pa.Table | None = None,
                           nan_policy: str = "error") -> tuple[pa.Table, int]:
    """Check a teacher shard; return (table, rows dropped for NaN when nan_policy == "drop").

    Checks: schema; list lengths (2R offsets, R ids and log-probs, R*k top-k); offsets inside the
    response and non-decreasing; n_bytes; the example ids equal the prepared shard's (when given) and, in
    train mode, the responses too; NaN log-probs (error naming the row, or dropped and counted).
    """
    if nan_policy not in ("error", "drop"):
        raise ValueError(f"nan_policy must be 'error' or 'drop', got {nan_policy!r}")
    missing = [f.name for f in TEACHER_SCHEMA if f.name not in t.column_names]
    if missing:
        raise StoreError(f"{path}: teacher shard lacks columns {missing}")
    if prepared is not None:
        if t.num_rows != prepared.num_rows:
            raise StoreError(f"{path}: {t.num_rows} rows but the prepared shard has {prepared.num_rows}")
        ids, pids = t["example_id"].to_pylist(), prepared["example_id"].to_pylist()
        for i, (a, b) in enumerate(zip(ids, pids)):
            if a != b:
                raise StoreError(f"{path}: row {i}: example_id {a!r} but the prepared shard has {b!r} "
                                 f"(store of another prepared set)")
    responses = t["response"].to_pylist()
    tok_off, _ = _flat(t["token_ids"])
    R = np.diff(tok_off)
    n_tokens = t["n_tokens"].to_numpy()
    for i in np.nonzero(R != n_tokens)[0][:1]:
        raise StoreError(f"{path}: row {i}: n_tokens={n_tokens[i]} but token_ids has {R[i]} entries")
    flat = {}
    for name, per in (("pred_offsets", 2), ("token_logprobs", 1), ("topk_ids", k), ("topk_logprobs", k)):
        o, v = _flat(t[name])
        for i in np.nonzero(np.diff(o) != per * R)[0][:1]:
            raise StoreError(f"{path}: row {i}: {name} has {np.diff(o)[i]} entries, expected {per} x {R[i]}")
        flat[name] = v
    offsets = flat["pred_offsets"].reshape(-1, 2)
    n_bytes = t["n_bytes"].to_numpy()
    for i, resp in enumerate(responses):
        o = offsets[tok_off[i]:tok_off[i + 1]]
        if o.size and ((o[:, 0] < 0).any() or (o[:, 1] < o[:, 0]).any() or (o[:, 1] > len(resp)).any()
                       or (np.diff(o[:, 0]) < 0).any()):
            raise StoreError(f"{path}: row {i}: pred_offsets do not fit its response of {len(resp)} characters")
        ends_turn = o.size > 0 and o[-1, 0] == len(resp)
        covered = len(resp[: o[-1, 1]].encode("utf-8")) if o.size else 0
        if n_bytes[i] != covered + int(ends_turn):
            raise StoreError(f"{path}: row {i}: n_bytes={n_bytes[i]} but the predicted text has "
                             f"{covered} bytes{' + 1 end-of-turn' if ends_turn else ''}")
    row_of = np.repeat(np.arange(t.num_rows), R)
    bad = np.isnan(t["nll_sum"].to_numpy(zero_copy_only=False))
    for name, per in (("token_logprobs", 1), ("topk_logprobs", k)):
        v = flat[name].astype(np.float32)
        if v.size:
            bad[row_of[np.isnan(v).reshape(-1, per).any(1)]] = True
    if bad.any():
        if nan_policy == "error":
            i = int(np.nonzero(bad)[0][0])
            raise StoreError(f"{path}: row {i} (example_id {t['example_id'][i].as_py()!r}): NaN log-probabilities"
                             f" ({int(bad.sum())} rows in this shard; nan_policy='drop' skips them)")
        t = t.filter(pa.array(~bad))
    return t, int(bad.sum())


def check_train_responses(t: pa.Table, prepared: pa.Table, path) -> None:
    """In train mode the stored response must be the gold response of the same row."""
    for i, (a, b) in enumerate(zip(t["response"].to_pylist(), prepared["response"].to_pylist())):
        if a != b:
            raise StoreError(f"{path}: row {i}: stored response differs from the prepared gold response")


class TeacherStore:
    """Read access to one (source, mode) store with its checks.

    store = TeacherStore(data_dir, "smollm2", "train", tokenizer_hash=..., vocab_size=...)
    table = store.read_shard(j)        # validated pa.Table (TEACHER_SCHEMA)
    """

    def __init__(self, data_dir, source: str, mode: str, *, tokenizer_hash: str | None = None,
                 vocab_size: int | None = None, model: str | None = None, nan_policy: str = "error"):
        self.data_dir, self.source, self.mode, self.nan_policy = Path(data_dir), source, mode, nan_policy
        self.prepared = PreparedManifest.load(data_dir)
        self.manifest_path = TeacherManifest.path(data_dir, source, mode)
        self.manifest = TeacherManifest.load(data_dir, source, mode)
        self.manifest.check(self.manifest_path, prepared=self.prepared, tokenizer_hash=tokenizer_hash,
                            vocab_size=vocab_size, model=model)
        self.n_dropped = 0

    @property
    def complete(self) -> bool:
        return len(self.manifest.completed) == self.manifest.n_shards

    def missing_shards(self) -> list[int]:
        return [j for j in range(self.manifest.n_shards) if str(j) not in self.manifest.completed]

    def shard_path(self, j: int) -> Path:
        return self.manifest_path.parent / shard_name(j)

    def read_shard(self, j: int, *, validate: bool = True) -> pa.Table:
        if str(j) not in self.manifest.completed:
            raise StoreError(f"{self.manifest_path}: shard {j} is not complete (run teach/generate again)")
        path = self.shard_path(j)
        t = read_table(path, what="teacher shard")
        if validate:
            prep = read_prepared_shard(self.data_dir, j, self.prepared)
            t, dropped = validate_teacher_table(t, path, self.manifest.k, prepared=prep,
                                                nan_policy=self.nan_policy)
            self.n_dropped += dropped
            if self.mode == "train":
                check_train_responses(t, prep.filter(pc_isin(prep["example_id"], t["example_id"])), path)
        return t

    def read_columns(self, columns) -> pa.Table:
        """Selected columns of every shard, concatenated in shard order (errors if a shard is missing)."""
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"{self.manifest_path}: shards {missing[:5]} are not complete")
        return pa.concat_tables([read_table(self.shard_path(j), columns) for j in range(self.manifest.n_shards)])


def pc_isin(values: pa.ChunkedArray, keep: pa.ChunkedArray) -> pa.Array:
    import pyarrow.compute as pc

    return pc.is_in(values, value_set=keep.combine_chunks())


# ---------------------------------------------------------------------------------------------------------
# reading a teacher shard for training: validated as above, then flat numpy views (the loader gathers
# from them without Python objects per token)
# ---------------------------------------------------------------------------------------------------------


def _list_flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets [n + 1] int64, flat values) of a list column, without Python objects."""
    arr = col.combine_chunks()
    offs = arr.offsets.to_numpy().astype(np.int64)
    return offs - offs[0], arr.values.to_numpy(zero_copy_only=False)[offs[0]:offs[-1]]


@dataclass
class TeacherShard:
    """One source's records for one shard, as flat arrays (row i owns tokens [tok_off[i], tok_off[i+1])).

    offsets [sum R, 2] int32, token_ids [sum R] int32, token_logprobs [sum R] float16, topk_ids
    [sum R, k] int32, topk_logprobs [sum R, k] float16; nll_sum [n] float64, n_tokens / n_bytes [n] int64;
    response: pa.StringArray [n]; bad_rows [n] bool: a NaN in the row's log-probs or nll_sum.
    """

    path: Path
    k: int
    response: pa.Array
    tok_off: np.ndarray
    offsets: np.ndarray
    token_ids: np.ndarray
    token_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    nll_sum: np.ndarray
    n_tokens: np.ndarray
    n_bytes: np.ndarray
    bad_rows: np.ndarray

    def nan_column(self, i: int) -> str:
        """Name of a column holding a NaN in row i (for error messages)."""
        a, z = self.tok_off[i], self.tok_off[i + 1]
        if np.isnan(self.token_logprobs[a:z]).any():
            return "token_logprobs"
        return "topk_logprobs" if np.isnan(self.topk_logprobs[a:z]).any() else "nll_sum"


def read_teacher_shard(path: Path, k: int, prepared: pa.Table, *, gold: bool,
                       validated: set | None = None) -> TeacherShard:
    """Read one teacher shard, check it with validate_teacher_table against the prepared shard
    (row count, example ids, list lengths, offsets, n_bytes; with gold=True the responses too), and flag
    NaN rows without dropping them (the loader applies nan_policy: in inference mode only the vote
    winner's NaN matters).

    validated: a set of (path, mtime_ns, size, gold) already checked; an unchanged file is not re-checked
    in later epochs (the checks loop over rows in Python: about a third of a shard's first read).
    """
    t = read_table(path, what="teacher shard")
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, gold)
    except OSError:
        key = None
    if validated is None or key not in validated:
        validate_teacher_table(t, path, k, prepared=prepared, nan_policy="drop")
        if gold:
            check_train_responses(t, prepared, path)
        if validated is not None and key is not None:
            validated.add(key)
    tok_off, token_ids = _list_flat(t["token_ids"])
    flat = {name: _list_flat(t[name])[1]
            for name in ("pred_offsets", "token_logprobs", "topk_ids", "topk_logprobs")}
    tlp = flat["token_logprobs"].astype(np.float16, copy=False)
    klp = flat["topk_logprobs"].astype(np.float16, copy=False).reshape(-1, k)
    nll_sum = t["nll_sum"].to_numpy(zero_copy_only=False).astype(np.float64)
    n = t.num_rows
    row_of = np.repeat(np.arange(n), np.diff(tok_off))
    bad_rows = np.isnan(nll_sum)
    for vals in (tlp, klp):
        nan = np.isnan(vals).reshape(vals.shape[0], -1).any(1) if vals.size else np.zeros(0, bool)
        if nan.any():
            bad_rows |= np.bincount(row_of[nan], minlength=n) > 0
    return TeacherShard(
        path=path, k=k, response=t["response"].combine_chunks(), tok_off=tok_off,
        offsets=flat["pred_offsets"].astype(np.int32, copy=False).reshape(-1, 2),
        token_ids=token_ids.astype(np.int32, copy=False), token_logprobs=tlp,
        topk_ids=flat["topk_ids"].astype(np.int32, copy=False).reshape(-1, k), topk_logprobs=klp,
        nll_sum=nll_sum, n_tokens=t["n_tokens"].to_numpy().astype(np.int64),
        n_bytes=t["n_bytes"].to_numpy().astype(np.int64), bad_rows=bad_rows)
