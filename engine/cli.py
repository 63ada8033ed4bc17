"""The `profuser` command line: one subcommand per pipeline step.

    profuser prepare   instruction data -> prepared set (text, gold response, example id, fingerprint)
    profuser teach     training mode: teacher-forced top-k distributions of every source on gold responses
    profuser generate  inference mode: each source generates a response, with top-k log-probabilities
    profuser score     reward scorers vote for the best generated response per prompt
    profuser train     progressive fusion training (also: deepspeed engine/train.py --config ...)
    profuser eval      held-out NLL / perplexity of a model, the target and every source (and the lm-eval task)
    profuser study     variants x seeds of one config (sft, FuseLLM, ProFuser, ...), evaluated, one table
    profuser plot      loss and eval curves to PNG
    profuser check     a config and its stores checked, without loading a model
    profuser repoint   a store's source model moved: record where it is now
    profuser demo      the whole pipeline on the shipped corpus with real small models
    profuser config    show the resolved training config of a command (`profuser config show train ...`)

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run_command(args) -> int`;
only the invoked subcommand's module is imported (`profuser --help` stays fast). `--debug` (the traceback
of an error) and `--version` work before or after the subcommand. A module that needs an extra the
installation lacks (a loss-library-only install has no pyarrow) is one line naming the extra to install.
"""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS, MissingExtraError, import_command, version
from .errors import report_errors


def description(module) -> str:
    """A subcommand's description: the first paragraph of its module's docstring."""
    return (module.__doc__ or "").strip().split("\n\n")[0]


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the full traceback of an error (also PROFUSER_DEBUG=1)")
    p.add_argument("--version", action="version", version=f"profuser {version()}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option; descriptions and epilogs (the key lists) kept as written."""


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are added (its module imported), the others list their help."""
    parser = argparse.ArgumentParser(prog="profuser", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="`profuser COMMAND --help` lists a command's options with their defaults.")
    add_common_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_)
            continue
        module = import_command(name)
        p = sub.add_parser(name, help=help_, description=description(module),
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        if not any("--debug" in a.option_strings for a in p._actions):
            add_common_flags(p)
        elif not any("--version" in a.option_strings for a in p._actions):
            p.add_argument("--version", action="version", version=f"profuser {version()}")
        p.set_defaults(_module=module)
    return parser


def _reraise(exc: BaseException):
    raise exc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)  # the first bare word that names a subcommand
    debug = "--debug" in argv
    try:
        parser = build_parser(command)
    except MissingExtraError as exc:
        return report_errors(f"profuser {command}", _reraise, exc, debug=debug)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    args.debug = debug  # before or after the subcommand (argparse would let the subparser's default win)
    return report_errors(f"profuser {args.command}", args._module.run_command, args, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
