"""GGUF -> safetensors conversion of the package-shipped aliases, once, under a lock, with an atomic rename.

Why convert the GGUFs once. Loading a GGUF dequantizes every tensor in Python (14 s for SmolLM2, 33 s and
3.4 GB RSS for Gemma) and transformers 5 refuses to `save_pretrained` a GGUF-loaded model. So on first use
we load it, drop `config.quantization_config`, rebuild the model with `from_config`, copy the (already
dequantized, fp32) state dict and save a plain safetensors folder under `$PROFUSER_CACHE/models/<alias>`.
Later loads take well under a second. The tokenizer alone is cached separately under
`$PROFUSER_CACHE/tokenizers/<alias>` so tests that only need a vocabulary never pay for a model conversion.
Conversions hold a file lock (two ranks or two pytest workers never convert at once) and write to a
temporary folder that is renamed when complete, so a killed conversion leaves no half-written cache behind.

Weights are *dequantized* Q4 weights: the models behave like the quantized originals, not like the
upstream bf16 checkpoints (the greedy answers match llama.cpp's).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..fileio import WriterLock
from .aliases import Alias

MARKER = "profuser_source.json"  # written last inside a converted folder: its presence means "complete"


def convert_once(final: Path, build: Callable[[Path], None], source: Callable[[], dict]) -> Path:
    """Run `build(tmp_dir)` once under a file lock, then rename tmp_dir to `final`.

    `source()` gives the provenance written into the marker (called only when converting).

    The marker file is written inside tmp_dir before the rename, so `final` exists only when complete.
    """
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(Path(str(final) + ".lock"), what=f"the conversion into {final}", wait=True, poll_s=0.2):
        if (final / MARKER).is_file():  # another process finished while we waited
            return final
        if final.exists():  # a folder without the marker: an interrupted older conversion
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(source(), indent=1))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def build_tokenizer(alias: Alias, out: Path) -> None:
    _gguf_tokenizer(alias.gguf()).save_pretrained(str(out))


def build_model(alias: Alias, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = alias.gguf()
    tok = _gguf_tokenizer(gguf)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    # a GGUF-loaded model "is quantized with gguf and not serializable": rebuild a plain one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # tied lm_head weights may be reported missing; anything else means the conversion is wrong
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> safetensors conversion of {alias.name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    del src
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
