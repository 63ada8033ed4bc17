"""docs/fuse_your_own.md followed end to end: every `profuser` command of its bash blocks and its first Python
block run as written, in a folder holding the page's `fuse.yaml`, against a Hugging Face cache in the hub layout
(offline) where each model id of the page is a tiny random Llama with that family's real tokenizer and each
dataset id a few dozen rows in the real repository's file layout. `generate` and `train` get arguments appended
that make them small (SMALL: fewer new tokens and steps, shorter examples); nothing else is changed. In-process
(profuser.engine.cli.main), so the page's commands cost no interpreter start-ups."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import isolated_process_group, tokenizer
from profuser.engine.cli import main as profuser_main
from profuser.engine.models import tiny_model_dir
from profuser.engine.tools import synthetic as fx

PAGE = Path(__file__).resolve().parents[1] / "docs" / "fuse_your_own.md"
MODELS = {"Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5", "google/gemma-3-1b-it": "gemma3",
          "HuggingFaceTB/SmolLM2-360M-Instruct": "smollm2"}
# the real repositories' data files (so `--split train` finds its split the way it does on the hub)
DOLLY, ALPACA = "databricks/databricks-dolly-15k", "tatsu-lab/alpaca"
SMALL = {"generate": ["--max-new-tokens", "24"], "train": [
         "optim.max_steps=4", "optim.warmup_steps=1", "checkpoint.every=2", "data.max_length=96",
         "data.micro_batch_size=2", "eval.max_examples=6", "eval.every=2", "eval.n_samples=1",
         "eval.max_new_tokens=8", "eval.references=false", "log.report_to=[]", "log.progress=false"]}


@pytest.fixture(scope="module", autouse=True)
def _isolate_process_group():
    yield from isolated_process_group()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), flags=re.S)


def commands() -> list[list[str]]:
    """Every `profuser ...` command of the page's bash blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["profuser"]:
                out.append(words[1:])
    return out


def snapshot(cache: Path, repo: str, kind: str) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def build_hub_cache(cache: Path, work: Path) -> None:
    for repo, family in MODELS.items():
        tok_dir = work / "tokenizers" / family
        tokenizer(family).save_pretrained(tok_dir)
        tiny_model_dir(tok_dir, out_dir=snapshot(cache, repo, "model"))
    rows = fx.corpus(40, extra_every=0)
    dolly = snapshot(cache, DOLLY, "dataset")
    dolly.mkdir(parents=True)
    (dolly / "databricks-dolly-15k.jsonl").write_text("".join(
        json.dumps({"instruction": r["prompt"], "context": "", "response": r["response"],
                    "category": "open_qa"}) + "\n" for r in rows[:24]))
    alpaca = snapshot(cache, ALPACA, "dataset") / "data"
    alpaca.mkdir(parents=True)
    pool = rows[24:36]
    pq.write_table(pa.table({"instruction": [r["prompt"] for r in pool], "input": [""] * len(pool),
                             "output": [r["response"] for r in pool], "text": [r["prompt"] for r in pool]}),
                   alpaca / "train-00000-of-00001-a09b74b3ef9c3b56.parquet")
    for name, part in (("val.jsonl", rows[36:38]), ("test.jsonl", rows[38:40])):
        (work / name).write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                                         for r in part))


def test_the_fuse_your_own_models_page_end_to_end(tmp_path, monkeypatch):
    for family in MODELS.values():
        tokenizer(family)  # skips when the package shipping it is absent
    cache, work = tmp_path / "hub", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.chdir(work)
    build_hub_cache(cache, work)

    (config,) = [b for b in blocks("yaml") if b.startswith("# fuse.yaml")]
    (work / "fuse.yaml").write_text(config)
    assert yaml.safe_load(config)["model"]["student"] in MODELS

    cmds = commands()
    assert [c[0] for c in cmds] == ["prepare", "prepare", "teach", "generate", "score", "check", "train",
                                    "train", "eval", "export"], cmds
    for cmd in cmds:
        argv = cmd + SMALL.get(cmd[0], [])  # a later flag wins: the page's own values are overridden
        t0 = time.time()
        rc = profuser_main(argv)
        print(f"[fuse-your-own] profuser {cmd[0]}: {time.time() - t0:.0f} s", flush=True)
        assert rc in (0, None), f"profuser {' '.join(argv)} exited {rc}"

    assert json.loads((work / "runs/mine/pool/scores/summary.json").read_text())
    final = work / "runs/mine/train/final"
    card = (final / "README.md").read_text()
    assert all(name in card for name in ("Qwen2.5-1.5B-Instruct", "gemma-3-1b-it", "two_stage"))
    report = (work / "runs/mine/table/report.md").read_text()
    assert all(name in report for name in ("fused", "sft", "target"))

    published = work / "runs/mine/publish"
    assert "license: apache-2.0" in (published / "README.md").read_text()
    assert not (published / "profuser_export.json").exists() and any(published.glob("*.safetensors"))
    python = blocks("python")[0]
    r = subprocess.run([sys.executable, "-c", python], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.rmtree(cache)  # 0.3 GB of tiny models: not kept for the failed-tests folder
