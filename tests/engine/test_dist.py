"""Global rank, local rank and world size: each read from where launchers put it and used for one job."""

from __future__ import annotations

import pytest
import torch

from profuser.engine import dist


@pytest.mark.parametrize("env, want", [
    ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}, dist.DistInfo(9, 16, 1)),  # torchrun / deepspeed
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, dist.DistInfo(5, 8, 1)),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     dist.DistInfo(3, 4, 0)),
    ({}, dist.DistInfo(0, 1, 0)),
])
def test_dist_info_from_each_launcher(monkeypatch, env, want):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist.dist_info() == want


def test_the_local_rank_picks_the_gpu(monkeypatch):
    """Global rank 9 of a 2 x 8 job is local rank 1 of its node: cuda:1 (never cuda:9)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert dist.device_for(dist.DistInfo(9, 16, 1).local_rank) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="local rank 9 but this node has only 8"):
        dist.device_for(9)
    assert dist.device_for(3, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.device_for(1) == torch.device("cpu")


def test_bad_ranks_are_named():
    with pytest.raises(ValueError, match="rank=3 for world_size=3"):
        dist.DistInfo(3, 3)
    with pytest.raises(ValueError, match="both --rank and --world-size"):
        dist.dist_info(rank=1)
