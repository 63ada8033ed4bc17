"""trainer/checkpoint.py export: a transformers folder that chats the way the student was trained."""

from __future__ import annotations

from pathlib import Path

import helpers
from profuser.engine.models import load_model, load_tokenizer, tiny_model_dir
from profuser.engine.text.chat import fallback_chat_template
from profuser.engine.trainer.checkpoint import export_student


def test_export_carries_the_chat_template_it_was_trained_with(tmp_path):
    """A tokenizer without a chat template (the Gemma-3 GGUF; GPT-2 here) is exported with the fallback
    template our encoder used in training; a tokenizer with its own keeps it."""
    model = tiny_model_dir("smollm2-135m-instruct", out_dir=tmp_path / "m", hidden=32, heads=2, layers=1)
    lm = load_model(model)
    for tok, name in ((helpers.load("gpt2"), "plain"), (load_tokenizer(model), "own")):
        out = export_student(lm, tok, Path("unused"), tmp_path / name, stage=0, rank=0)
        got = load_tokenizer(out).chat_template
        assert got == (fallback_chat_template(tok) if name == "plain" else tok.chat_template) and got
        assert (out / "model.safetensors").is_file() and not (tmp_path / f"{name}.tmp").exists()
