"""Loading a model or tokenizer from a spec, the dtype rule, and the pad id rule."""

from __future__ import annotations

import json
import os

import torch

from ..config import DTYPES
from .resolve import resolve_model, resolve_tokenizer


def load_tokenizer(spec: str | os.PathLike):
    """The fast tokenizer of a model spec (offsets mapping available for both aliases)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_tokenizer(spec)))


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa"):
    """A causal LM in eval mode from a model spec.

    Args:
        dtype: parameter dtype (bf16 on GPU, fp32 on CPU is what teach/generate use).
        attn_implementation: "sdpa" (default), "eager", "flash_attention_2" (needs flash-attn, GPU only).
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model(spec)
    adapter = folder / "adapter_config.json"
    if adapter.is_file() and not (folder / "config.json").is_file():  # a LoRA export: its base + the adapter
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(str(resolve_model(base)), dtype=dtype,
                                                     attn_implementation=attn_implementation)
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()



def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype name of config.DTYPES (aliases fp32 / bf16 / fp16 included) -> torch.dtype.
    "auto" is bf16 on CUDA and fp32 elsewhere (CPU bf16 matmuls are slow and less exact)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, DTYPES[name])



def pad_id(tok) -> int:
    """The one rule for the id that pads a batch of this tokenizer's sequences: its pad token, else its EOS,
    else 0. Padded positions are masked everywhere (attention, labels, stored rows), so any id is correct;
    the rule only has to be the same in every pass, the loader and the trainer."""
    for i in (tok.pad_token_id, tok.eos_token_id):
        if i is not None:
            return int(i)
    return 0
