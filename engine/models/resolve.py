"""Model specs: an alias (models/aliases.py), a local Hugging Face folder, or a hub id ("owner/name", optionally
"owner/name@revision") resolved through the Hugging Face cache, each to a folder that `from_pretrained` loads
offline; what a store records of a model (canonical spec, fingerprint).

Hub ids: huggingface_hub.snapshot_download into the cache ($HF_HUB_CACHE, default ~/.cache/huggingface/hub)
- with HF_HUB_OFFLINE=1 (the Makefile's and the tests' setting) only from the cache, with one line naming the id
when it is not there. A local folder of the same name wins over a hub id.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .aliases import ALIASES, cache_root
from .gguf import MARKER, build_model, build_tokenizer, convert_once

_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
_TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `spec` has the shape of a hub id and names no local path, else None."""
    key, _, rev = str(spec).partition("@")
    parts = key.split("/")
    if len(parts) != 2 or not all(parts) or key.startswith((".", "~")) or Path(key).expanduser().exists():
        return None
    return key, rev or None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(spec: str, repo: tuple[str, str | None], files: list[str], *, repo_type: str = "model",
                 what: str = "model spec") -> Path:
    """The cached snapshot folder of a hub id (downloaded first when the network is allowed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = repo
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=files,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                      local_files_only=hub_offline()))
    except LocalEntryNotFoundError:
        where = os.environ.get("HF_HUB_CACHE") or "the Hugging Face cache"
        raise ValueError(f"{what} {spec!r}: hub id {repo_id}" + (f" at {revision}" if revision else "")
                         + f" is not in {where} and hub downloads are off (HF_HUB_OFFLINE=1): download it where "
                         f"there is network (`hf download {repo_id}`) or unset HF_HUB_OFFLINE") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ValueError(f"{what} {spec!r}: hub id {repo_id} could not be fetched ({exc})") from None


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
        return convert_once(cache_root() / "models" / key, lambda out: build_model(alias, out),
                             lambda: {"alias": key, "gguf": str(alias.gguf()), "license": alias.license})
    path = Path(key).expanduser()
    repo = hub_id(key)
    if repo is not None:
        path = hub_snapshot(key, repo, _MODEL_FILES)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ValueError(f"model spec {key!r}: folder {path} has no config.json (not an HF model folder)")
        return path
    raise ValueError(f"model spec {key!r} is neither a known alias ({', '.join(sorted(ALIASES))}), a local "
                     "folder nor a hub id (owner/name)")


def resolve_tokenizer(spec: str | os.PathLike) -> Path:
    """Like `resolve_model` but only the tokenizer: an alias never triggers a model conversion.

    Uses the converted model folder when it already exists, else a tokenizer-only cache.
    """
    key = str(spec)
    if key in ALIASES:
        model_dir = cache_root() / "models" / key
        if (model_dir / MARKER).is_file():
            return model_dir
        alias = ALIASES[key]
        return convert_once(cache_root() / "tokenizers" / key, lambda out: build_tokenizer(alias, out),
                             lambda: {"alias": key, "gguf": str(alias.gguf()), "tokenizer_only": True})
    repo = hub_id(key)
    path = hub_snapshot(key, repo, _TOKENIZER_FILES) if repo is not None else Path(key).expanduser()
    if path.is_dir():
        return path
    raise ValueError(f"tokenizer spec {key!r} is neither a known alias ({', '.join(sorted(ALIASES))}), a local "
                     "folder nor a hub id (owner/name)")



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
    return key if key in ALIASES or hub_id(key) else str(Path(key).expanduser().resolve())


def model_fingerprint(spec: str | os.PathLike) -> str:
    """The same model wherever its folder lives: "alias:<name>" for an alias; for a local folder, sha256 over
    its config, tokenizer and template files and the names and sizes of its weight files (hashing the
    weights themselves would cost minutes for a 7B model at every start)."""
    key = str(spec)
    if key in ALIASES:
        return f"alias:{key}"
    folder = resolve_model(key) if hub_id(key) else Path(key).expanduser()
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



def model_name(spec: str | os.PathLike) -> str:
    """A short readable name for a spec (alias, or the folder name): used as the default source name."""
    key = str(spec)
    if key in ALIASES:
        return key
    repo = hub_id(key)
    return repo[0].split("/")[1] if repo else Path(key).expanduser().resolve().name
