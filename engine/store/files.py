"""Files of the stores: paths, atomic writes, checksums and digests, one-line errors for full disks.

Every file the stores write carries its own integrity check, verified on read:
    Parquet    page checksums (CRC32 of every data page, `write_page_checksum`), verified by pyarrow on
               every read; plus the file's sha256 in its manifest, verified once per file and process
    JSON       a `checksum` key: sha256 of the canonical JSON of every other key (sort_keys, no spaces)

A write goes to `<name>.tmp-<pid>`, is fsynced and `os.replace`d into place: a reader never sees half a
file. A full disk (ENOSPC) removes the temporary file and raises DiskFullError naming the file; nothing
that was complete before is touched, so the same command completes after space is freed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import MODES


class StoreError(ValueError):
    """Missing, corrupt or inconsistent store data; the message names the file (and row)."""


class DiskFullError(StoreError, OSError):
    """No space left on the device while writing; the message names the file. Nothing partial is kept.
    DiskFullError(errno.ENOSPC, message): str() is the message alone (the one line a user reads)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno, self.strerror = code, message

    def __str__(self) -> str:
        return self.strerror


@dataclass(frozen=True)
class WriteOptions:
    """Parquet writer settings (store/__init__.py explains the defaults)."""

    compression: str = "zstd"
    compression_level: int = 9
    byte_stream_split: bool = True
    row_group_size: int = 256


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


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


# ---------------------------------------------------------------------------------------------------------
# writes


def is_disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether `exc` is a write that failed for want of space. torch.save reports a full disk as a bare
    RuntimeError from its zip writer ("unexpected pos ...", no errno): with `folder`, such an error counts
    when the folder's filesystem has less than 64 MiB left."""
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
        return True
    if folder is None or not any(s in str(exc) for s in ("inline_container", "PytorchStreamWriter")):
        return False
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def disk_full_error(path: Path, exc: BaseException) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(errno.ENOSPC, f"{path}: no space left on device ({free}) while writing; nothing partial "
                                       "was kept: free space and run the same command again (finished work is "
                                       "kept)")


def _atomic(path: Path, write) -> None:
    """write(tmp) then fsync and rename to path; the tmp file never survives a failure."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, pa.ArrowException)) and is_disk_full(exc):
            raise disk_full_error(path, exc) from exc
        raise


def canonical_checksum(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file, fsync and a rename: never half a file; a symlink at
    `path` is replaced, never written through."""
    _atomic(Path(path), lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, obj: dict) -> None:
    """The object plus its `checksum` key, atomically."""
    body = {**{k: v for k, v in obj.items() if k != "checksum"}, "checksum": canonical_checksum(obj)}
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n"))


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

    _atomic(path, write)
    return FileInfo(bytes=path.stat().st_size, sha256=digest["sha256"])


def remove_stale_tmp(folder: Path, names: list[str]) -> int:
    """Delete the tmp files of `names` left by killed writers. Call only while holding the lock of every name
    (store/locks.py): a live writer's tmp file is then impossible. Returns the count."""
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
