"""`profuser study` on tiny random models: orchestration, resume, the table (not the numbers); the lm-eval task.

The student is a tiny random Llama with the real SmolLM2 tokenizer and the stores are written by the test
helpers (helpers.training_data), so a run takes seconds; lm-eval runs the real harness on the tiny exports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import overrides, training_data
from profuser.engine.config import ConfigError
from profuser.engine.tools import study as S
from profuser.engine.trainer import lm_eval_task as T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("study"), n=16)


def study_file(data, out: Path, **kw) -> Path:
    ov = dict(x.split("=", 1) for x in overrides(data, out / "unused", **{"optim.max_steps": 2, "checkpoint.every": 0}))
    ov.pop("output_dir")
    doc = {"output_dir": str(out), "overrides": ov, "seeds": [0, 1], "baseline": "sft", "bootstrap": 200,
           "variants": {"sft": {"schedule.kind": "sft"}, "two_stage": {"schedule.kind": "two_stage"}},
           "eval": {"data": [data["heldout"]], "lm_eval": True, "win_rate": True,
                    "scorers": [f"judge:{data['student']}"], "max_new_tokens": 4, "batch_size": 4}}
    doc.update(kw)
    path = out / "study.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_study_trains_evaluates_tabulates_and_resumes(data, tmp_path):
    out = tmp_path / "st"
    cfg = S.load_study(study_file(data, out, comparisons=[["two_stage", "sft"]]))
    logs = []
    doc = S.study(cfg, log=logs.append)
    assert list(doc["tests"]) == ["heldout"]
    t = doc["tests"]["heldout"]
    # the target and the variants; the sources other than the target are rows too when they are models (here
    # "gpt2" names a tokenizer folder: left out, with a line saying so; test_table_... has a source row)
    assert set(t["table"]) == {"target", "sft", "two_stage"}
    assert any("gpt2-tok: not evaluated" in line for line in logs)
    assert t["metrics"] == ["bits_per_byte", "acc", "win"]
    assert t["n_examples"] == 10
    for variant in ("sft", "two_stage"):
        row = t["table"][variant]
        for m in t["metrics"]:
            assert len(row[m]["per_seed"]) == 2 and np.isfinite(row[m]["mean"]) and row[m]["sd"] >= 0
        assert 0 <= row["acc"]["mean"] <= 1 and 0 <= row["win"]["mean"] <= 1
    d = t["table"]["two_stage"]["bits_per_byte"]["vs_baseline"]
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    # the paired difference is the mean over seeds of per-seed differences
    per = t["table"]["two_stage"]["bits_per_byte"]["per_seed"]
    base = t["table"]["sft"]["bits_per_byte"]["per_seed"]
    assert d["diff"] == pytest.approx(np.mean(np.subtract(per, base)), rel=1e-9)
    # the comparison: the same per-seed differences, and the t-interval over the two seeds (df 1: 12.706)
    c = next(c for c in t["comparisons"] if c["metric"] == "bits_per_byte")
    assert (c["a"], c["b"]) == ("two_stage", "sft") and c["per_seed"] == pytest.approx(np.subtract(per, base))
    half = 12.706 * np.std(c["per_seed"], ddof=1) / np.sqrt(2)
    assert c["seed_ci95"] == pytest.approx([np.mean(c["per_seed"]) - half, np.mean(c["per_seed"]) + half])
    assert c["excludes_zero"] == (c["seed_ci95"][0] > 0 or c["seed_ci95"][1] < 0)
    # where the bits go: the parts of every model's answers add up to its bits per answer
    runs = [json.loads((out / "runs" / "sft" / f"seed{s}" / "study_eval-heldout.json").read_text()) for s in (0, 1)]
    whole = np.mean([np.mean(r["nll"]) for r in runs]) / np.log(2)
    assert set(t["parts"]) == {"target", "sft", "two_stage"}
    assert sum(t["parts"]["sft"].values()) == pytest.approx(whole, rel=1e-9)
    for f in ("study.md", "study.json", "study.png"):
        assert (out / f).stat().st_size > 0
    text = (out / "study.md").read_text()
    assert "| model | first_word | content | final_punct | end_of_turn | total |" in text
    # the kept teacher mass of the runs' training steps: sft trains on the gold pairs only (train mode)
    assert set(doc["kept_mass"]["sft"]) == {"train"} and set(doc["kept_mass"]["two_stage"]) == {"infer", "train"}
    assert all(0 < v <= 1 for k in doc["kept_mass"].values() for v in k.values())
    assert set(doc["student_mass"]["sft"]) == {"train"} and set(doc["student_mass"]["two_stage"]) == {"infer", "train"}
    assert all(0 < v < 1 for k in doc["student_mass"].values() for v in k.values())
    assert "Student mass on the teachers' support" in (out / "study.md").read_text()
    assert "target (untouched)" in text and "| two_stage - sft | bits_per_byte |" in text
    # each run is a normal training run of its own, the two variants saw the same first training batch
    # only the exports are kept (keep_checkpoints: false, the default)
    assert not (out / "runs" / "sft" / "seed0" / "checkpoints").exists()
    metrics = {v: [json.loads(x) for x in (out / "runs" / v / "seed0" / "metrics.jsonl").read_text().splitlines()]
               for v in ("sft", "two_stage")}
    assert all(r["loss"] == pytest.approx(r["ce_train"], rel=1e-6) for r in metrics["sft"] if r["kind"] == "train")

    # resume: a finished run is not redone, a missing one is; cached evaluations are reused
    keep = out / "runs" / "sft" / "seed0" / "final" / "config.json"
    stamp = keep.stat().st_mtime_ns
    redo = out / "runs" / "two_stage" / "seed1"
    for p in sorted(redo.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    cache = out / "runs" / "sft" / "seed1" / "study_eval-heldout.json"
    cached = cache.stat().st_mtime_ns
    doc2 = S.study(S.load_study(study_file(data, out, comparisons=[["two_stage", "sft"]])), log=lambda s: None)
    assert keep.stat().st_mtime_ns == stamp and cache.stat().st_mtime_ns == cached
    assert (redo / "final" / "config.json").is_file()
    assert doc2["tests"]["heldout"]["table"]["sft"] == t["table"]["sft"]


def test_study_config_errors_named(data, tmp_path):
    with pytest.raises(ConfigError, match="varients: unknown key"):
        S.load_study(study_file(data, tmp_path / "a", varients={}))
    with pytest.raises(ConfigError, match="baseline 'sft' is not one of the variants"):
        S.load_study(study_file(data, tmp_path / "b", variants={"two_stage": {"schedule.kind": "two_stage"}}))
    with pytest.raises(ConfigError, match="eval.lm_evl: unknown key"):
        S.load_study(study_file(data, tmp_path / "c", eval={"lm_evl": True}))
    with pytest.raises(ConfigError, match="does not exist"):
        S.load_study(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"comparisons: \['two_stage', 'sfd'\] is not a pair of variants"):
        S.load_study(study_file(data, tmp_path / "d", comparisons=[["two_stage", "sfd"]]))


def test_lm_eval_task_is_deterministic_and_well_formed(tmp_path):
    corpus = Path(__file__).resolve().parents[3] / "data" / "wordnet_instruct.jsonl"
    pairs = [json.loads(x) for x in corpus.read_text().splitlines()[-40:]]
    a = T.write_task(pairs, tmp_path / "a")
    b = T.write_task(pairs, tmp_path / "b")
    assert (a / "items.jsonl").read_bytes() == (b / "items.jsonl").read_bytes()
    items = [json.loads(x) for x in (a / "items.jsonl").read_text().splitlines()]
    assert len(items) == 40
    for it, p in zip(items, pairs):
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert it["choices"][it["label"]] == p["response"].strip() and it["question"] == p["prompt"]
    assert 0.1 < np.mean([it["label"] == 0 for it in items]) < 0.45  # the gold's place is shuffled
    cfg = yaml.safe_load((a / f"{T.TASK}.yaml").read_text())
    assert cfg["task"] == T.TASK and cfg["output_type"] == "multiple_choice"
    assert os.path.isabs(cfg["dataset_kwargs"]["data_files"]["test"])
    with pytest.raises(ValueError, match="need at least 4"):
        T.build_items(pairs[:3])
    # a conversation's later turns cannot be one lm-eval item (their context would be lost): left out, counted
    turns = [{**p, "history": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
             if i % 4 == 1 else p for i, p in enumerate(pairs)]
    with pytest.warns(UserWarning, match="10 of 40 rows continue a conversation"):
        kept = T.build_items(turns)
    assert [it["question"] for it in kept] == [p["prompt"] for i, p in enumerate(pairs) if i % 4 != 1]


def test_shipped_study_config_loads():
    path = Path(__file__).resolve().parents[3] / "configs" / "study.yaml"
    cfg = S.load_study(path)
    assert set(cfg.variants) == {"sft", "train_only", "infer_only", "simul", "reverse", "two_stage"}
    assert Path(cfg.base).is_file() and cfg.baseline == "sft" and len(cfg.seeds) >= 3
    assert [c for c in S.train_command(cfg, "sft", 1) if c.startswith(("seed=", "schedule.kind="))] == \
        ["schedule.kind=sft", "seed=1"]


@pytest.mark.parametrize("name", ["study.yaml", "study_search.yaml", "study_span_rule.yaml", "study_pool.yaml"])
def test_every_shipped_study_variant_is_a_valid_run(name):
    """Each variant's overrides on its base make a training config (a typo would fail hours into a study)."""
    from profuser.engine.config import load_config

    cfg = S.load_study(Path(__file__).resolve().parents[3] / "configs" / name)
    for variant in cfg.variants:
        cmd = S.train_command(cfg, variant, 0)
        train = load_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--config") + 2:])
        assert train.schedule.kind == cfg.variants[variant]["schedule.kind"], variant
        assert train.data.span_rule == cfg.variants[variant].get("data.span_rule", "first_piece"), variant


def test_lm_eval_task_resolves_an_alias_to_its_local_folder(tmp_path, monkeypatch):
    """lm-eval's `hf` model would look an alias ("gemma3-270m") up on the hub: run_task hands it the
    converted folder (the study evaluates the untouched target by its alias)."""
    import lm_eval

    import profuser.engine.models as M

    pairs = [{"example_id": str(i), "prompt": f"q{i}", "response": f"answer {i}"} for i in range(4)]
    task = T.write_task(pairs, tmp_path / "task")
    seen = {}
    monkeypatch.setattr(M, "resolve_model", lambda spec: seen.setdefault("spec", spec) and tmp_path / "resolved")
    monkeypatch.setattr(T, "templated_tokenizer", lambda model_dir, root: None)

    def fake_evaluate(model, model_args, tasks, **kw):
        seen["model_args"] = model_args
        return {"samples": {T.TASK: [{"doc_id": i, "acc": 1.0, "acc_norm": 0.0} for i in range(4)]},
                "results": {T.TASK: {"acc,none": 1.0, "acc_norm,none": 0.0}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    got = T.run_task("gemma3-270m", task)
    assert seen["spec"] == "gemma3-270m" and f"pretrained={tmp_path / 'resolved'}," in seen["model_args"]
    assert got["n"] == 4 and got["acc"] == 1.0 and got["model_args"] == seen["model_args"]


def test_lm_eval_gets_the_template_the_model_was_trained_with():
    """The Gemma-3 GGUF ships no chat template: lm-eval gets a tokenizer copy carrying our fallback (Gemma
    turn markers), rendering prompts exactly as text/chat.py encoded them in training; SmolLM2 keeps its own."""
    import tempfile

    from profuser.engine.models import load_tokenizer, resolve_tokenizer
    from profuser.engine.text.chat import render_parts

    with tempfile.TemporaryDirectory() as root:
        assert T.templated_tokenizer(resolve_tokenizer("smollm2-135m-instruct"), Path(root)) is None
        gemma = resolve_tokenizer("gemma3-270m")
        out = T.templated_tokenizer(gemma, Path(root))
        tok = load_tokenizer(out)
        msgs = [{"role": "user", "content": "Define: cat"}]
        prefix, suffix = render_parts(load_tokenizer(gemma), "Define: cat")
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert rendered == "<bos>" + prefix  # BOS as text: lm-eval then adds none of its own
        assert prefix == "<start_of_turn>user\nDefine: cat<end_of_turn>\n<start_of_turn>model\n"
        # the ids lm-eval encodes (text with BOS, no special tokens added) are the ones without the BOS text
        # and the tokenizer's own BOS (how the study's lm-eval figures were measured)
        assert tok(rendered, add_special_tokens=False)["input_ids"] == tok(prefix)["input_ids"]
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "a pet"}], tokenize=False)
        assert full == "<bos>" + prefix + "a pet" + suffix


def test_table_marks_only_differences_beyond_the_seed_spread():
    """Seed means 1.00/1.10/1.20 for sft: a variant at 0.50 +- 0.01 differs beyond the spread, one at
    1.05 +- 0.10 does not, whatever its per-example bootstrap interval says."""
    log2 = np.log(2)

    def res(bpb):  # 8 examples of 10 bytes each at `bpb` bits per byte
        return {"nll": [bpb * 10 * log2] * 8, "bytes": [10] * 8}

    cfg = S.StudyConfig(variants={"sft": {}, "far": {}, "near": {}}, seeds=[0, 1, 2], bootstrap=50,
                        eval=S.StudyEval(lm_eval=False))
    results = {"sft": {s: res(v) for s, v in zip(cfg.seeds, (1.0, 1.1, 1.2))},
               "far": {s: res(v) for s, v in zip(cfg.seeds, (0.49, 0.50, 0.51))},
               "near": {s: res(v) for s, v in zip(cfg.seeds, (0.95, 1.05, 1.15))}}
    doc = S.tabulate(cfg, results, res(2.0), {}, {"source x": res(1.5)})
    assert doc["table"]["source x"]["bits_per_byte"] == {"mean": pytest.approx(1.5), "sd": 0.0, "n": 1}
    far, near = (doc["table"][v]["bits_per_byte"]["vs_baseline"] for v in ("far", "near"))
    assert far["beyond_seed_spread"] and not near["beyond_seed_spread"]
    assert far["diff"] == pytest.approx(-0.6) and near["diff"] == pytest.approx(-0.05)
    md = S.markdown(doc, "sft")
    assert md.count("] *") == 1 and "within the seed spread" in md
    # one seed: no spread, nothing marked (a zero sd would mark every difference)
    one = S.StudyConfig(variants=cfg.variants, seeds=[0], bootstrap=50, eval=S.StudyEval(lm_eval=False))
    doc1 = S.tabulate(one, {v: {0: r[0]} for v, r in results.items()}, res(2.0), {})
    assert doc1["table"]["far"]["bits_per_byte"]["vs_baseline"]["beyond_seed_spread"] is None
    md1 = S.markdown(doc1, "sft")
    assert "] *" not in md1 and "One seed" in md1
