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

import functools
import glob
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import MODES
from .text.chat import predicted_bytes

SCHEMA_VERSION = 1
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
# teacher shards: one class writes them (teach, generate) and reads them (loader, score)
# ---------------------------------------------------------------------------------------------------------


def _list_flat(col) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets [n + 1] int64, flat values) of a list column, without Python objects."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offs = arr.offsets.to_numpy().astype(np.int64)
    return offs - offs[0], arr.values.to_numpy(zero_copy_only=False)[offs[0]:offs[-1]]


@dataclass
class TeacherShard:
    """One source's records of one shard (TEACHER_SCHEMA) as flat arrays; row i owns the tokens
    [tok_off[i], tok_off[i + 1]) of every per-token array.

    example_ids, responses: list[str] or pa.StringArray [n]; tok_off int64 [n + 1]; offsets int32
    [sum R, 2]; token_ids int32 [sum R]; token_logprobs [sum R] (float32 when written, float16 when read);
    topk_ids int32 [sum R, K]; topk_logprobs [sum R, K]; n_bytes [n]; nll_sum float64 [n] (None: summed
    from the float32 token log-probs before they are rounded to float16 on write). path: where it was read.
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
    nll_sum: np.ndarray | None = None
    path: Path | None = None

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
        off = self.tok_off.astype(np.int32)

        def lst(values, per):
            return pa.ListArray.from_arrays(pa.array(off * per, pa.int32()), pa.array(values.reshape(-1)))

        return pa.Table.from_arrays([
            pa.array(self.example_ids, pa.string()), pa.array(self.responses, pa.string()),
            lst(self.offsets.astype(np.int32), 2), lst(self.token_ids.astype(np.int32), 1),
            lst(self.token_logprobs.astype(np.float16), 1), lst(self.topk_ids.astype(np.int32), self.k),
            lst(self.topk_logprobs.astype(np.float16), self.k), pa.array(self.nll_sum, pa.float64()),
            pa.array(self.n_tokens.astype(np.int32), pa.int32()), pa.array(self.n_bytes.astype(np.int32), pa.int32()),
        ], schema=TEACHER_SCHEMA)

    @classmethod
    def from_table(cls, t: pa.Table, path, k: int) -> "TeacherShard":
        """Flat arrays of a shard table, after the structural checks (columns, list lengths vs n_tokens and
        k); StoreError naming the file and row otherwise."""
        missing = [f.name for f in TEACHER_SCHEMA if f.name not in t.column_names]
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
                   nll_sum=t["nll_sum"].to_numpy(zero_copy_only=False).astype(np.float64), path=Path(path))

    def validate(self, prepared: pa.Table | None = None, *, gold: bool = False) -> None:
        """Check the values against the text: offsets inside the response and non-decreasing, n_bytes
        (text.chat.predicted_bytes), the example ids of the prepared shard and, with gold=True (training
        mode), its gold responses. StoreError naming the file and row. NaN is not an error here (bad_rows)."""
        ids = list(self.example_ids.to_pylist() if isinstance(self.example_ids, pa.Array) else self.example_ids)
        responses = self.responses.to_pylist() if isinstance(self.responses, pa.Array) else list(self.responses)
        if prepared is not None:
            if len(ids) != prepared.num_rows:
                raise StoreError(f"{self.path}: {len(ids)} rows but the prepared shard has {prepared.num_rows}")
            for i, (a, b) in enumerate(zip(ids, prepared["example_id"].to_pylist())):
                if a != b:
                    raise StoreError(f"{self.path}: row {i}: example_id {a!r} but the prepared shard has {b!r} "
                                     f"(store of another prepared set)")
        for i, resp in enumerate(responses):
            o = self.offsets[self.tok_off[i]:self.tok_off[i + 1]]
            if o.size and ((o[:, 0] < 0).any() or (o[:, 1] < o[:, 0]).any() or (o[:, 1] > len(resp)).any()
                           or (np.diff(o[:, 0]) < 0).any()):
                raise StoreError(f"{self.path}: row {i}: pred_offsets do not fit its response of {len(resp)} "
                                 "characters")
            if self.n_bytes[i] != predicted_bytes(resp, o):
                raise StoreError(f"{self.path}: row {i}: n_bytes={self.n_bytes[i]} but the predicted text has "
                                 f"{predicted_bytes(resp, o)} bytes (end-of-turn included)")
        if prepared is not None and gold:
            for i, (a, b) in enumerate(zip(responses, prepared["response"].to_pylist())):
                if a != b:
                    raise StoreError(f"{self.path}: row {i}: stored response differs from the prepared gold response")

    @functools.cached_property
    def bad_rows(self) -> np.ndarray:
        """bool [n]: a NaN in the row's log-probs or nll_sum (teach/generate --nan-policy drop marks rows so)."""
        bad = np.isnan(self.nll_sum)
        row_of = np.repeat(np.arange(self.n_rows), self.n_tokens)
        for vals in (self.token_logprobs, self.topk_logprobs):
            nan = np.isnan(vals).reshape(vals.shape[0], -1).any(1) if vals.size else np.zeros(0, bool)
            if nan.any():
                bad |= np.bincount(row_of[nan], minlength=self.n_rows) > 0
        return bad

    def nan_column(self, i: int) -> str:
        """Name of a column holding a NaN in row i (for error messages)."""
        a, z = self.tok_off[i], self.tok_off[i + 1]
        if np.isnan(self.token_logprobs[a:z]).any():
            return "token_logprobs"
        return "topk_logprobs" if np.isnan(self.topk_logprobs[a:z]).any() else "nll_sum"


def read_teacher_shard(path: Path, k: int, prepared: pa.Table | None, *, gold: bool,
                       validated: set | None = None) -> TeacherShard:
    """The one reader of teacher shards: read, check the structure, validate the values against the
    prepared shard (TeacherShard.validate). NaN rows are flagged (bad_rows), never dropped here: the
    reader's nan_policy decides (in inference mode only the vote winner's NaN matters).

    validated: a set of (path, mtime_ns, size, gold) already checked; an unchanged file is not re-checked
    in later epochs (the value checks loop over rows in Python: about a third of a shard's first read).
    """
    shard = TeacherShard.from_table(read_table(path, what="teacher shard"), path, k)
    try:
        st = Path(path).stat()
        key = (str(path), st.st_mtime_ns, st.st_size, gold)
    except OSError:
        key = None
    if validated is None or key not in validated:
        shard.validate(prepared, gold=gold)
        if validated is not None and key is not None:
            validated.add(key)
    return shard


class TeacherStore:
    """One (source, mode) store opened for reading: its manifest checked against the prepared set (and the
    tokenizer / vocabulary / model the caller expects), every shard complete with the prepared row counts.

    store = TeacherStore(data_dir, "smollm2", "train")
    shard = store.shard(j, prepared_table)     # a validated TeacherShard
    """

    def __init__(self, data_dir, source: str, mode: str, *, prepared: PreparedManifest | None = None,
                 tokenizer_hash: str | None = None, vocab_size: int | None = None, model: str | None = None):
        self.data_dir, self.source, self.mode = Path(data_dir), source, mode
        self.prepared = prepared or PreparedManifest.load(data_dir)
        self.manifest_path = TeacherManifest.path(data_dir, source, mode)
        self.manifest = TeacherManifest.load(data_dir, source, mode)
        m = self.manifest
        m.check(self.manifest_path, prepared=self.prepared, tokenizer_hash=tokenizer_hash, vocab_size=vocab_size,
                model=model)
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

    def shard(self, j: int, prepared: pa.Table | None = None, *, validated: set | None = None) -> TeacherShard:
        """Shard j, validated against prepared shard j (read here when not given)."""
        if prepared is None:
            prepared = read_prepared_shard(self.data_dir, j, self.prepared)
        return read_teacher_shard(self.shard_path(j), self.manifest.k, prepared, gold=self.mode == "train",
                                  validated=validated)


def write_votes(data_dir, example_ids: list[str], winners: list[str], votes: list[dict], scores: list[dict]) -> Path:
    """scores/votes.parquet: example_id, winner (a source name), votes json {source: n}, scores json
    {scorer: {source: score or null}}. Returns the path."""
    path = scores_dir(data_dir) / "votes.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table_atomic(pa.table({"example_id": list(example_ids), "winner": list(winners),
                                 "votes": [json.dumps(v) for v in votes], "scores": [json.dumps(s) for s in scores]}),
                       path)
    return path


def read_votes(data_dir, sources: list[str] | None = None) -> dict[str, str]:
    """The one reader of scores/votes.parquet: {example_id: winning source name}; with `sources`, a winner
    that is not one of them is a StoreError naming the file and row."""
    path = scores_dir(data_dir) / "votes.parquet"
    table = read_table(path, ("example_id", "winner"), what="votes table")
    ids, winners = table["example_id"].to_pylist(), table["winner"].to_pylist()
    if sources is not None:
        for row, (eid, winner) in enumerate(zip(ids, winners)):
            if winner not in sources:
                raise StoreError(f"{path}: row {row}: winner {winner!r} of example {eid!r} is not one of the "
                                 f"configured sources {list(sources)}")
    return dict(zip(ids, winners))


def require_stores(data_dir, sources: list[str], mode: str, *, what: str = "data.data_dir") -> None:
    """Fail in seconds, before any model loads, when the prepared set or a source's store of `mode` is
    missing or was built for another prepared set. `what` names the config key in the message."""
    root = Path(data_dir)
    prepared = prepared_dir(root) / "manifest.json"
    if not prepared.is_file():
        raise FileNotFoundError(f"{what}={root}: no prepared set ({prepared} is missing); run `profuser prepare` "
                                "first")
    fingerprint = read_json(prepared, what="prepared manifest").get("fingerprint")
    for source in sources:
        manifest = TeacherManifest.path(root, source, mode)
        if not manifest.is_file():
            step = "teach" if mode == "train" else "generate"
            raise FileNotFoundError(f"data.sources: no {mode}-mode store for source {source!r} ({manifest} is "
                                    f"missing); run `profuser {step}` first")
        got = read_json(manifest, what="teacher manifest").get("prepared_fingerprint")
        if got != fingerprint:
            raise StoreError(f"{manifest}: built for another prepared set (prepared_fingerprint {got!r} != "
                             f"{fingerprint!r} in {prepared}); re-run teach/generate on this prepared set")
