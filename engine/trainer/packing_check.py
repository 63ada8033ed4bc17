"""Before the first packed step: does THIS model, with THIS attention implementation, keep attention inside
each example of a packed row?

Packing (loader/packing.py) is only correct if the backbone isolates the examples of a row: sdpa / eager /
flex through the block-diagonal mask transformers builds from position_ids, flash-attention through the
varlen bounds the batch carries. A model whose attention ignores them (custom modelling code, another
transformers version, an attention kernel that drops the arguments) lets every token attend to the examples
before it in its row, and the run would train on the wrong context without a warning. The tests pin the
behaviour for the pinned transformers on the CPU; this check asks the model itself, once per run, on the
run's own device and dtype:

    two rows [a | b] and [a' | b], a' a different example of a's length, b the same, the same padding;
    one no-grad forward of the backbone through the training step's own arguments (packing.forward_kwargs);
    leak = max |h(b in row 0) - h(b in row 1)| / rms(h(b in row 0)).

With attention isolated, b's hidden states are computed from b alone by the same kernels on the same shapes:
leak is 0 or rounding (<= 1e-5 measured in fp32 on the CPU). Attention that crosses examples moves them by a
sizeable fraction of their own scale (0.1-1). The bound, 1e-3 in fp32 and 2e-2 in 16-bit types, sits
between. Costs one forward of 2 x 24 tokens without the vocabulary head.
"""

from __future__ import annotations

import torch
from torch import nn

from ..loader.packing import forward_kwargs, varlen_bounds

BOUND = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_BOUND = 2e-2


class PackingUnsupportedError(RuntimeError):
    """The model's attention crosses the examples of a packed row; names the model, the attention
    implementation, the measured leak and the way out (data.packing=false)."""


def packed_rows(vocab_size: int, device: torch.device, *, a: int = 7, b: int = 11, width: int = 24,
                seed: int = 0) -> dict:
    """Two packed rows [a | b | padding] and [a' | b | padding] (module docstring): input_ids and
    position_ids [2, width] int64 on `device`, cu_seq_lens, max_seq_len, and the slice of b."""
    g = torch.Generator().manual_seed(seed)
    low = min(10, vocab_size - 1)  # clear of the usual special ids
    ids = torch.randint(low, vocab_size, (2, width), generator=g)
    ids[1, b + a:] = ids[0, b + a:]
    ids[1, a:a + b] = ids[0, a:a + b]  # the same b, after a different a
    pos = torch.cat([torch.arange(a), torch.arange(b), torch.arange(width - a - b)]).expand(2, width).clone()
    cu, longest = varlen_bounds(pos)
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "cu_seq_lens": cu.to(device),
            "max_seq_len": longest, "b": slice(a, a + b)}


@torch.no_grad()
def measure_leak(backbone: nn.Module, attn_implementation: str | None, vocab_size: int,
                 device: torch.device) -> float:
    """The relative change of an example's hidden states when its row neighbour changes (module docstring)."""
    batch = packed_rows(vocab_size, device)
    was_training = backbone.training
    backbone.eval()  # no dropout: the two rows must see the same function
    try:
        hidden = backbone(input_ids=batch["input_ids"], use_cache=False,
                          **forward_kwargs(batch, attn_implementation))[0].float()
    finally:
        backbone.train(was_training)
    h0, h1 = hidden[0, batch["b"]], hidden[1, batch["b"]]
    scale = h0.pow(2).mean().sqrt().clamp_min(1e-12)
    return float((h0 - h1).abs().max() / scale)


def check_packed_attention(backbone: nn.Module, config, device: torch.device, dtype: torch.dtype,
                           what: str) -> float:
    """Raise PackingUnsupportedError if the backbone's attention crosses packed examples; returns the leak.
    `config`: the model's transformers config (its attention implementation and vocabulary size); `what`:
    the model's name for the message. Every rank runs it (under ZeRO-3 the forward is collective)."""
    impl = getattr(config, "_attn_implementation", None)
    leak = measure_leak(backbone, impl, int(config.get_text_config().vocab_size), device)
    bound = BOUND.get(dtype, HALF_BOUND)
    if not leak <= bound:  # NaN fails too
        raise PackingUnsupportedError(
            f"data.packing: {what} with attn_implementation={impl!r} lets attention cross the examples of a "
            f"packed row (an example's hidden states moved by {leak:.3g} of their scale when its neighbour "
            f"changed; isolated: <= {bound:g}); set data.packing=false, or another model.attn_implementation")
    return leak
