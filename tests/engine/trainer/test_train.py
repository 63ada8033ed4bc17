"""Training engine, single process: per-step losses against the reference backend, export reload,
resume after SIGKILL, SIGTERM checkpoint, NaN stop, store / vocabulary errors.

Student: a tiny random Llama with the real SmolLM2 tokenizer (models.tiny_model_dir). Teachers: the
student itself as a source and a GPT-2-tokenizer source (another vocabulary: vocab maps and offset
alignment run for real), written with the store's own writer from the data-fixture helpers (real chat
encodings, random top-k distributions). Two modes, both present, so the two_stage schedule switches.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import isolated_process_group, need, overrides, training_data

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", autouse=True)
def _isolate_process_group():
    yield from isolated_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("train"))


def run_inproc(s, out, **extra):
    from profuser.engine.config import load_config
    from profuser.engine.train import train

    return train(load_config(None, overrides(s, out, **extra)))


def losses(out, kind="train"):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


@pytest.fixture(scope="module")
def baseline(setup, tmp_path_factory):
    """An uninterrupted chunked-backend run (ZeRO-3, world size 1) with eval and export, padded (the packed
    default is compared with it below)."""
    out = tmp_path_factory.mktemp("base")
    summary = run_inproc(setup, out, **{"data.packing": "false", "eval.data": setup["heldout"], "eval.max_examples": 6,
                                        "eval.references": False, "eval.n_samples": 1, "eval.max_new_tokens": 4})
    return out, summary


def test_losses_match_reference_backend(setup, baseline, tmp_path):
    base, _ = baseline
    ref = tmp_path / "ref"
    run_inproc(setup, ref, **{"loss.backend": "reference", "checkpoint.export": False})
    a, b = losses(base), losses(ref)
    assert sorted(a) == list(range(1, 7))
    for step in a:
        for key in ("loss", "loss_infer", "loss_train", "ce_infer", "kd_infer"):
            if key in a[step]:
                assert a[step][key] == pytest.approx(b[step][key], rel=2e-4, abs=1e-5), (step, key)
    # the schedule ran: infer only in stage 1, both modes (w = 0.1, 1) in stage 2
    assert [a[s]["w_infer"] for s in a] == [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]
    assert "loss_train" not in a[1] and "loss_train" in a[6]
    assert a[6]["loss"] == pytest.approx(0.1 * a[6]["loss_infer"] + a[6]["loss_train"], rel=1e-5)
    assert a[3]["loss_infer"] < a[1]["loss_infer"]  # it learns


def test_packed_training_gives_the_same_losses(setup, baseline, tmp_path):
    """data.packing: the same examples per micro-step, packed into rows (both modes, ZeRO-3, the two_stage
    switch): every step's losses equal the padded run's (fp32, chunked backend)."""
    from profuser.engine.config import load_config
    from profuser.engine.loader.stream import build_streams
    from profuser.engine.models import load_tokenizer

    base, _ = baseline
    packed = {"data.packing": "true", "data.max_tokens_per_row": 128}  # two examples of <= 64 tokens per row
    # the run's batches are packed (so equal losses below cannot come from packing silently off)
    cfg = load_config(None, overrides(setup, tmp_path / "probe", **packed))
    batch = build_streams(cfg, load_tokenizer(setup["student"]), ["train"], 0, 1)["train"].next()
    assert batch["packed"] and batch["input_ids"].shape[0] < len(batch["example_ids"])
    run_inproc(setup, tmp_path / "packed", **packed, **{"checkpoint.export": False})
    a, b = losses(base), losses(tmp_path / "packed")
    assert sorted(b) == sorted(a)
    for step in a:
        for key in ("loss", "loss_infer", "loss_train", "ce_infer", "kd_infer", "ce_train", "kd_train", "tokens"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=2e-4, abs=1e-5), (step, key)


def test_export_reloads_with_same_nll(setup, baseline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profuser.engine.trainer.evaluate import load_eval_examples, nll_rows, summarize

    out, summary = baseline
    final = Path(summary["export"])
    assert (final / "model.safetensors").is_file() and (final / "tokenizer_config.json").is_file()
    lm = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        res = summarize(nll_rows(lm, tok, load_eval_examples(setup["heldout"], 6), max_length=64, batch_size=4,
                                 device=torch.device("cpu")))
    # the engine's own final eval (ZeRO-3 partitioned module) equals the exported folder's
    assert res["nll_per_token"] == pytest.approx(summary["eval"]["nll_per_token"], rel=1e-5)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["results"]["student (after)"]["nll_per_token"] == pytest.approx(res["nll_per_token"], rel=1e-4)
    assert len(report["samples"]) == 1
    # and training changed the weights
    init = AutoModelForCausalLM.from_pretrained(setup["student"])
    assert not torch.allclose(init.model.norm.weight, lm.model.norm.weight)


def spawn(setup, out, *extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, str(REPO / "engine" / "train.py"), *overrides(setup, out, **{"checkpoint.export": False}),
           *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc, out, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = Path(out) / "metrics.jsonl"
        if m.exists() and any(json.loads(x)["step"] >= step for x in m.read_text().splitlines() if x.strip()):
            return
        if proc.poll() is not None:
            pytest.fail("run ended before step %d:\n%s" % (step, proc.stdout.read()[-3000:]))
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timeout waiting for step %d" % step)


def test_resume_after_sigkill_gives_same_losses(setup, baseline, tmp_path):
    base, _ = baseline
    out = tmp_path / "killed"
    # the script entry point (no launcher, no sys.path edit): killed without warning after step 3
    proc = spawn(setup, out, "optim.max_steps=6")
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step00000002", "step00000004"), latest
    resumed = run_inproc(setup, out, **{"checkpoint.export": False})
    assert resumed["start_step"] == int(latest[4:])
    a, b = losses(base), losses(out)
    assert sorted(b) == list(range(1, 7))
    # fp32 noise between processes is ~1e-6 relative; a wrong resume (batch order, optimizer or lr state,
    # RNG) moves the loss by far more (consecutive steps differ by > 1e-2 here)
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=2e-5), step
    assert min(abs(a[s + 1]["loss"] - a[s]["loss"]) / a[s]["loss"] for s in range(1, 6)) > 1e-3


def test_packed_run_under_a_token_budget_resumes_after_sigkill(setup, tmp_path):
    """data.packing with data.micro_batch_tokens: a run killed after step 3 and resumed gives every step the
    uninterrupted run's loss (the resumed loader continues with the same micro-batches and packed rows)."""
    packed = {"data.packing": "true", "data.micro_batch_tokens": 150, "data.max_tokens_per_row": 96}
    whole = tmp_path / "whole"
    run_inproc(setup, whole, **packed, **{"checkpoint.export": False})
    out = tmp_path / "killed"
    proc = spawn(setup, out, "optim.max_steps=6", *[f"{k}={v}" for k, v in packed.items()])
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_inproc(setup, out, **packed, **{"checkpoint.export": False})
    assert resumed["start_step"] in (2, 4)
    a, b = losses(whole), losses(out)
    assert sorted(b) == sorted(a) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=2e-5), step
        assert b[step]["tokens"] == a[step]["tokens"], step


def test_sigterm_saves_checkpoint(setup, tmp_path):
    out = tmp_path / "term"
    proc = spawn(setup, out, "optim.max_steps=50", "checkpoint.every=0")
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    last = max(losses(out))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{last:08d}"
    state = torch.load(out / "checkpoints" / f"step{last:08d}" / "trainer_rank00000.pt", weights_only=False)
    assert state["step"] == last and set(state["loaders"]) == {"infer", "train"}


def test_nan_loss_stops_with_ids_and_checkpoint(setup, tmp_path, monkeypatch):
    from profuser.engine.trainer import step as step_mod

    calls = {"n": 0}
    forward = step_mod.FusionStep.forward

    def poisoned(self, batch, mode_scale):  # the 2nd micro-batch of step 2 (index 1) is NaN
        loss, stats = forward(self, batch, mode_scale)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), stats

    monkeypatch.setattr(step_mod.FusionStep, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(step_mod.NonFiniteLossError) as e:
        run_inproc(setup, out, **{"checkpoint.every": 0})
    msg = str(e.value)
    assert "at step 1" in msg and "example ids of the batch: ['" in msg
    nan_ckpt = out / "checkpoints" / "nan-step00000001"
    state = torch.load(nan_ckpt / "trainer_rank00000.pt", weights_only=False)
    assert state["step"] == 1 and str(nan_ckpt) in msg
    assert not (out / "checkpoints" / "latest").exists()  # a NaN checkpoint is never auto-resumed


def test_store_and_vocab_errors(setup, tmp_path):
    from profuser.engine.config import load_config
    from profuser.engine.loader.stream import check_stores, check_vocab_rows

    cfg = load_config(None, overrides(setup, tmp_path, **{"data.data_dir": str(tmp_path / "none")}))
    with pytest.raises(FileNotFoundError, match="prepared set"):
        check_stores(cfg, ["infer", "train"])
    cfg = load_config(None, overrides(setup, tmp_path, **{"data.sources": "[self, missing]"}))
    with pytest.raises(FileNotFoundError, match="source 'missing'"):
        check_stores(cfg, ["train"])
    # a store built for another prepared set
    import shutil

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    from profuser.engine import store

    pm = store.PreparedManifest.load(data)  # another prepared set in the same folder, written properly
    pm.fingerprint = "another"
    pm.save(data)
    cfg = load_config(None, overrides(setup, tmp_path, **{"data.data_dir": str(data)}))
    with pytest.raises(ValueError, match="another prepared set"):
        check_stores(cfg, ["train"])

    class FakeLoader:
        source_names = ["self", "gpt2"]
        vocab_maps = [None, torch.tensor([3, 49151, -1], dtype=torch.int32)]

    check_vocab_rows(FakeLoader(), 49152, "s")
    with pytest.raises(ValueError, match="gpt2"):
        check_vocab_rows(FakeLoader(), 1000, "s")


def test_merge_modes_pads_and_concatenates():
    from profuser.engine.config import MODE_ID
    from profuser.engine.trainer.step import merge_modes

    def b(mode, B, L):
        return {"input_ids": torch.ones(B, L, dtype=torch.long), "attention_mask": torch.ones(B, L, dtype=torch.long),
                "labels": torch.full((B, L), 5), "teacher_ids": torch.zeros(2, B, L, 3, dtype=torch.int32),
                "teacher_logprobs": torch.zeros(2, B, L, 3), "teacher_weights": torch.ones(2, B, L),
                "mode": torch.full((B,), mode), "example_ids": [f"{mode}{i}" for i in range(B)], "n_tokens": B * L}

    infer, train = MODE_ID["infer"], MODE_ID["train"]
    m = merge_modes([b(infer, 2, 3), b(train, 1, 5)], pad_id=7)
    assert m["input_ids"].shape == (3, 5) and m["teacher_ids"].shape == (2, 3, 5, 3)
    assert (m["input_ids"][:2, 3:] == 7).all() and (m["labels"][:2, 3:] == -100).all()
    assert (m["attention_mask"][:2, 3:] == 0).all() and (m["teacher_ids"][:, :2, 3:] == -1).all()
    assert m["mode"].tolist() == [infer, infer, train] and m["n_tokens"] == 11 and m["example_ids"][2] == f"{train}0"


def test_plot_renders_png_and_rejects_bad_rows(baseline, tmp_path):
    from profuser.engine.tools.plot import plot

    base, _ = baseline
    png = plot(base, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{oops\n')
    with pytest.raises(ValueError, match="row 1"):
        plot(bad, tmp_path / "x.png")


def test_eval_counts_bytes_and_rejects_bad_rows(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profuser.engine.trainer.evaluate import load_eval_examples, nll_rows

    ex = load_eval_examples(setup["heldout"], 3)
    lm = AutoModelForCausalLM.from_pretrained(setup["student"]).eval()
    tok = AutoTokenizer.from_pretrained(setup["student"])
    with torch.no_grad():
        full = nll_rows(lm, tok, ex, max_length=None, batch_size=2, device=torch.device("cpu"))
        one = nll_rows(lm, tok, ex[1:2], max_length=None, batch_size=1, device=torch.device("cpu"))
        from profuser.engine.text.chat import encode_example

        room = int(encode_example(tok, ex[0]["prompt"], ex[0]["response"], system=ex[0]["system"]).pred_pos[0]) + 3
        cut = nll_rows(lm, tok, ex[:1], max_length=room, batch_size=1, device=torch.device("cpu"))
        # a prompt longer than max_length alone is evaluated untruncated, never a crash of the run
        tiny = nll_rows(lm, tok, ex[:1], max_length=room - 3, batch_size=1, device=torch.device("cpu"))
    for (nll, n_tok, n_bytes), e in zip(full, ex):
        assert n_bytes == len(e["response"].encode()) + 1 and n_tok >= 2 and nll > 0
    assert one[0][0] == pytest.approx(full[1][0], rel=1e-5)  # batching / padding does not change the NLL
    assert cut[0][2] < full[0][2] and cut[0][1] < full[0][1]  # truncation: fewer bytes, no end-of-turn
    assert tiny[0] == pytest.approx(full[0], rel=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1: field 'response'"):
        load_eval_examples(bad)


@pytest.mark.parametrize("kind, modes", [("two_stage", ["infer", "train"]), ("train_only", ["train"]),
                                         ("infer_only", ["infer"]), ("reverse", ["infer", "train"])])
def test_zero_weight_modes_are_never_opened(setup, tmp_path, kind, modes):
    import shutil

    from profuser.engine.config import load_config
    from profuser.engine.loader.stream import check_stores
    from profuser.engine.trainer.schedule import active_modes

    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    cfg = load_config(None, overrides(setup, tmp_path, **{"schedule.kind": kind, "data.data_dir": str(data)}))
    assert active_modes(cfg) == modes
    for src in ("self", "gpt2"):  # remove the stores of the unused mode: training still finds what it needs
        for m in {"infer", "train"} - set(modes):
            shutil.rmtree(data / "teachers" / src / m)
    check_stores(cfg, active_modes(cfg))


def test_zero3_loads_the_student_partitioned(setup, tmp_path):
    """Under ZeRO-3 the student is partitioned while it loads (zero.Init), never held whole per rank;
    the logical shapes stay available for the vocabulary check and the weight-decay groups."""
    from profuser.engine.config import load_config
    from profuser.engine.dist import setup_distributed
    from profuser.engine.trainer.deepspeed_setup import deepspeed_config, full_shape, load_student

    setup_distributed()
    cfg = load_config(None, overrides(setup, tmp_path))
    assert deepspeed_config(cfg, torch.float32)["zero_optimization"]["stage"] == 3
    lm = load_student(cfg, torch.float32, deepspeed_config(cfg, torch.float32))
    head = lm.get_output_embeddings().weight
    assert hasattr(head, "ds_id") and head.numel() == 0          # partitioned: no full local copy
    assert tuple(full_shape(head)) == (lm.config.vocab_size, lm.config.hidden_size)
    plain = load_student(cfg, torch.float32, {})             # no DeepSpeed config: a plain model
    assert not hasattr(plain.get_output_embeddings().weight, "ds_id")


def test_an_alias_student_loads_under_zero3_from_an_empty_model_cache(setup, tmp_path, monkeypatch):
    """An alias student (a GGUF converted once into the model cache) under ZeRO-3 with nothing cached yet: the
    conversion runs before the partitioned-init context, so the cached folder holds whole weights and the
    partitioned student loads (the bug: a conversion inside zero.Init saved empty [0] tensors)."""
    from profuser.engine.config import load_config
    from profuser.engine.dist import setup_distributed
    from profuser.engine.trainer.deepspeed_setup import deepspeed_config, full_shape, load_student

    need("smollm2-135m-instruct")
    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "empty-cache"))
    setup_distributed()
    cfg = load_config(None, overrides(setup, tmp_path / "run", **{"model.student": "smollm2-135m-instruct"}))
    lm = load_student(cfg, torch.float32, deepspeed_config(cfg, torch.float32))
    head = lm.get_output_embeddings().weight
    assert hasattr(head, "ds_id") and tuple(full_shape(head)) == (49152, 576)
    from safetensors import safe_open

    folder = next((tmp_path / "empty-cache").rglob("model.safetensors")).parent
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # the converted folder holds whole weights
        assert all(f.get_slice(k).get_shape() != [0] for k in f.keys())


def test_sft_trains_on_gold_only_with_train_only_batches(setup, tmp_path):
    """`sft` = plain fine-tuning: its loss is the CE alone (no teacher term), on the very batches `train_only`
    reads (same first-step CE from the same initial weights)."""
    common = {"optim.max_steps": 2, "checkpoint.every": 0}
    run_inproc(setup, tmp_path / "sft", **common, **{"schedule.kind": "sft"})
    run_inproc(setup, tmp_path / "fuse", **common, **{"schedule.kind": "train_only"})
    sft, fuse = losses(tmp_path / "sft"), losses(tmp_path / "fuse")
    for row in sft.values():
        assert row["loss"] == pytest.approx(row["ce_train"], rel=1e-6) and "ce_infer" not in row
    assert sft[1]["ce_train"] == pytest.approx(fuse[1]["ce_train"], rel=1e-6)
    assert fuse[1]["loss"] != pytest.approx(fuse[1]["ce_train"], rel=1e-3)  # the fusion run has its KD term


def test_a_killed_run_resumes_its_validation_curve(setup, tmp_path):
    """eval.validation with SIGKILL after step 3 (checkpoints every 2 steps): the resumed run's validation curve
    and selected step equal an uninterrupted run's (steps redone after the checkpoint are not counted twice)."""
    # the default small lr: at lr 1.0 the fp32 noise between two processes' thread counts grows to 1e-2 in a
    # few steps (measured in CI), which would hide whether the curve was resumed right
    val = {"eval.validation": setup["heldout"], "eval.every": 1}
    whole = tmp_path / "whole"
    run_inproc(setup, whole, **val)
    out = tmp_path / "killed"
    proc = spawn(setup, out, "optim.max_steps=6", "checkpoint.export=true", *[f"{k}={v}" for k, v in val.items()])
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_inproc(setup, out, **val)
    assert resumed["start_step"] in (2, 4)
    a, b = (json.loads((d / "validation.json").read_text()) for d in (whole, out))
    assert [c["step"] for c in b["curve"]] == list(range(1, 7))
    for x, y in zip(a["curve"], b["curve"]):
        assert y["bits_per_byte"] == pytest.approx(x["bits_per_byte"], rel=1e-5)
    assert b["best"]["step"] == a["best"]["step"] == json.loads((out / "final" / "selected.json").read_text())["step"]


def test_the_export_is_the_step_with_the_lowest_validation_loss(setup, tmp_path):
    """eval.validation: every eval.every steps the validation set is scored and the export is the student of
    the best step, not the last (lr 1.0 makes step 1 the best here and later steps worse); final/selected.json
    names it. checkpoint.export_dir never replaces a folder that is not a profuser export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profuser.engine.trainer.evaluate import load_eval_examples, nll_rows, summarize

    out = tmp_path / "run"
    summary = run_inproc(setup, out, **{"eval.validation": setup["heldout"], "eval.every": 1, "optim.lr": 1.0,
                                        "optim.warmup_steps": 0})
    curve = json.loads((out / "validation.json").read_text())["curve"]
    assert [c["step"] for c in curve] == list(range(1, 7))
    best = min(curve, key=lambda c: c["bits_per_byte"])
    assert best["step"] < 6 and curve[-1]["bits_per_byte"] > best["bits_per_byte"] * 1.05  # not the last step
    final = out / "final"
    selected = json.loads((final / "selected.json").read_text())
    assert summary["selected"]["step"] == selected["step"] == best["step"] and not (out / "best-step").exists()
    lm = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        res = summarize(nll_rows(lm, AutoTokenizer.from_pretrained(final), load_eval_examples(setup["heldout"]),
                                 max_length=64, batch_size=4, device=torch.device("cpu")))
    assert res["bits_per_byte"] == pytest.approx(best["bits_per_byte"], rel=1e-5)  # that step's student
    assert f"| exported step | {best['step']} (lowest validation bits/byte" in (final / "README.md").read_text()

    mine = tmp_path / "my-models"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    from profuser.engine.trainer.output_dir import OutputDirError

    with pytest.raises(OutputDirError, match=f"checkpoint.export_dir={mine}: not empty and not a profuser export"):
        run_inproc(setup, tmp_path / "run2", **{"checkpoint.export_dir": str(mine), "optim.max_steps": 1})
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("stage", [0, 3])
def test_a_bf16_export_with_its_model_card(setup, tmp_path, stage):
    """checkpoint.export_dtype=bfloat16: the export holds bf16 safetensors (ZeRO-0 and ZeRO-3 paths) whose eval
    NLL is the fp32 engine's within bf16 rounding; its README.md card is read from the run (target, sources,
    schedule, the data digests, the report's numbers)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profuser.engine.trainer.evaluate import load_eval_examples, nll_rows, summarize

    out = tmp_path / "bf16"
    summary = run_inproc(setup, out, **{"checkpoint.export_dtype": "bfloat16", "deepspeed.zero_optimization.stage":
                                        stage, "eval.data": setup["heldout"], "eval.max_examples": 6,
                                        "eval.references": False, "eval.n_samples": 0})
    final = Path(summary["export"])
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    lm = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        res = summarize(nll_rows(lm, AutoTokenizer.from_pretrained(final), load_eval_examples(setup["heldout"], 6),
                                 max_length=64, batch_size=4, device=torch.device("cpu")))
    assert res["nll_per_token"] == pytest.approx(summary["eval"]["nll_per_token"], rel=2e-2)
    assert res["nll_per_token"] != pytest.approx(summary["eval"]["nll_per_token"], rel=1e-7)  # it was rounded
    card = (final / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"| target (student) | `{setup['student']}` |" in card and "| source `gpt2` |" in card
    assert "| schedule | `two_stage`" in card and "| weights | bfloat16 safetensors |" in card
    assert "| student (after) |" in card and len([x for x in card.splitlines() if x.startswith("- `")]) >= 3


@pytest.mark.parametrize("stage,export", [(0, "merged"), (0, "adapter"), (3, "merged"), (3, "adapter")])
def test_a_lora_run_trains_the_adapter_only_and_its_export_reloads(setup, tmp_path, stage, export):
    """model.lora.r > 0 (peft), under ZeRO-0 and ZeRO-3 (partitioned base and adapter, the export consolidated
    from the checkpoint): the loss goes down, only the adapter trains (the embedding, a non-target module, is
    the target's own; q_proj moved once merged), and the export - merged (a plain transformers folder) or the
    adapter alone (profuser loads it onto its base) - gives the engine's own eval NLL."""
    from transformers import AutoModelForCausalLM

    from profuser.engine.models import load_model, load_tokenizer
    from profuser.engine.trainer.evaluate import load_eval_examples, nll_rows, summarize

    out = tmp_path / "lora"
    summary = run_inproc(setup, out, **{"model.lora.r": 4, "model.lora.export": export, "optim.lr": 3e-2,
                                        "optim.warmup_steps": 0, "deepspeed.zero_optimization.stage": stage,
                                        "eval.data": setup["heldout"], "eval.max_examples": 6,
                                        "eval.references": False, "eval.n_samples": 0})
    train = losses(out)
    assert train[6]["loss"] < train[1]["loss"] * 0.9
    final = Path(summary["export"])
    assert (final / ("config.json" if export == "merged" else "adapter_config.json")).is_file()
    lm = load_model(final).eval()
    with torch.no_grad():
        res = summarize(nll_rows(lm, load_tokenizer(final), load_eval_examples(setup["heldout"], 6), max_length=64,
                                 batch_size=4, device=torch.device("cpu")))
    assert res["nll_per_token"] == pytest.approx(summary["eval"]["nll_per_token"], rel=1e-5)
    init = AutoModelForCausalLM.from_pretrained(setup["student"])
    assert torch.equal(init.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert not torch.allclose(init.model.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight)
