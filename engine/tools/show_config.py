"""`profuser config show`: the training configuration a command would run with, resolved and printed.

    profuser config show --config demo optim.lr=3e-5     # defaults <- the YAML <- overrides, as YAML
    profuser config keys                                  # every key with its default and what it means

The same resolution as `profuser train`, `check` and `demo` (config.load_config): a bad key or value is the
same one-line error, before anything runs.
"""

from __future__ import annotations

import argparse
import sys

from ..config import dump_yaml, keys_help, load_config

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
    ns = words_parser().parse_intermixed_args(args.rest)
    sys.stdout.write(dump_yaml(load_config(ns.config or args.config, ns.overrides)))
    return 0
