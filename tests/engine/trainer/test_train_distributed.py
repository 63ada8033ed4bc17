"""ZeRO-3 with 2 CPU ranks (gloo, deepspeed launcher) gives the gradients of a single process without DeepSpeed.

The same file is the worker: `deepspeed --num_gpus 2 tests/engine/trainer/test_train_distributed.py --out F` builds a
tiny
tied-embedding Llama, wraps it with the engine's FusionStep under ZeRO-3 and runs the engine's own
`run_window` for a few optimizer steps (SGD, no clipping: a wrong loss normalization would change the
update, which AdamW's scale invariance would hide). Each rank takes its share of a fixed list of
micro-batches that mixes both modes, with different lengths per mode and a teacher with another
vocabulary. The test replays every micro-batch in one process with plain torch autograd and the float64
reference backend (an implementation independent of the engine's row selection and normalization) and
compares the per-step loss and the final parameters.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import fusion_batch, fusion_vocab_maps

WORLD, ACCUM, STEPS, T, K, V, V_T = 2, 2, 3, 2, 4, 384, 500
WEIGHTS = [(1.0, 0.0), (1.0, 0.5), (0.1, 1.0)]  # (w_infer, w_train) per step; step 0 skips train mode


def make_lm(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0)
    lm = LlamaForCausalLM(cfg)
    with torch.no_grad():
        lm.model.embed_tokens.weight.normal_(0, 1.0)
    lm.config.use_cache = False
    return lm


def vocab_maps():
    return fusion_vocab_maps(V, V_T)


def make_batch(g, mode: int, B: int, L: int, tag: str) -> dict:
    return fusion_batch(g, mode, B, L, V=V, V_T=V_T, K=K, tag=tag)


def make_problem():
    """micro[step][global micro index] = {"infer": batch, "train": batch} (infer L=9, train L=12)."""
    from profuser.engine.config import MODE_ID

    g = torch.Generator().manual_seed(2)
    infer, train = MODE_ID["infer"], MODE_ID["train"]
    return [[{"infer": make_batch(g, infer, 2, 9, f"i{s}{m}"), "train": make_batch(g, train, 3, 12, f"t{s}{m}")}
             for m in range(WORLD * ACCUM)] for s in range(STEPS)]


LR = 0.5


# ---------------------------------------------------------------------------------------------------- worker

def worker(out: str) -> None:
    from profuser.engine.dist import setup_distributed, teardown_distributed

    info, device = setup_distributed()
    rank = info.rank
    assert info.world_size == WORLD
    try:
        for tied in (True, False):  # one launch for both: the launcher + imports dominate the test's time
            worker_run(f"{out}.{'tied' if tied else 'untied'}", tied, rank, device)
        torch.distributed.barrier()
    finally:
        teardown_distributed()  # what `profuser train` does: a group left to interpreter exit can abort


def worker_run(out: str, tied: bool, rank: int, device) -> None:
    from profuser.engine.config import load_config
    from profuser.engine.trainer.deepspeed_setup import build_engine
    from profuser.engine.trainer.step import run_window
    cfg = load_config(None, ["optim.grad_clip=0", f"optim.grad_accum={ACCUM}", "data.micro_batch_size=2",
                             "optim.decay=constant", "loss.backend=chunked",
                             "deepspeed.zero_optimization.stage=3",
                             "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"])
    lm = make_lm(tied)
    opt = torch.optim.SGD(lm.parameters(), lr=LR)
    engine, _, stage = build_engine(cfg, lm, vocab_maps(), torch.float32, optimizer=opt)
    assert stage == 3 and engine.module.lm.get_output_embeddings().weight.numel() == 0  # really partitioned
    losses = []
    for s, micro in enumerate(make_problem()):
        weights = dict(zip(("infer", "train"), WEIGHTS[s]))
        modes = [m for m in ("infer", "train") if weights[m] > 0]
        mine = micro[rank * ACCUM:(rank + 1) * ACCUM]
        window = [[mb[m] for m in modes] for mb in mine]
        result = run_window(engine, window, modes, weights, pad_id=0, device=device)
        losses.append(result.loss)
    import deepspeed

    params = {}
    for name, p in engine.module.lm.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            params[name] = p.detach().clone()
    if rank == 0:
        torch.save({"losses": losses, "params": params}, out)
    engine.destroy()  # the next run builds its own engine in this process: release this one's ZeRO-3 hooks


# ---------------------------------------------------------------------------------------------------- reference

def reference_run(tied: bool):
    from profuser.kernels import fusion_loss

    lm = make_lm(tied)
    opt = torch.optim.SGD(lm.parameters(), lr=LR)
    vms = vocab_maps()
    losses = []
    for s, micro in enumerate(make_problem()):
        w = dict(zip(("infer", "train"), WEIGHTS[s]))
        counts = {m: sum(mb[m]["n_tokens"] for mb in micro) for m in w}
        total = 0.0
        for mb in micro:
            for m, b in mb.items():
                if w[m] == 0:
                    continue
                h = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                Bm, L, H = h.shape
                ssum = fusion_loss(h.reshape(-1, H).double(), lm.lm_head.weight.double(), b["labels"].reshape(-1),
                                   b["teacher_ids"].reshape(T, -1, K), b["teacher_logprobs"].reshape(T, -1, K),
                                   b["teacher_weights"].reshape(T, -1), vocab_maps=vms, reduction="sum",
                                   backend="reference")
                total = total + w[m] * ssum / counts[m]
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    return losses, dict(lm.named_parameters())


@pytest.mark.distributed
def test_zero3_two_ranks_matches_single_process(tmp_path):
    root = Path(__file__).resolve().parents[3]
    # the worker imports the tests' helpers package as this process does
    tests_dir = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache/profuser/torch_extensions")))
    out = tmp_path / "ds.pt"
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(WORLD), "--master_port", str(port),
           __file__, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for tied in (True, False):
        compare(torch.load(f"{out}.{'tied' if tied else 'untied'}"), tied)


def compare(got: dict, tied: bool) -> None:
    ref_losses, ref_params = reference_run(tied)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert set(got["params"]) == set(ref_params)
    for name, p in ref_params.items():
        torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-4, atol=2e-6,
                                   msg=lambda m, name=name: f"{name} (tied={tied}): {m}")
    # and the run really moved the parameters (a no-op engine would fail above only by luck)
    assert not torch.allclose(ref_params["model.norm.weight"], torch.ones_like(ref_params["model.norm.weight"]))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()
    worker(a.out)
