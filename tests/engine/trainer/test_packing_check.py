"""The start-up packing check (trainer/packing_check.py): it passes where attention keeps a packed row's
examples apart (sdpa, eager, a varlen flash-attention stand-in given the batch's bounds; Llama and Gemma-3 with
sliding windows) and stops the run, named, where attention crosses them (position ids dropped; flash-attention
without the bounds, which is what transformers 5.24 does for a batch of several rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from profuser.engine.loader.packing import varlen_bounds
from profuser.engine.models import load_model, tiny_model_dir
from profuser.engine.trainer.packing_check import PackingUnsupportedError, check_packed_attention, measure_leak

CPU = torch.device("cpu")
STUDENT = "smollm2-135m-instruct"


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """A plain-torch stand-in for flash-attention's varlen path, registered under a name with "flash" in it:
    causal attention inside the sequences cu_seq_lens_q bounds; without them one sequence per row (what
    transformers' flash path does with several rows and no bounds). query [B, Hq, L, D] -> [B, L, Hq, D]."""
    B, Hq, L, _ = query.shape
    k = key.repeat_interleave(Hq // key.shape[1], dim=1)
    v = value.repeat_interleave(Hq // value.shape[1], dim=1)
    seq = torch.zeros(B * L, dtype=torch.long)
    cu = kw.get("cu_seq_lens_q")
    if cu is not None:
        seq[cu[1:-1].long()] = 1
    seq = seq.cumsum(0).view(B, L) if cu is not None else seq.view(B, L)
    mask = (seq[:, :, None] == seq[:, None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask[:, None], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return load_model(tiny_model_dir(STUDENT, hidden=64, layers=2, heads=4, out_dir=d)).float()


@pytest.fixture(scope="module")
def flash_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("flash_reference", varlen_reference)
    AttentionMaskInterface.register("flash_reference", flash_attention_mask)
    return "flash_reference"


def gemma3(sliding_window: int = 4):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                           sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).float()


def test_varlen_bounds_cut_at_every_restart_and_every_row():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    cu, longest = varlen_bounds(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 12] and longest == 6


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_isolating_attention_passes(llama, impl):
    llama.set_attn_implementation(impl)
    assert check_packed_attention(llama.model, llama.config, CPU, torch.float32, STUDENT) <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gemma3_sliding_windows_stay_inside_examples(impl):
    lm = gemma3()
    lm.set_attn_implementation(impl)
    assert check_packed_attention(lm.model, lm.config, CPU, torch.float32, "gemma3") <= 1e-5


def test_flash_attention_gets_the_bounds_and_stays_inside(llama, flash_reference):
    llama.config._attn_implementation = flash_reference  # set_attn_implementation would import flash_attn
    try:
        assert check_packed_attention(llama.model, llama.config, CPU, torch.float32, STUDENT) <= 1e-5
        # the same kernel without the bounds (what transformers does for several rows) crosses examples
        assert measure_leak(llama.model, "no-bounds", llama.config.vocab_size, CPU) > 1e-2
    finally:
        llama.set_attn_implementation("sdpa")


class DropPositions(nn.Module):
    """A backbone whose attention ignores position_ids (custom modelling code): one causal sequence per row."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        return self.inner(**{**kw, "position_ids": None})


def test_attention_that_crosses_examples_stops_the_run_named(llama):
    llama.set_attn_implementation("sdpa")
    with pytest.raises(PackingUnsupportedError, match=r"data\.packing: my-model with attn_implementation='sdpa' "
                                                      r"lets attention cross .*set data\.packing=false"):
        check_packed_attention(DropPositions(llama.model), llama.config, CPU, torch.float32, "my-model")
    # in 16-bit types the bound is looser and a leak still fails
    with pytest.raises(PackingUnsupportedError):
        check_packed_attention(DropPositions(llama.model), llama.config, CPU, torch.bfloat16, "my-model")


def test_the_check_leaves_train_mode_and_rng_alone(llama):
    llama.set_attn_implementation("sdpa")
    llama.train()
    state = torch.random.get_rng_state()
    check_packed_attention(llama.model, llama.config, CPU, torch.float32, STUDENT)
    assert llama.model.training and torch.equal(torch.random.get_rng_state(), state)
