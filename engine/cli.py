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

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run_command(args) -> int`; modules
are imported lazily so `profuser --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import report_errors

# subcommand -> (module inside profuser.engine, one-line help)
COMMANDS = {
    "prepare": ("passes.prepare", "build the prepared set from JSONL / Parquet / a datasets folder"),
    "teach": ("passes.teach", "training mode: store every source's top-k distributions on the gold responses"),
    "generate": ("passes.generate", "inference mode: each source generates responses, storing top-k log-probs"),
    "score": ("passes.score", "score generated responses with reward scorers and store the votes"),
    "train": ("train", "progressive fusion training of the target model"),
    "eval": ("trainer.evaluate", "held-out NLL / perplexity (per token and per byte)"),
    "study": ("tools.study", "schedules x seeds from one config, every model evaluated the same way, one table"),
    "plot": ("tools.plot", "render loss and eval curves to PNG"),
    "check": ("tools.check", "check a config and its stores (checksums, every row's values) without training"),
    "repoint": ("tools.repoint", "tell a store where its source model folder lives now"),
    "demo": ("tools.demo", "run the whole pipeline on the embedded default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profuser", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=module)
        # arguments are added only for the command actually invoked (lazy import)
        if len(sys.argv) > 1 and sys.argv[1] == name:
            importlib.import_module(f"profuser.engine.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = importlib.import_module(f"profuser.engine.{args._module}")
    return report_errors(f"profuser {args.command}", module.run_command, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
