"""The training step in one pass (issue #13, item 3): one fusion_loss call for both modes equals the two
per-mode calls it replaced, and a micro-step reads nothing back from the device.

Host syncs are counted on the CPU (engine/tools/sync_counter.py: every torch entry point that forces one on CUDA).
The student's own forward is not ours: transformers' mask preparation reads the device once per
forward (an all-ones or packed-sequence check), so the count pauses inside the backbone; everything else of
the micro-step (row gathering, the loss, its backward, the statistics) must not read the device at all.
"""

from __future__ import annotations

import pytest
import torch

from helpers import fusion_batch, fusion_vocab_maps
from profuser.engine.config import MODE_ID, LossConfig
from profuser.engine.tools.sync_counter import count_syncs, paused_forward
from profuser.engine.trainer import step as step_mod
from profuser.engine.trainer.step import STAT_COLUMNS, FusionStep, merge_modes, run_window
from profuser.kernels import fusion_loss

V, V_T, T, K = 61, 80, 2, 4


def make_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    lm = LlamaForCausalLM(cfg)
    lm.config.use_cache = False
    return lm


def vocab_maps():
    return fusion_vocab_maps(V, V_T)


def make_batch(g, mode: str, B: int, L: int) -> dict:
    return fusion_batch(g, MODE_ID[mode], B, L, V=V, V_T=V_T, K=K, tag=mode)


@pytest.mark.parametrize("backend,missing_mass", [("chunked", "renormalize"), ("reference", "tail_bucket"),
                                                  ("triton", "renormalize")])
def test_one_call_equals_two_calls(backend, missing_mass):
    """loss and every parameter gradient of the one-call step == sum_m w_m * (per-mode mean over N_m)."""
    g = torch.Generator().manual_seed(3)
    batches = {"infer": make_batch(g, "infer", 2, 9), "train": make_batch(g, "train", 3, 12)}
    batch = merge_modes([batches["infer"], batches["train"]], pad_id=0)
    weights, counts = {"infer": 0.3, "train": 1.7}, {"infer": 31.0, "train": 44.0}
    cfg = LossConfig(lam=0.6, backend=backend, missing_mass=missing_mass)

    lm = make_lm()
    step = FusionStep(lm, cfg, vocab_maps())
    scale = torch.zeros(len(MODE_ID))
    for m in weights:
        scale[MODE_ID[m]] = weights[m] / counts[m]
    loss, stats = step(batch, scale)
    loss.backward()
    one = {n: p.grad.clone() for n, p in lm.named_parameters()}

    lm2 = make_lm()  # the two-call formulation, as the engine ran it before
    total, mode_stats = 0.0, {}
    for m, b in batches.items():
        hidden = lm2.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
        B, L, H = hidden.shape
        sel = b["labels"].reshape(-1) != -100
        ids = b["teacher_ids"].reshape(T, B * L, K)[:, sel]
        loss_m, mode_stats[m] = fusion_loss(
            hidden.reshape(B * L, H)[sel], lm2.lm_head.weight, b["labels"].reshape(-1)[sel], ids,
            b["teacher_logprobs"].reshape(T, B * L, K)[:, sel], b["teacher_weights"].reshape(T, -1)[:, sel],
            vocab_maps=vocab_maps(), lam=0.6, missing_mass=missing_mass, num_items=counts[m], backend=backend,
            return_stats=True)
        total = total + weights[m] * loss_m
    total.backward()
    torch.testing.assert_close(loss.detach(), total.detach(), rtol=1e-5, atol=1e-6)
    for n, p in lm2.named_parameters():
        torch.testing.assert_close(one[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # per-mode statistics: sums over each mode's rows, on the device
    assert stats.shape == (len(MODE_ID), len(STAT_COLUMNS)) and stats.dtype == torch.float64
    assert all(float(stats[MODE_ID[m], 1]) > 0 for m in batches)
    # the teachers' stored top-k mass and the part that maps into the student's vocabulary, per mode
    maps = vocab_maps()
    for m, b in batches.items():
        sel = b["labels"].reshape(-1) != -100
        kept = stored = 0.0
        for t in range(T):
            ids = b["teacher_ids"][t].reshape(-1, K)[sel].long()
            p = b["teacher_logprobs"][t].reshape(-1, K)[sel].double().exp()
            w = b["teacher_weights"][t].reshape(-1)[sel].double().unsqueeze(1)
            mapped = ids >= 0 if maps[t] is None else (ids >= 0) & (maps[t].long()[ids.clamp_min(0)] >= 0)
            stored += float((w * p * (ids >= 0)).sum())
            kept += float((w * p * mapped).sum())
        assert 0 < kept < stored  # teacher 1's map drops ~20% of its ids
        assert float(stats[MODE_ID[m], 3]) == pytest.approx(kept, rel=1e-5)
        assert float(stats[MODE_ID[m], 4]) == pytest.approx(stored, rel=1e-5)
        # the student's mass on the support, summed over the mode's KD rows, and those rows: the mode's own call
        st = mode_stats[m]
        n_kd = int((st.row_mass > 0).sum())
        assert 0 < n_kd and float(stats[MODE_ID[m], 6]) == n_kd
        assert float(stats[MODE_ID[m], 5]) == pytest.approx(float(st.row_mass.double().sum()), rel=1e-4)
        assert float(stats[MODE_ID[m], 5]) / n_kd == pytest.approx(float(st.student_mass_on_support), rel=1e-4)


def test_count_syncs_sees_a_sync():
    """The counter itself: nonzero, item and a boolean index are seen (else the next tests prove nothing)."""
    x = torch.arange(5)
    with count_syncs() as c:
        (x > 2).nonzero()
        x.sum().item()
        x[x > 1]
    assert c == {"nonzero": 1, "item": 1, "bool-index": 1}


@pytest.mark.parametrize("backend,missing_mass", [("chunked", "renormalize"), ("chunked", "tail_bucket"),
                                                  ("triton", "tail_bucket")])
def test_micro_step_has_no_host_sync(backend, missing_mass):
    g = torch.Generator().manual_seed(4)
    batch = merge_modes([make_batch(g, "infer", 2, 9), make_batch(g, "train", 3, 12)], pad_id=0)
    assert batch["right_padded"]  # so the backbone gets no mask (the module doc of trainer/step.py)
    assert (batch["attention_mask"] == 0).any()  # ... though the batch has padding
    lm = make_lm()
    paused_forward(lm.model)
    step = FusionStep(lm, LossConfig(backend=backend, missing_mass=missing_mass), vocab_maps())
    scale = torch.tensor([0.02, 0.05])
    with count_syncs() as c:
        loss, stats = step(batch, scale)
        loss.backward()
    assert c == {}, f"host syncs inside the micro-step: {c}"


class FakeEngine:
    """What run_window needs of a DeepSpeed engine: call, backward, step (plain SGD-free bookkeeping)."""

    def __init__(self, module):
        self.module, self.steps = module, 0

    def __call__(self, *a):
        return self.module(*a)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        self.steps += 1


def test_window_reads_the_device_once(monkeypatch):
    """A window of 3 micro-steps: one all-reduce and one host read (at the boundary), none per micro-step."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(5)
    window = [[make_batch(g, "infer", 2, 9), make_batch(g, "train", 2, 10)] for _ in range(3)]
    lm = make_lm()
    paused_forward(lm.model)
    engine = FakeEngine(FusionStep(lm, LossConfig(backend="chunked"), vocab_maps()))
    reduces = []
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: reduces.append(t.numel()))
    monkeypatch.setattr(step_mod, "to_device", lambda b, d: b)
    with count_syncs() as c:
        res = run_window(engine, window, ["infer", "train"], {"infer": 0.5, "train": 1.0}, pad_id=0,
                         device=torch.device("cpu"))
    assert c == {"tolist": 1}, c
    assert len(reduces) == 2  # the token counts (stay on the device) and the boundary read
    assert engine.steps == 3 and res.tokens == sum(b["n_tokens"] for mb in window for b in mb)
    assert set(res.modes) == {"infer", "train"} and all(m.ce > 0 for m in res.modes.values())


def test_nonfinite_micro_step_is_named_before_the_optimizer_step(monkeypatch):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(6)
    window = [[make_batch(g, "train", 2, 9)] for _ in range(3)]
    module = FusionStep(make_lm(), LossConfig(backend="chunked"), vocab_maps())
    forward = module.forward
    calls = {"n": 0}

    def poisoned(batch, scale):
        calls["n"] += 1
        loss, st = forward(batch, scale)
        return (loss * float("nan") if calls["n"] == 2 else loss), st

    module.forward = poisoned
    engine = FakeEngine(module)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)
    monkeypatch.setattr(step_mod, "to_device", lambda b, d: b)
    with pytest.raises(step_mod.NonFiniteLossError, match="train-0"):
        run_window(engine, window, ["train"], {"infer": 0.0, "train": 1.0}, pad_id=0, device=torch.device("cpu"))
    assert engine.steps == 2  # the boundary step (the optimizer) never ran
