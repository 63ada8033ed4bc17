"""Tiny random models with real tokenizers (tests)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .loading import load_tokenizer


def tiny_model_dir(tokenizer_spec: str | os.PathLike, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                   seed: int = 0, out_dir: str | os.PathLike) -> Path:
    """Save a tiny random-weight Llama with a real tokenizer as an HF folder.

    The vocabulary size is len(tokenizer) (so every token id, added specials included, has a row);
    embeddings are tied. The weights depend only on (vocab, hidden, layers, heads, seed).

    Args:
        tokenizer_spec: alias or local folder whose tokenizer (and chat template) the model uses.
        hidden, layers, heads: model size (hidden % heads == 0).
        out_dir: destination folder (created).
    Returns:
        out_dir as a Path.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"tiny_model_dir: hidden={hidden} is not divisible by heads={heads}")
    tok = load_tokenizer(tokenizer_spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # a random init puts every logit near 0; a larger embedding scale gives peaked, varied
        # distributions, so top-k ties (which would make order comparisons flaky) are unlikely
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out
