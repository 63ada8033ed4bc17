"""Typed dataclass trees from YAML files and key=value overrides: the mechanism under every command's config.

    merge(path, flags, overrides) -> (tree, origins)   YAML file <- (key, value, flag) <- `key=value`, later wins
    build(Cls, tree, origins) -> Cls                   every key known, every value checked against its annotation
    config_path(spec)                                  a path, or the name of a config shipped in profuser.configs
    field_comments(Cls)                                the comment beside each field: the documentation of a key

What each command's options are lives in its dataclass (engine/config.py for training, the passes' own option
classes); config_cli.py generates the command-line flags from those dataclasses and resolves through here.
An unknown key or a wrong type is a ConfigError naming the dotted key and where its value came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

# old key -> new key (a clear error, never ignored)
RENAMED = {"data.nan_policy": "data.bad_row_policy", "demo.n_infer": "demo.n_pool",
           "log.tensorboard": "log.report_to (a list: [tensorboard, wandb, mlflow]; [] for none)"}


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key (and file)."""

    exit_code = 2



# ----------------------------------------------------------------------------------------------------
# type checking


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return `value` converted to annotation `tp` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}{key}: expected {_tname(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}{key}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{key}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}{key}: unsupported annotation {tp!r}")  # programming error


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _put(tree: dict, key: str, value: Any, origins: dict, where: str) -> None:
    """tree[a][b][c] = value for key "a.b.c" (missing levels created); origins of the key and its sections."""
    *path, last = key.split(".")
    for i, part in enumerate(path):
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{where}{key}: {'.'.join(path[: i + 1])} is not a section")
        origins.setdefault(".".join(path[: i + 1]), where)
    tree[last] = value
    origins[key] = where


def _origins(tree: dict, where: str, origins: dict, prefix: str = "") -> None:
    """origins[dotted key] = where, for every key of a YAML mapping (sections and their keys)."""
    for k, v in tree.items():
        origins[f"{prefix}{k}"] = where
        if isinstance(v, dict):
            _origins(v, where, origins, f"{prefix}{k}.")


def build(cls, values: dict, origins: dict, prefix: str = ""):
    """cls(**values) with every key known and every value checked against its field's annotation (nested
    sections recursively, a dict field taken as it is); ConfigError naming the key and where it came from."""
    hints, kwargs = typing.get_type_hints(cls), {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        key = prefix.rstrip(".") or "config"
        raise ConfigError(f"{origins.get(key, '')}{key}: expected a mapping, got {values!r}")
    for k in values:
        key = f"{prefix}{k}"
        if key in RENAMED:
            raise ConfigError(f"{origins.get(key, '')}{key}: renamed to {RENAMED[key]}")
        if k not in names:
            raise ConfigError(f"{origins.get(key, '')}{key}: unknown key (known: {', '.join(sorted(names))})")
    for name, f in names.items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build(hints[name], values.get(name, {}), origins, f"{key}.")
        elif name in values:
            kwargs[name] = _check_value(values[name], hints[name], key, origins.get(key, ""))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required (its --flag, `{key}:` in --config, or {key}=...)")
    return cls(**kwargs)


def read_yaml(spec: str | Path, origins: dict) -> dict:
    """A config file (a path or a shipped config's name) as a mapping; origins of its keys recorded."""
    path = config_path(spec)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
    _origins(raw, f"{path}: ", origins)
    return raw


def yaml_scalar(text: str) -> Any:
    """A command-line word read as YAML reads a value: `3` int, `null` None, `[1, 2]` list, `1e-4` float."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` -> (key, value read as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, text = item.split("=", 1)
    return key.strip(), yaml_scalar(text)


def merge(path: str | Path | None, flags: list[tuple[str, Any, str]] = (), overrides: list[str] = (),
          prepare=None) -> tuple[dict, dict]:
    """The one resolution of every command's config, as a tree of keys: the YAML file (a path or a shipped
    config's name) <- (key, value, flag) of the given flags <- `key=value` overrides; later wins. Returns
    (tree, origins: {dotted key: where its value came from}). `prepare(tree, base)`, when given, runs on the
    file's tree before the flags and overrides land (training loads the `deepspeed` JSON there)."""
    origins: dict = {}
    tree = read_yaml(path, origins) if path else {}
    if prepare is not None:
        prepare(tree, config_path(path).parent if path else None)
    for key, value, flag in flags:
        _put(tree, key, value, origins, f"{flag} sets ")
    for item in overrides:
        key, value = parse_override(item)
        _put(tree, key, value, origins, "override ")
    return tree, origins


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the experiment files installed with the package (profuser.configs: demo, study, ...)."""
    from importlib.resources import files

    folder = Path(str(files("profuser.configs")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_path(spec: str | Path) -> Path:
    """A config file: a path, or the name of a shipped one (`--config demo` from an installed package, no
    checkout needed). ConfigError naming both when it is neither."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise ConfigError(f"config file {spec} does not exist, and no shipped config is named {str(spec)!r} "
                      f"(shipped: {', '.join(shipped)})")


def field_comments(cls) -> dict[str, str]:
    """{field: the comment on its line, or on the comment lines just above it} of a dataclass, read from its
    source: the comments beside the defaults above are the documentation of every key."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines[1:]:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
            continue
        name = s.split(":", 1)[0].strip()
        if ":" in s and name.isidentifier() and not s.startswith(("def ", "class ", "@", '"""')):
            tail = line.split("#", 1)[1].strip() if "  # " in line else ""
            out[name] = " ".join([*above, tail]).strip()
        above = []
    return out
