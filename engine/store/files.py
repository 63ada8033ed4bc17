"""Files of the stores: paths, atomic writes, checksums and digests, one-line errors for full disks.

Every file the stores write carries its own integrity check, verified on read:
    Parquet    page checksums (CRC32 of every data page, `write_page_checksum`), verified by pyarrow on
               every read; plus the file's sha256 in its manifest, verified once per file and process
    JSON       a `checksum` key: sha256 of the canonical JSON of every other key (sort_keys, no spaces)

Every write goes through fileio.atomic_write (`<name>.tmp-<pid>`, fsync, `os.replace`): a reader never sees
half a file. A full disk (ENOSPC) removes the temporary file and raises DiskFullError naming the file;
nothing that was complete before is touched, so the same command completes after space is freed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import MODES
from ..fileio import DiskFullError, atomic_write, write_text_atomic  # noqa: F401 - DiskFullError: the store's API


class StoreError(ValueError):
    """Missing, corrupt or inconsistent store data; the message names the file (and row)."""


@dataclass(frozen=True)
class WriteOptions:
    """Parquet writer settings (store/__init__.py explains the defaults)."""

    compression: str = "zstd"  # Parquet codec of the stored shards
    compression_level: int = 9  # its level
    byte_stream_split: bool = True  # float / int32 columns byte-stream-split (they compress better)
    row_group_size: int = 256  # rows per Parquet row group


@dataclass(frozen=True)
class FileInfo:
    """A written file: its size and sha256 (recorded in a manifest, verified on read)."""

    bytes: int
    sha256: str


# ---------------------------------------------------------------------------------------------------------
# paths


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


# ---------------------------------------------------------------------------------------------------------
# writes


def canonical_checksum(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    """The object plus its `checksum` key, atomically."""
    body = {**{k: v for k, v in obj.items() if k != "checksum"}, "checksum": canonical_checksum(obj)}
    write_text_atomic(Path(path), json.dumps(body, indent=1, sort_keys=True) + "\n")


def write_table_atomic(table: pa.Table, path: Path, opts: WriteOptions = WriteOptions()) -> FileInfo:
    """Write `table` as Parquet with page checksums, atomically. Returns its size and sha256."""
    path = Path(path)
    encodings = {}
    if opts.byte_stream_split:
        for f in table.schema:
            is_list = pa.types.is_list(f.type)
            t = f.type.value_type if is_list else f.type
            if pa.types.is_float16(t) or pa.types.is_int32(t) or pa.types.is_float32(t):
                # the encoding applies to leaf columns: a list's values are "<name>.list.element"
                encodings[f"{f.name}.list.element" if is_list else f.name] = "BYTE_STREAM_SPLIT"
    digest = {}

    def write(tmp):
        pq.write_table(table, tmp, compression=opts.compression, compression_level=opts.compression_level,
                       use_dictionary=[f.name for f in table.schema if f.name not in encodings
                                       and not pa.types.is_list(f.type)] or False,
                       column_encoding=encodings or None, row_group_size=opts.row_group_size,
                       write_statistics=False, write_page_checksum=True)
        digest["sha256"] = file_sha256(tmp)

    atomic_write(path, write)
    return FileInfo(bytes=path.stat().st_size, sha256=digest["sha256"])


def remove_stale_tmp(folder: Path, names: list[str]) -> int:
    """Delete the tmp files of `names` left by killed writers. Call only while holding the lock of every name
    (fileio.WriterLock): a live writer's tmp file is then impossible. Returns the count."""
    n = 0
    for name in names:
        for p in Path(folder).glob(f"{name}.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# reads


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED: set = set()  # (path, mtime_ns, size, sha256) verified in this process


def verify_digest(path: Path, sha256: str | None, *, what: str = "shard") -> None:
    """StoreError naming the file when its content differs from the digest its manifest recorded.
    Each unchanged file is hashed once per process (the loader's later epochs pay nothing)."""
    if not sha256:
        return  # written by schema 1 (no digests): the value checks still run
    st = Path(path).stat()
    key = (str(path), st.st_mtime_ns, st.st_size, sha256)
    if key in _VERIFIED:
        return
    got = file_sha256(path)
    if got != sha256:
        raise StoreError(f"{path}: {what} content digest {got[:16]} differs from the manifest's {sha256[:16]}: the "
                         "file changed after it was written (corrupt, edited or replaced); re-run the command that "
                         "wrote it")
    _VERIFIED.add(key)


def read_table(path: Path, columns=None, *, what: str = "shard") -> pa.Table:
    """Read a Parquet file, verifying its page checksums; StoreError naming the file when it is missing or
    corrupt."""
    if not Path(path).is_file():
        raise StoreError(f"{path}: {what} file is missing")
    try:
        return pq.read_table(path, columns=list(columns) if columns else None, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StoreError(f"{path}: corrupt or unreadable {what} ({type(exc).__name__}: {exc})") from exc


def read_json(path: Path, *, what: str = "manifest", require_checksum: bool = False) -> dict:
    """A JSON object, its `checksum` verified when present (required with require_checksum)."""
    if not Path(path).is_file():
        raise StoreError(f"{path}: {what} not found")
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable {what} ({exc})") from exc
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: {what} is not a JSON object")
    if "checksum" in obj or require_checksum:
        if obj.get("checksum") != canonical_checksum(obj):
            raise StoreError(f"{path}: {what} checksum mismatch: the file was changed or corrupted after it was "
                             "written")
    return obj
