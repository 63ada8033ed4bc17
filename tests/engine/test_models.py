"""Model resolution: aliases, local folders, the locked atomic conversion, tiny models for tests."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from helpers import need
from profuser.engine import models


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
    with pytest.raises(ValueError, match=r"'nope-7b' is neither a known alias .*, a local folder nor a hub id"):
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
    assert json.loads((final / models.MARKER).read_text()) == {"a": 1}
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
    assert (models.resolve_model(alias) / models.MARKER).exists()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(expect)
    assert np.isfinite(model(**ids).logits.detach().numpy()).all()


# ---------------------------------------------------------------------------------------------------------
# the output-logit transform: one rule for teach, generate (the HF forward), eval and the training step

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
FAMILIES = {  # model_type -> the config keys that make its forward transform the lm_head output
    "gemma2": dict(final_logit_softcapping=3.0),            # soft-capping
    "gemma3_text": dict(final_logit_softcapping=2.0),
    "cohere": dict(logit_scale=0.37),                        # logits * logit_scale
    "cohere2": dict(logit_scale=0.5),
    "granite": dict(logits_scaling=4.0),                     # logits / logits_scaling
    "granitemoe": dict(logits_scaling=3.0, num_local_experts=2, num_experts_per_tok=1),
    "hyperclovax": dict(logits_scaling=2.5),                 # logits * logits_scaling (muP the other way)
    "llama": {},                                             # none
}


def tiny_family(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **TINY, **FAMILIES[model_type])
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        lm.get_output_embeddings().weight.normal_(0, 1)  # large logits: a missing transform shows
    return lm


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_logit_transform_reproduces_the_model_forward(model_type):
    lm = tiny_family(model_type)
    ids = torch.randint(0, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        ref = lm(ids).logits[0].float()
        got = models.output_logits(lm, lm.base_model(ids).last_hidden_state[0])
    t = models.LogitTransform.of(lm.config)
    assert (t.scale != 1.0 or t.softcap is not None) == bool(FAMILIES[model_type])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "hyperclovax"])
def test_training_step_sees_the_model_logits(model_type):
    """lam=1 (CE only): the training step's fused loss equals CE on model(...).logits (scale on h, cap in the loss)."""
    from profuser.engine.config import MODE_ID, LossConfig
    from profuser.engine.trainer.step import FusionStep

    lm = tiny_family(model_type)
    L = 9
    ids = torch.randint(0, TINY["vocab_size"], (2, L))
    labels = torch.full((2, L), -100)
    labels[:, 2:L - 1] = ids[:, 3:]
    n = int((labels != -100).sum())
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "teacher_ids": torch.full((1, 2, L, 1), -1, dtype=torch.int32),
             "teacher_logprobs": torch.full((1, 2, L, 1), float("-inf")), "teacher_weights": torch.zeros(1, 2, L),
             "mode": torch.full((2,), MODE_ID["train"]), "n_tokens": n}
    step = FusionStep(lm, LossConfig(lam=1.0, backend="reference"), [None])
    scale = torch.zeros(len(MODE_ID))
    scale[MODE_ID["train"]] = 1.0 / n
    loss, _ = step(batch, scale)
    logits = lm(ids).logits.float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_reference_models_evaluate_a_source_that_is_the_target_once(tmp_path, monkeypatch):
    """Student as candidate: the target is also a source; the report and the demo table evaluate it once,
    as the target, whichever spelling (alias, relative or absolute folder) names it."""
    (tmp_path / "target").mkdir()
    monkeypatch.chdir(tmp_path)
    got = models.reference_models("target", {"t": str(tmp_path / "target"),
                                             "smollm2-135m-instruct": "smollm2-135m-instruct"})
    assert got == {"target (before)": "target", "source smollm2-135m-instruct": "smollm2-135m-instruct"}
    both = models.reference_models("gemma3-270m", {"gemma3-270m": "gemma3-270m", "other": str(tmp_path / "target")})
    assert list(both) == ["target (before)", "source other"]


def test_a_gguf_in_chunk_packages_is_assembled_once_and_checked(tmp_path, monkeypatch):
    """SplitGGUF (the Qwen2.5-Coder alias): chunks of numbered packages concatenated in numeric order (part10
    after part9, not after part1), the size and sha256 checked, a missing package and a damaged chunk named."""
    import hashlib
    import sys

    from profuser.engine.models.aliases import SplitGGUF

    site = tmp_path / "site"
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 12)]
    for i, data in enumerate(chunks, 1):
        pkg = site / f"fakechunk_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    spec = SplitGGUF(name="fake.gguf", module="fakechunk_part{}", chunk="data/part{:02d}.bin", n=11, size=len(whole),
                     sha256=hashlib.sha256(whole).hexdigest(), install="make fake")
    out = spec.assemble(tmp_path / "cache")
    assert out.read_bytes() == whole and not list((tmp_path / "cache").glob("*.tmp"))
    stamp = out.stat().st_mtime_ns
    assert spec.assemble(tmp_path / "cache") == out and out.stat().st_mtime_ns == stamp  # once

    (site / "fakechunk_part10" / "data" / "part10.bin").write_bytes(b"x" * len(chunks[9]))  # damaged
    with pytest.raises(ValueError, match=r"fake.gguf: the 11 chunks give \d+ bytes with sha256 .* damaged"):
        spec.assemble(tmp_path / "other")
    assert not list((tmp_path / "other").glob("fake.gguf*.tmp")) and not (tmp_path / "other" / "fake.gguf").exists()
    missing = SplitGGUF(name="m.gguf", module="fakechunk_part{}", chunk="data/part{:02d}.bin", n=12, size=1,
                        sha256="0", install="make fake")
    sys.modules.pop("fakechunk_part12", None)
    with pytest.raises(ModuleNotFoundError, match="m.gguf needs the package fakechunk_part12 .*: make fake"):
        missing.assemble(tmp_path / "third")


def test_hub_ids_resolve_through_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    """A hub id ("owner/name", "@revision") loads from a cache in the hub layout with HF_HUB_OFFLINE=1 (a tiny
    model with the real SmolLM2 tokenizer stands in for a hub model); a stored source records the id and is
    named by the repo's name; an id missing from the cache is one line naming it."""
    import shutil

    from profuser.engine.passes import teach as T
    from profuser.engine.passes.options import PassConfig
    from profuser.engine.tools import synthetic as fx

    tiny = models.tiny_model_dir("smollm2-135m-instruct", out_dir=tmp_path / "tiny")
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-smol"
    shutil.copytree(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

    assert models.resolve_model("acme/tiny-smol") == repo / "snapshots" / commit
    assert models.resolve_model(f"acme/tiny-smol@{commit}") == repo / "snapshots" / commit
    lm, tok = models.load_model("acme/tiny-smol"), models.load_tokenizer("acme/tiny-smol")
    assert len(tok) == 49152 and lm.config.vocab_size == len(tok)
    assert models.model_name("acme/tiny-smol") == "tiny-smol" and models.canonical_spec("acme/tiny-smol") == \
        "acme/tiny-smol"
    assert models.model_fingerprint("acme/tiny-smol") == models.model_fingerprint(tiny)  # the same files
    with pytest.raises(ValueError, match=r"model spec 'acme/other': hub id acme/other is not in .*hub and hub "
                                         r"downloads are off \(HF_HUB_OFFLINE=1\)"):
        models.resolve_model("acme/other")

    ex = fx.corpus(4)
    fx.write_prepared(tmp_path / "data", ex, 4)
    T.teach(PassConfig(data_dir=str(tmp_path / "data"), sources=["acme/tiny-smol"], k=4, progress=False))
    manifest = json.loads((tmp_path / "data" / "teachers" / "tiny-smol" / "train" / "manifest.json").read_text())
    assert manifest["model"] == "acme/tiny-smol"
