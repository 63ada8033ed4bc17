"""Global rank, local rank and world size: each read from where launchers put it and used for one job."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

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


# ----------------------------------------------------------------------------------------------------
# host memory of a CPU process (keep_freed_memory / release_freed_memory). Each case runs in its own process:
# the malloc settings are process-wide and cannot be undone.

PROBE = r"""
import json, resource, sys, torch
from profuser.engine import dist
device = dist.device_for(0, sys.argv[1])  # the CPU here ("auto" or "cpu"): applies keep_freed_memory
n = 1 << 27  # 512 MiB of float32; a step-like pattern: two large buffers of different sizes, a small one

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

rss0, faults0 = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    x = torch.empty(n).fill_(1.0)  # fill: touch every page
    y = torch.empty(n // 3).fill_(2.0)
    del x
    z = torch.ones(100)
    del y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
held = rss_mb() - rss0
dist.release_freed_memory()
print(json.dumps({"device": str(device), "applied": dist.keep_freed_memory(),
                  "faults_per_page": faults / 12 / (n // 1024), "held_mb": held, "after_release_mb": rss_mb() - rss0}))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or
                                torch.cuda.is_available(), reason="glibc on a CPU-only machine")


def malloc_probe(device: str = "auto", **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PROFUSER_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE, device], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_cpu_device_keeps_freed_buffers_and_releases_them_on_request(device):
    """Fewer page faults than glibc's default (which maps and zeroes every large buffer afresh: 1.33 faults
    per page of x per cycle here), at the cost of free pages held (heap fragmentation), which
    release_freed_memory hands back."""
    kept, system = malloc_probe(device), malloc_probe(device, PROFUSER_MALLOC="system")
    assert kept["device"] == "cpu" and kept["applied"] is True and system["applied"] is False
    assert system["faults_per_page"] > 1.2, system  # the baseline the setting removes
    assert kept["faults_per_page"] < 0.6 * system["faults_per_page"], (kept, system)
    assert system["held_mb"] < 100, system
    assert kept["after_release_mb"] < 100, kept


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"LD_PRELOAD": "libjemalloc.so.2-absent"}])
def test_users_own_allocator_settings_win(env):
    assert malloc_probe(**env)["applied"] is False


def test_a_build_lock_left_by_a_killed_process_is_cleared_and_a_live_build_is_waited_for(tmp_path, monkeypatch):
    """torch's JIT build lock (an empty `lock` file, waited on forever) left by a process killed mid-build made
    every later CPU training run sleep in DeepSpeed's init_distributed. The guard removes a stale one, and
    leaves the lock of a build that a live process (holding the sidecar flock) is running until it ends."""
    import fcntl
    import threading

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "some_op"
    folder.mkdir()
    (folder / "lock").touch()  # its builder was killed
    logs = []
    with dist.extension_build_guard("some_op", log=logs.append):
        assert not (folder / "lock").exists()
    assert len(logs) == 1 and str(folder / "lock") in logs[0] and "some_op" in logs[0]

    entered = threading.Event()
    with open(folder / "profuser.flock", "a") as held:  # a live profuser process is building
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        (folder / "lock").touch()

        def other():
            with dist.extension_build_guard("some_op", log=logs.append):
                entered.set()

        t = threading.Thread(target=other)
        t.start()
        assert not entered.wait(0.5) and (folder / "lock").exists()  # waits; the live build's lock stays
        (folder / "lock").unlink()  # the build ends: torch removes its lock, then the flock is released
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    t.join(60)
    assert entered.is_set() and len(logs) == 1
