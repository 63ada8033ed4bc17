"""Model resolution: aliases, local folders, the locked atomic conversion, tiny models for tests."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from profuser.engine import models

from helpers import need


def test_tiny_model_dir_real_tokenizer_and_seeded(tmp_path):
    need("smollm2-135m-instruct")
    kw = dict(hidden=32, heads=2, layers=1)
    a = models.tiny_model_dir("smollm2-135m-instruct", out_dir=tmp_path / "a", seed=3, **kw)
    b = models.tiny_model_dir(a, out_dir=tmp_path / "b", seed=3, **kw)  # a local folder as tokenizer spec
    c = models.tiny_model_dir(a, out_dir=tmp_path / "c", seed=4, **kw)
    ma, mb, mc = (models.load_model(p) for p in (a, b, c))
    tok = models.load_tokenizer(a)
    assert ma.config.vocab_size == len(tok) == 49152 and ma.config.hidden_size == 32
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    wa, wb, wc = (m.get_input_embeddings().weight for m in (ma, mb, mc))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    x = torch.tensor([tok("Hello there", add_special_tokens=False)["input_ids"]])
    logits = ma(x).logits
    assert logits.shape == (1, x.shape[1], 49152) and torch.isfinite(logits).all()
    assert logits.std() > 0.5  # peaked, varied distributions (no near-ties in top-k comparisons)
    with pytest.raises(ValueError, match="hidden=30 is not divisible by heads=4"):
        models.tiny_model_dir("smollm2-135m-instruct", out_dir=tmp_path / "d", hidden=30)


def test_resolve_local_and_bad_specs(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        models.resolve_model(tmp_path / "m")
    with pytest.raises(ValueError, match=r"'nope-7b' is neither a known alias .*hub downloads are disabled"):
        models.resolve_model("nope-7b")
    with pytest.raises(ValueError, match="tokenizer spec 'nope-7b'"):
        models.load_tokenizer("nope-7b")
    (tmp_path / "m" / "config.json").write_text("{}")
    assert models.resolve_model(tmp_path / "m") == tmp_path / "m"
    assert models.model_name("gemma3-270m") == "gemma3-270m" and models.model_name(tmp_path / "m") == "m"


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("PROFUSER_CACHE")
    assert models.cache_root().name == "profuser"


def test_convert_once_is_locked_atomic_and_cleans_up(tmp_path):
    final = tmp_path / "models" / "x"
    calls = []

    def build(out):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # a slow conversion: a second caller must wait, not convert again
        (out / "weights.bin").write_bytes(b"w")

    threads = [threading.Thread(target=models.convert_once, args=(final, build, lambda: {"a": 1}))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (final / "weights.bin").exists()
    assert json.loads((final / models._MARKER).read_text()) == {"a": 1}
    assert [p.name for p in final.parent.iterdir() if ".tmp-" in p.name] == []

    def broken(out):
        (out / "half.bin").write_bytes(b"h")
        raise RuntimeError("killed during conversion")

    other = tmp_path / "models" / "y"
    with pytest.raises(RuntimeError):
        models.convert_once(other, broken, dict)
    assert not other.exists() and not [p for p in other.parent.iterdir() if p.name.startswith("y.tmp-")]
    # a folder without the marker (older interrupted conversion) is rebuilt
    other.mkdir()
    models.convert_once(other, lambda out: (out / "ok").write_text("1"), dict)
    assert (other / "ok").exists()


@pytest.mark.slow
@pytest.mark.parametrize("alias, prompt, expect", [
    ("smollm2-135m-instruct", "The capital of France is", " Paris"),
    ("gemma3-270m", "The capital of France is", " the capital"),
])
def test_aliases_load_and_generate(alias, prompt, expect):
    need(alias)
    model, tok = models.load_model(alias), models.load_tokenizer(alias)
    assert (models.resolve_model(alias) / models._MARKER).exists()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(expect)
    assert np.isfinite(model(**ids).logits.detach().numpy()).all()
