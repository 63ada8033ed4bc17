"""Ranks, devices and the process group: where global rank, local rank and world size each belong.

    global rank  (RANK)        which shards a process owns (j % world_size == rank), rank 0 writes the
                               run's shared files (config, logs, checkpoint pointers, exports)
    local rank   (LOCAL_RANK)  which GPU of its node a process drives (cuda:<local_rank>); nothing else
    world size   (WORLD_SIZE)  all processes of all nodes

The teacher passes are embarrassingly parallel over shards, so they only need (rank, world_size,
local_rank): from explicit flags, else from the launcher's environment (torchrun / deepspeed: RANK,
WORLD_SIZE, LOCAL_RANK; Slurm: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; Open MPI:
OMPI_COMM_WORLD_*), else from an initialized torch.distributed group, else (0, 1, 0). Several nodes
writing into one shared --data-dir works the same way. Training initializes a process group
(`setup_distributed`: gloo on CPU, NCCL on GPUs) and destroys it before exit (`teardown_distributed`).

Host memory of a CPU process (`keep_freed_memory`, applied by `device_for` when it returns the CPU): glibc
serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free. A
CPU training step allocates and frees buffers of ~1 GB (the gradient of a 262k x 640 embedding, the
optimizer's temporaries, a chunk of logits), so every step page-faulted gigabytes of fresh, zeroed pages: on
the demo (Gemma-3-270M, 2 cores) half of a step's wall time was kernel time. Large buffers now come from the
heap and freed memory is kept for reuse (what jemalloc / tcmalloc under LD_PRELOAD give, with glibc's own
knobs): demo steps 1.7-2.2x faster, results bit-identical; the cost is a higher resident peak (free pages
held between steps), bounded by `release_freed_memory` after the phases that allocate once (checkpoints,
exports, evaluations). Measured in README "Host memory on a CPU"; tests/engine/test_dist.py. Off with
PROFUSER_MALLOC=system, and whenever the user set glibc's MALLOC_* variables or preloads another allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

_ENV = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid rank={self.rank} for world_size={self.world_size}")
        if self.local_rank < 0:
            raise ValueError(f"invalid local_rank={self.local_rank}")


def dist_info(rank: int | None = None, world_size: int | None = None) -> DistInfo:
    """(rank, world_size, local_rank): flags win, then launcher env vars, then torch.distributed."""
    if (rank is None) != (world_size is None):
        raise ValueError("pass both --rank and --world-size, or neither")
    if rank is not None:
        return DistInfo(int(rank), int(world_size), int(os.environ.get("LOCAL_RANK", 0)))
    for r, w, lr in _ENV:
        if r in os.environ and w in os.environ:
            try:
                return DistInfo(int(os.environ[r]), int(os.environ[w]), int(os.environ.get(lr, 0)))
            except ValueError as exc:
                raise ValueError(f"bad launcher environment {r}={os.environ[r]!r} {w}={os.environ[w]!r}") from exc
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return DistInfo(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def add_arguments(p) -> None:
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: from the launcher env)")
    p.add_argument("--world-size", type=int, default=None, help="number of processes (default: from the env)")


def device_for(local_rank: int, device: str = "auto"):
    """torch.device: "auto" = cuda:<local_rank> when CUDA is available, else cpu.

    The LOCAL rank picks the GPU: global rank 9 of a 2 x 8 job is local rank 1 of its node, cuda:1.
    A CPU device turns on keep_freed_memory (module docstring: host memory).
    """
    import torch

    if device != "auto":
        out = torch.device(device)
    elif torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"local rank {local_rank} but this node has only {n} CUDA device(s): launch at "
                             f"most {n} processes per node")
        out = torch.device("cuda", local_rank)
    else:
        out = torch.device("cpu")
    if out.type == "cpu":
        keep_freed_memory()
    return out


# glibc mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_malloc = {"libc": None, "applied": None}


def keep_freed_memory() -> bool:
    """Large allocations from the heap, freed memory kept for reuse (module docstring). Process-wide and
    for good: call before the big tensors exist. True when the setting is in effect."""
    if _malloc["applied"] is not None:
        return _malloc["applied"]
    _malloc["applied"] = False
    if os.environ.get("PROFUSER_MALLOC", "keep") == "system":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # the user's own allocator settings win
    libc = _glibc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1  # every allocation from the heap: nothing unmapped on free
          and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1: never trim the heap's top
          and libc.mallopt(_M_TOP_PAD, 256 << 20) == 1)  # grow the heap 256 MiB at a time
    _malloc.update(libc=libc if ok else None, applied=ok)
    return ok


def release_freed_memory() -> None:
    """Hand the free pages of the heap back to the kernel (malloc_trim(0)) where keep_freed_memory holds
    them: after a phase that allocates once (a checkpoint, an export, a model evaluated and freed)."""
    if _malloc["libc"] is not None:
        _malloc["libc"].malloc_trim(0)


def _glibc():
    """The C library when it is glibc (musl and others have no mallopt with these semantics)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None


def setup_distributed():
    """Initialize torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU).

    Returns (DistInfo, device). Without a launcher, the single-process environment is set here: otherwise
    DeepSpeed falls back to MPI discovery and fails with `No module named 'mpi4py'`.
    """
    import deepspeed
    import torch
    import torch.distributed as td

    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port, so two single-process runs never collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    on_gpu = torch.cuda.is_available()
    if not td.is_initialized():
        if not on_gpu:  # DeepSpeed's CPU backend JIT-builds (or loads) its shared-memory op: do it here, guarded,
            # so init_distributed finds it built (the guard must not span init_distributed itself: its rendezvous
            # waits for the other ranks of this host, which would be waiting for the guard)
            with extension_build_guard("deepspeed_shm_comm"):
                _build_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    info = DistInfo(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    device = device_for(info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return info, device


def _build_deepspeed_shm_op() -> None:
    try:
        from deepspeed.comm.torch import build_shm_op
    except ImportError:  # a DeepSpeed without it builds nothing at init
        return
    build_shm_op()


def _build_directory(name: str) -> Path | None:
    """torch's JIT build folder of extension `name` (TORCH_EXTENSIONS_DIR or the per-Python, per-accelerator
    default under ~/.cache/torch_extensions); None when this torch no longer has the private helper."""
    from torch.utils import cpp_extension

    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except (AttributeError, TypeError, OSError):
        return None


@contextlib.contextmanager
def extension_build_guard(name: str, log=print):
    """Around code that JIT-builds or loads torch extension `name`: clears a build lock that a killed process
    left behind, which would otherwise hang every later run forever without a word.

    torch serializes a build with an empty `lock` file in the build folder (FileBaton): created with O_EXCL,
    removed when the build ends, waited on by everyone else with no timeout and no owner to check. A process
    killed mid-build (SIGKILL, the end of a job's time) leaves it, and every later training run on the CPU
    sleeps in DeepSpeed's init_distributed. Here every profuser process holds an flock on a sidecar file for
    the whole build: the kernel releases it when its holder dies, so whoever holds it finds either no `lock`
    or a stale one, and removes the stale one (named in one line)."""
    folder = _build_directory(name)
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "profuser.flock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # another profuser process building: wait for its build
        try:
            baton = folder / "lock"
            if baton.exists():
                baton.unlink(missing_ok=True)
                log(f"[profuser] removed {baton}: a build lock left by a process killed while building "
                    f"the torch extension {name} (no profuser process was building it)")
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def teardown_distributed() -> None:
    """Destroy the process group before the interpreter exits.

    A gloo group left to the interpreter's exit can be torn down after its worker threads' owners are gone:
    the rank then aborts with "terminate called without an active exception" (seen on CI, 1 run in ~20),
    and the launcher reports the whole run as failed.
    """
    import torch.distributed as td

    if not td.is_initialized():
        return
    try:
        import deepspeed.comm as ds_comm
    except ImportError:
        ds_comm = None
    if ds_comm is not None and ds_comm.comm.cdb is not None:
        # DeepSpeed's own call also drops its references to the groups (data parallel, world, ...): destroyed
        # under it, a second train() in one process (the Python API, a notebook training the fusion run and
        # then its baseline) reused the dead groups and failed with "Group ... is not registered"
        ds_comm.destroy_process_group()
    else:
        td.destroy_process_group()
