"""File writes every layer shares: atomic writes, one-line full-disk errors, and the one lock mechanism.

    atomic_write(path, write)       write(tmp) -> fsync -> os.replace: a reader never sees half a file; the
                                    temporary file never survives a failure; ENOSPC -> DiskFullError
    write_text_atomic(path, text)   the same for a text file (a symlink at `path` is replaced, never written
                                    through)
    WriterLock(path, what=...)      an exclusive lock file naming its owner (below)
    DiskFullError                   OSError ENOSPC whose message names the file: `<file>: no space left ...`

The lock. A lock file is created with O_CREAT | O_EXCL (atomic on POSIX filesystems, NFS v3+ included)
and holds {pid, host, since}. A second writer gets LockBusyError naming the owner, or waits (wait=True)
until the lock is released. A lock whose owner is a dead process on this host is stale and taken over; a
lock held from another host is never taken over automatically (its owner cannot be checked from here):
the message says which file to delete if that process is gone. ENOSPC while creating it names the file and
leaves no empty lock; a symbolic link in its place is an error naming it. Every lock of the engine is one of
these: the teacher passes lock each shard (ranks of one run never wait for each other, two runs never
interleave), a training run its output folder, and the store's manifest updates and the one-time GGUF
conversions lock briefly with wait=True.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable


class DiskFullError(OSError):
    """No space left on the device while writing; the message names the file. Nothing partial is kept.
    DiskFullError(errno.ENOSPC, message): str() is the message alone (the one line a user reads)."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.strerror = message

    def __str__(self) -> str:
        return self.strerror


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


def disk_full_error(path: Path, exc: BaseException | None = None) -> DiskFullError:
    """The one-line error of a write of `path` that found the disk full."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(errno.ENOSPC, f"{path}: no space left on device ({free}) while writing; nothing partial "
                                       "was kept: free space and run the same command again (finished work is "
                                       "kept)")


def tmp_name(path: Path) -> Path:
    """Where `path` is written before its rename (the pid keeps two writers' temporaries apart)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then fsync and rename to path; the tmp file never survives a failure; a full disk is a
    DiskFullError naming `path`."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise disk_full_error(path, exc) from exc
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through atomic_write."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------------------------------------------
# the lock


class LockBusyError(RuntimeError):
    """Another live writer holds the lock; the message names the lock file, the owner and the way out
    (exported by the store as StoreBusyError)."""


class LockError(RuntimeError):
    """Something that is not a lock file stands where a lock goes; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    def __init__(self, path: Path, *, what: str, wait: bool = False, poll_s: float = 1.0,
                 timeout_s: float | None = None):
        self.path, self.what, self.wait, self.poll_s, self.timeout_s = Path(path), what, wait, poll_s, timeout_s
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def owner(self) -> dict | None:
        if self.path.is_symlink():  # O_EXCL fails on it, reading it finds nothing: it would never be taken
            raise LockError(f"{self.path}: a symbolic link (to {os.readlink(self.path)}) stands where {self.what}'s "
                            "lock file goes; profuser never writes one: delete it and run again")
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or unreadable: treat as held

    def _try(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path, exc) from exc
            raise
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**self.me, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        except BaseException as exc:  # an empty lock left behind would block every later run
            self.path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise disk_full_error(self.path, exc) from exc
            raise
        return True

    def acquire(self) -> "WriterLock":
        t0 = time.monotonic()
        while not self._try():
            owner = self.owner()
            if owner is None:
                continue  # released between our attempt and the read
            if owner.get("host") == self.me["host"] and isinstance(owner.get("pid"), int) \
                    and not _alive(owner["pid"]):
                self.path.unlink(missing_ok=True)  # stale: its writer died (killed run); take it over
                continue
            if not self.wait or (self.timeout_s is not None and time.monotonic() - t0 > self.timeout_s):
                raise LockBusyError(
                    f"{self.path}: {self.what} is being written by pid {owner.get('pid')} on host "
                    f"{owner.get('host')} since {owner.get('since')}; another writer of this store is running. "
                    f"Pass --wait to wait for it, or delete {self.path} if that process is gone")
            time.sleep(self.poll_s)
        self.held = True
        return self

    def release(self) -> None:
        if self.held and (self.owner() or {}).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
