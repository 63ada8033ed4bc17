"""The `profuser` subcommands: name -> the module that implements it, and how a module is imported.

A table below the command line (engine/cli.py) so that a command that runs others (`profuser config show
CMD`) reaches them without importing the command line itself.
"""

from __future__ import annotations

import importlib

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
    "export": ("tools.export", "an exported model as a folder to publish (--push-ready: checked as users load it)"),
    "repoint": ("tools.repoint", "tell a store where its source model folder lives now"),
    "demo": ("tools.demo", "run the whole pipeline on the embedded default"),
    "config": ("tools.show_config", "a command's resolved config (`profuser config show teach ...`), every key"),
}

# the installation extra that brings each third-party module a subcommand may need (setup.py extras_require)
EXTRA_OF = {"pyarrow": "engine", "transformers": "engine", "tokenizers": "engine", "safetensors": "engine",
            "yaml": "engine", "tqdm": "engine", "datasets": "engine", "deepspeed": "train", "accelerate": "train",
            "tensorboard": "train", "matplotlib": "train", "gguf": "train", "sentencepiece": "train",
            "lm_eval": "eval", "vllm": "vllm"}


class MissingExtraError(ImportError):
    """A subcommand needs an optional dependency this installation lacks; the message names the extra."""


def version() -> str:
    from profuser import __version__

    return __version__


def import_command(name: str):
    """The module of subcommand `name`; MissingExtraError naming the extra when a dependency is absent."""
    try:
        return importlib.import_module(f"profuser.engine.{COMMANDS[name][0]}")
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise
        raise MissingExtraError(f"needs the module {top!r}, which this installation lacks: "
                                f"pip install 'profuser[{EXTRA_OF[top]}]'") from None
