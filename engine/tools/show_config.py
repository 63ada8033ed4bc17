"""`profuser config show`: the configuration a command would run with, resolved and printed as YAML.

    profuser config show --config demo optim.lr=3e-5           # training (train, check, demo): the default
    profuser config show teach --data-dir d --source a --k 4   # any command, with that command's own options
    profuser config keys                                        # every training key, its default and meaning

The same resolution as the command itself (config_cli.resolved: training's config.load_config, every other
command's config_cli.config_from_args): a bad key or value is the same one-line error, before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from ..commands import COMMANDS, import_command
from ..config import dump_yaml, load_config
from ..config_cli import keys_help, resolved

ACTIONS = ("show", "keys")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # everything after the action is read by `words_parser` (argparse cannot take positionals on both sides
    # of an option, as in `show --config demo optim.lr=3e-5`)
    p.add_argument("--config", help="YAML experiment file or a shipped config's name (demo, study, ...)")
    p.add_argument("action", choices=ACTIONS,
                   help="show: the resolved configuration as YAML; keys: every key, its default and its meaning")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="[--config FILE|NAME] [key=value ...]",
                   help="as for `profuser train`")


def words_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="profuser config show")
    p.add_argument("--config", help="YAML experiment file or a shipped config's name (demo, study, ...)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `profuser train`")
    return p


def run_command(args: argparse.Namespace) -> int:
    if args.action == "keys":
        print(keys_help())
        return 0
    rest = list(args.rest)
    if rest and rest[0] in COMMANDS and rest[0] != "config":  # another command's options, parsed by its parser
        p = argparse.ArgumentParser(prog=f"profuser {rest[0]}")
        import_command(rest[0]).add_arguments(p)
        cfg = resolved(p.parse_args(rest[1:]))
        sys.stdout.write(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=None))
        return 0
    ns = words_parser().parse_intermixed_args(rest)
    sys.stdout.write(dump_yaml(load_config(ns.config or args.config, ns.overrides)))
    return 0
