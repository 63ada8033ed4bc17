"""One writer per piece of a store: exclusive lock files naming their owner.

    with WriterLock(folder / "part-00003.parquet.lock", what="shard 3", wait=False):
        ...                              # write, record in the manifest

A lock file is created with O_CREAT | O_EXCL (atomic on POSIX filesystems, NFS v3+ included) and holds
{pid, host, since}. A second writer gets StoreBusyError naming the owner, or waits (wait=True) until the
lock is released. A lock whose owner is a dead process on this host is stale and taken over; a lock
held from another host is never taken over automatically (its owner cannot be checked from here): the
message says which file to delete if that process is gone.

The teacher passes lock each shard they compute, so ranks of one run (disjoint shards) never wait for each
other while two runs on the same shards never interleave; a shard's temporary files are removed only by
the holder of its lock, so a live writer's files are never deleted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .files import StoreError, disk_full_error, is_disk_full


class StoreBusyError(StoreError):
    """Another live writer holds the lock; the message names the lock file, the owner and the way out."""


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
            raise StoreError(f"{self.path}: a symbolic link (to {os.readlink(self.path)}) stands where {self.what}'s "
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
                raise StoreBusyError(
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
