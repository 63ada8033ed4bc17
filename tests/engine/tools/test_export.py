"""`profuser export`: an export (a tiny model with the real SmolLM2 tokenizer, marked as a run marks it) copied to
a folder to publish: found from a run folder, re-saved in bf16, checked as a hub user loads it, the licence
written into the card, the run's bookkeeping left out; each thing a user could not load is one named error."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from profuser.engine.cli import main as profuser_main
from profuser.engine.models import tiny_model_dir
from profuser.engine.tools import export as E
from profuser.engine.trainer.checkpoint import EXPORT_MARKER

CARD = "---\nlibrary_name: transformers\ntags: [profuser]\n---\n\n# run: fused\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run folder whose config.yaml names its export folder (checkpoint.export_dir), as a finished run has."""
    root = tmp_path_factory.mktemp("export")
    folder = tiny_model_dir("smollm2-135m-instruct", out_dir=root / "published-by-run")
    (folder / "README.md").write_text(CARD)
    (folder / EXPORT_MARKER).write_text(json.dumps({"checkpoint": None}) + "\n")
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"checkpoint": {"export_dir": str(folder)}}))
    return run, folder


def test_a_push_ready_export_loads_as_users_load_it(exported, tmp_path):
    run, folder = exported
    out = tmp_path / "publish"
    rc = profuser_main(["export", str(run), "--out", str(out), "--push-ready", "--dtype", "bfloat16",
                        "--license", "apache-2.0"])
    assert rc == 0
    assert not (out / EXPORT_MARKER).exists() and (folder / EXPORT_MARKER).exists()  # the source is untouched
    assert "license: apache-2.0" in (out / "README.md").read_text().split("---")[1]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(model.parameters()).dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(str(folder))
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16)), name  # the same weights, rounded once
    assert not any(out.parent.glob("*.tmp"))

    with pytest.raises(E.ExportError, match=r"--out .*publish: exists and is not empty"):
        E.export(E.ExportConfig(src=str(folder), out=str(out)))


def test_what_a_user_could_not_load_is_one_named_error(exported, tmp_path):
    run, folder = exported
    bad = tmp_path / "bad"
    E.export(E.ExportConfig(src=str(folder), out=str(bad)))  # without --push-ready: a plain copy, marker kept
    assert (bad / EXPORT_MARKER).exists()

    (bad / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(E.ExportError, match=r"training_args.bin: a pickle .*publish safetensors only"):
        E.export(E.ExportConfig(src=str(bad), out=str(tmp_path / "o1"), push_ready=True))
    (bad / "training_args.bin").unlink()

    (bad / "README.md").write_text("# no metadata\n")
    with pytest.raises(E.ExportError, match=r"README.md: no model card with a metadata header"):
        E.export(E.ExportConfig(src=str(bad), out=str(tmp_path / "o2"), push_ready=True))
    (bad / "README.md").write_text(CARD)

    adapter = {"base_model_name_or_path": str(folder), "peft_type": "LORA", "r": 4}
    (bad / "adapter_config.json").write_text(json.dumps(adapter))
    with pytest.raises(E.ExportError, match=r"adapter_config.json: base_model_name_or_path .* is not a hub id .*"
                                            r"--base-model owner/name"):
        E.export(E.ExportConfig(src=str(bad), out=str(tmp_path / "o3"), push_ready=True))
    out = E.export(E.ExportConfig(src=str(bad), out=str(tmp_path / "o4"), push_ready=True,
                                  base_model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o3.tmp").exists()  # a refused export leaves nothing

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(yaml.safe_dump({"checkpoint": {"export_dir": None}}))
    with pytest.raises(E.ExportError, match=r"unfinished: the run has no export at .*final yet"):
        E.export(E.ExportConfig(src=str(unfinished), out=str(tmp_path / "o5")))
    with pytest.raises(E.ExportError, match=r"neither an export .* nor a run folder"):
        E.export(E.ExportConfig(src=str(tmp_path), out=str(tmp_path / "o6")))
