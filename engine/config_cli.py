"""One config mechanism for every command: a command's options are its dataclass.

    add_config_arguments(parser, Cls, flags={...})   --config FILE, one --flag per field, key=value overrides
    config_from_args(Cls, args) -> Cls               defaults <- YAML <- flags <- key=value, every value checked

The same resolution and the same checks as training's (config.load_config): values are type-checked against
the field's annotation (config_tree.build), an unknown key or a bad value is a ConfigError naming the key
and where it came from (the YAML file, `--flag` or `override`), YAML and overrides use the same spelling.
Flags are generated from the fields: `--field-name` (nested dataclasses: `--section.field-name`), their help
from the comment beside the field (config_tree.field_comments) and their default from the dataclass, so no
default is written twice. A command keeps its established flag names through `flags` (Flag: another name,
nargs, a `--no-x` switch for a True default, a parser for KEY=VALUE lists). A dict field is YAML / override
only. The command's dataclass then checks what types cannot express (its __post_init__).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config_tree import ConfigError, build, field_comments, merge, yaml_scalar

DEST = "cfg__"  # argparse dest prefix of a generated flag: cfg__<key with dots as __>


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line (default: `--field-name`, one value)."""

    name: str | None = None  # the flag, e.g. "--source" for `sources`; a bare word: a leading positional
    nargs: str | None = None  # "+" for a list given as several words
    negate: str | None = None  # a bool whose default is True: the switch that sets False ("--no-progress")
    parse: Callable[[list[str]], Any] | None = None  # repeatable KEY=VALUE words -> the value (action append)
    help: str | None = None  # when the field's own comment is not the right text for the flag


def leaves(cls, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, annotation, default or MISSING, comment) of every leaf field of a config dataclass."""
    hints, docs, out = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], default, docs.get(f.name, "")))
    return out


def keys_help(cls=None) -> str:
    """Every key of a config dataclass (TrainConfig by default) with its default and comment, for --help and
    `profuser config keys` (the same walk as the generated flags: `leaves`)."""
    from .config import TrainConfig

    rows = [f"  {key} = {json.dumps(default, default=str)}" + (f"  # {doc}" if doc else "")
            for key, _, default, doc in leaves(cls or TrainConfig)]
    return "configuration keys (set in the --config YAML or as key=value overrides; default shown):\n" + \
        "\n".join(rows)


def _is_list(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return typing.get_origin(tp) is list or tp is list or any(typing.get_origin(a) is list or a is list for a in args)


def add_config_arguments(p: argparse.ArgumentParser, cls, *, flags: dict[str, Flag] | None = None,
                         config_and_overrides: bool = True) -> None:
    """--config, one flag per leaf field of `cls`, and positional key=value overrides (config_and_overrides:
    False when the command adds its own --config and overrides, as training does)."""
    flags = flags or {}
    if config_and_overrides:
        p.add_argument("--config", help="YAML file of this command's options (the keys below), or a shipped "
                                        "config's name")
    for key, tp, default, doc in leaves(cls):
        fl = flags.get(key, Flag())
        if (typing.get_origin(tp) is dict or tp is dict) and fl.parse is None:
            continue
        name = fl.name or "--" + key.replace("_", "-")
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        text = f"{fl.help or doc or key} ({shown}; key: {key})"
        dest = DEST + key.replace(".", "__")
        if tp is bool or fl.negate:
            if fl.negate or default is True:  # a switch that turns a default-on option off
                *section, last = key.split(".")
                off = fl.negate or "--" + ".".join([*section, "no-" + last]).replace("_", "-")
                p.add_argument(off, dest=dest, action="store_false", default=argparse.SUPPRESS,
                               help=f"{fl.help or doc or key}: off (default: on; key: {key})")
            else:
                p.add_argument(name, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
        elif fl.parse is not None:
            p.add_argument(name, dest=dest, action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                           help=text + "; repeatable")
        elif not name.startswith("-"):  # `profuser plot RUN_DIR`: before the key=value overrides
            p.add_argument(dest, nargs="?", default=argparse.SUPPRESS, metavar=name, help=text)
        else:
            nargs = fl.nargs or ("+" if _is_list(tp) else None)
            p.add_argument(name, dest=dest, nargs=nargs, default=argparse.SUPPRESS,
                           metavar=key.rsplit(".", 1)[-1].upper(), help=text)
    if config_and_overrides:
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides of any key above, after the flags (YAML scalars: 3, 1e-4, null, [a, b])")
    p.set_defaults(**{DEST + "flags": flags, DEST + "class": cls})


def resolved(args: argparse.Namespace):
    """The config a parsed command line resolves to (`profuser config show CMD ...`): training's through
    config.load_config, every other command's through config_from_args."""
    from .config import TrainConfig, load_config

    cls = getattr(args, DEST + "class", None)
    if cls is TrainConfig:
        items, swallowed = given_flags(args)
        return load_config(getattr(args, "config", None), swallowed + list(args.overrides), flags=items)
    return config_from_args(cls, args)


def given_flags(args: argparse.Namespace) -> tuple[list[tuple[str, Any, str]], list[str]]:
    """([(key, value, flag)] of the generated flags given on the command line, values read as YAML scalars,
    and the key=value words a list flag swallowed: `--source a b k=4` gives sources [a, b] and k=4)."""
    flags: dict = getattr(args, DEST + "flags", {})
    cls = getattr(args, DEST + "class", None)
    known = ({key for key, *_ in leaves(cls)} | {f.name for f in dataclasses.fields(cls)}) if cls else set()
    items, swallowed = [], []
    for dest, value in vars(args).items():
        if not dest.startswith(DEST) or dest in (DEST + "flags", DEST + "class"):
            continue
        key = dest[len(DEST):].replace("__", ".")
        fl = flags.get(key, Flag())
        if fl.parse is not None:
            value = fl.parse(value)
        elif isinstance(value, list):
            while value and isinstance(value[-1], str) and "=" in value[-1] and value[-1].split("=", 1)[0] in known:
                swallowed.insert(0, value.pop())
            value = [yaml_scalar(v) if isinstance(v, str) else v for v in value]
        elif isinstance(value, str):
            value = yaml_scalar(value)
        items.append((key, value, fl.name or "--" + key.replace("_", "-")))
    return items, swallowed


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The generated flags given on the command line as key=value overrides (JSON values, which YAML reads
    back exactly): how training's config.load_config takes them, before the positional overrides."""
    items, swallowed = given_flags(args)
    return [f"{key}={json.dumps(value)}" for key, value, _ in items] + swallowed


def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Defaults <- the YAML file <- key=value overrides, as `config_from_args` without a command line."""
    return config_from_args(cls, argparse.Namespace(config=path, overrides=list(overrides)))


def config_from_args(cls, args: argparse.Namespace):
    """The command's config: defaults <- --config YAML <- flags <- key=value overrides (later wins), through
    config_tree.merge and config_tree.build, as training's config (config.load_config)."""
    items, swallowed = given_flags(args)
    overrides = swallowed + list(getattr(args, "overrides", None) or [])
    tree, origins = merge(getattr(args, "config", None), items, overrides)
    try:
        return build(cls, tree, origins)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None
