"""Rank and world size for the sharded teacher passes (no process group needed).

teach and generate are embarrassingly parallel over shards (rank r of W owns shards j % W == r), so they
only need to know (rank, world_size, local_rank): from explicit flags, else from the launcher's
environment (torchrun / deepspeed: RANK, WORLD_SIZE, LOCAL_RANK; Slurm: SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID; Open MPI: OMPI_COMM_WORLD_*), else from an initialized torch.distributed group, else
(0, 1, 0). Several nodes writing into one shared --data-dir works the same way.
"""

from __future__ import annotations

import os
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
    """torch.device: "auto" = cuda:<local_rank> when CUDA is available, else cpu."""
    import torch

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
