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
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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
    """
    import torch

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"local rank {local_rank} but this node has only {n} CUDA device(s): launch at "
                             f"most {n} processes per node")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    info = DistInfo(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    device = device_for(info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return info, device


def teardown_distributed() -> None:
    """Destroy the process group before the interpreter exits.

    A gloo group left to the interpreter's exit can be torn down after its worker threads' owners are gone:
    the rank then aborts with "terminate called without an active exception" (seen on CI, 1 run in ~20),
    and the launcher reports the whole run as failed.
    """
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()
