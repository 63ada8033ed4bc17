"""The multi-node path, exercised: two "nodes" on this machine (two `torchrun --nnodes 2` node processes on
localhost, one rank each, gloo), running the documented script entry `engine/train.py`.

Global rank, local rank and world size each have one job (engine/dist.py): here both ranks have local
rank 0, so code that mistook the local rank for the global one would make both ranks read the same
shards (other losses), both write the run's shared files (duplicate metrics rows), or collide in the
checkpoint. The run must equal the same job on ONE node with two processes (global ranks, data and math
are the same; only the node split differs), and the ZeRO-3 engine itself is checked against a single
process without DeepSpeed in test_train_distributed.py. A resume on another world size is refused with a
named error (docs/training.md, "Resume").
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import overrides, training_data

REPO = Path(__file__).resolve().parents[3]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                 str(Path.home() / ".cache/profuser/torch_extensions")))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train_args(data, out) -> list[str]:
    return ["engine/train.py", *overrides(data, out, **{"optim.max_steps": 4, "checkpoint.every": 2,
                                                        "data.shuffle_buffer": 4})]


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("multinode"), n=32, shard_size=8)  # 4 shards: 2 per rank


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """(2 nodes x 1 process, 1 node x 2 processes): outputs and logs."""
    root = tmp_path_factory.mktemp("runs")
    two_nodes, one_node = root / "two_nodes", root / "one_node"
    port = free_port()
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *train_args(data, two_nodes)],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    for r, (p, log) in enumerate(zip(nodes, logs)):
        assert p.returncode == 0, f"node {r}:\n{log[-4000:]}"
    single = subprocess.run([TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(free_port()),
                             *train_args(data, one_node)], cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    return two_nodes, one_node, logs


@pytest.mark.distributed
def test_ranks_have_their_own_jobs(runs):
    two_nodes, _, logs = runs
    # each node's process knows its global rank; both are local rank 0 of their node
    assert "rank 0 of 2 (local rank 0)" in logs[0] and "rank 1 of 2 (local rank 0)" in logs[1]
    # rank 0 alone writes the run's shared files: one metrics row per step, one resolved config
    steps = [r["step"] for r in metrics(two_nodes) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert "resolved config" in logs[0] and "resolved config" not in logs[1]
    # every global rank saved its own trainer state; the checkpoint is complete and final
    ckpt = two_nodes / "checkpoints" / "step00000004"
    assert sorted(p.name for p in ckpt.glob("trainer_rank*.pt")) == ["trainer_rank00000.pt", "trainer_rank00001.pt"]
    assert (two_nodes / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert (two_nodes / "final" / "model.safetensors").is_file()  # exported once (rank 0), ZeRO-3 consolidated


@pytest.mark.distributed
def test_node_split_does_not_change_training(runs):
    two_nodes, one_node, _ = runs
    a, b = metrics(two_nodes), metrics(one_node)
    a, b = ([r for r in m if r["kind"] == "train"] for m in (a, b))
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # the same shards on the same global ranks
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_infer", "loss_train"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)


@pytest.mark.distributed
def test_resume_on_another_world_size_is_refused(runs, data):
    two_nodes, _, _ = runs
    proc = subprocess.run([sys.executable, "-m", "profuser.engine.train",
                           *overrides(data, two_nodes, **{"optim.max_steps": 6})],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "was written by 2 rank(s) but this run has 1" in proc.stderr
