"""`profuser export`: a run's exported model as a folder to publish, checked the way a hub user will load it.

    profuser export runs/mine/train --out runs/mine/publish --push-ready [--dtype bfloat16] [--license apache-2.0]
    hf upload me/my-fused-model runs/mine/publish

SRC is an export (a folder a run wrote: `<output_dir>/final` or `checkpoint.export_dir`, marked by
profuser_export.json) or a run's output folder (its export is found through the run's config.yaml). The
folder is copied to --out (written beside it and renamed, so a killed export leaves no half folder); --dtype
re-saves the weights in that dtype. --push-ready also checks everything a hub user's first
`from_pretrained` needs, each failure one line naming the file:
  - weights only as safetensors (a pickle - *.bin, *.pt, *.pth, *.pkl - runs code when loaded);
  - a full model loads with AutoModelForCausalLM and gives finite logits on a chat prompt; a LoRA adapter
    (adapter_config.json) names its base model by a hub id, not a local folder (--base-model sets it);
  - the tokenizer loads and has a chat template (the one the model was trained with);
  - the model card (README.md) has its metadata header; --license writes `license:` into it;
and leaves out what is the run's bookkeeping, not the model's (profuser_export.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config_cli import Flag, add_config_arguments, config_from_args
from ..config_tree import ConfigError
from ..models import hub_id
from ..trainer.checkpoint import EXPORT_MARKER

PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
DTYPES = ("float32", "bfloat16", "float16")


class ExportError(ValueError):
    """The export cannot be published as it is; the message names the file and the fix."""


@dataclass
class ExportConfig:
    """Options of `profuser export`."""

    src: str  # an export folder (profuser_export.json) or a run's output folder
    out: str  # the folder to write (must not exist, or be empty)
    push_ready: bool = False  # check what a hub user's from_pretrained needs; leave out the run's bookkeeping
    dtype: str | None = None  # re-save the weights as float32 | bfloat16 | float16 (None: as exported)
    license: str | None = None  # a hub licence id written into the model card's metadata (e.g. apache-2.0)
    base_model: str | None = None  # an adapter's base model hub id, when the run trained from a local folder

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPES)}")


def export_folder(src: str | Path) -> Path:
    """The export folder of SRC: itself when it is an export, else the export its run's config.yaml names."""
    src = Path(src)
    if (src / EXPORT_MARKER).is_file():
        return src
    config = src / "config.yaml"
    if not config.is_file():
        raise ExportError(f"{src}: neither an export ({EXPORT_MARKER}) nor a run folder (config.yaml)")
    import yaml

    ckpt = (yaml.safe_load(config.read_text()) or {}).get("checkpoint", {})
    folder = Path(ckpt.get("export_dir") or src / "final")
    if not (folder / EXPORT_MARKER).is_file():
        raise ExportError(f"{src}: the run has no export at {folder} yet (it exports when it finishes, with "
                          "checkpoint.export=true)")
    return folder


def check_files(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES)
    if pickles:
        raise ExportError(f"{folder / pickles[0]}: a pickle ({', '.join(pickles)}); publish safetensors only "
                          "(a pickle runs code on the machine that loads it)")
    if not any(folder.glob("*.safetensors")):
        raise ExportError(f"{folder}: no *.safetensors weights")


def check_adapter(folder: Path, base_model: str | None) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if base_model:
        cfg["base_model_name_or_path"] = base_model
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    base = str(cfg.get("base_model_name_or_path") or "")
    if not base or hub_id(base) is None:
        raise ExportError(f"{path}: base_model_name_or_path {base!r} is not a hub id (owner/name), so no one else "
                          "can load the adapter; pass --base-model owner/name")


def check_model(folder: Path) -> None:
    """The model and tokenizer load as a hub user loads them, and a chat prompt gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tok, "chat_template", None):
        raise ExportError(f"{folder}: the tokenizer has no chat template (tokenizer_config.json or "
                          "chat_template.jinja): users would prompt the model in another layout than it learned")
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits
    if not torch.isfinite(logits).all():
        raise ExportError(f"{folder}: the model's logits on a chat prompt are not finite (NaN / inf weights?)")


def set_license(card: Path, license_id: str | None) -> None:
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if not text.startswith("---\n"):
        raise ExportError(f"{card}: no model card with a metadata header (the run writes one with its export)")
    if license_id:
        head, sep, body = text[4:].partition("\n---\n")
        lines = [ln for ln in head.splitlines() if not ln.startswith("license:")] + [f"license: {license_id}"]
        card.write_text("---\n" + "\n".join(lines) + sep + body, encoding="utf-8")


def export(cfg: ExportConfig, log=print) -> Path:
    src, out = export_folder(cfg.src), Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not empty")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(EXPORT_MARKER) if cfg.push_ready else None)
    try:
        finish(cfg, src, tmp, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a refused or killed export leaves no half folder
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    log(f"[export] {src} -> {out}" + (" (push-ready: safetensors, loads, chat template, card)"
                                      if cfg.push_ready else ""))
    return out


def finish(cfg: ExportConfig, src: Path, tmp: Path, log=print) -> None:
    """The copy in `tmp`: weights re-saved in --dtype, and with --push-ready every check and the licence."""
    adapter = (tmp / "adapter_config.json").is_file()
    if cfg.dtype and adapter:
        log(f"[export] --dtype {cfg.dtype}: not applied, an adapter is copied in the dtype its run exported")
    if cfg.dtype and not adapter:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=getattr(torch, cfg.dtype))
        for f in tmp.glob("*.safetensors*"):
            f.unlink()
        model.save_pretrained(str(tmp))
    if cfg.push_ready:
        check_files(tmp)
        set_license(tmp / "README.md", cfg.license)
        check_adapter(tmp, cfg.base_model) if adapter else check_model(tmp)
        if not cfg.license:
            log("[export] the card names no licence: pass --license <id> (the target's and the sources' terms "
                "decide which)")


FLAGS = {"src": Flag(name="src"), "push_ready": Flag(name="--push-ready")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, ExportConfig, flags=FLAGS)


def run_command(args: argparse.Namespace) -> int:
    export(config_from_args(ExportConfig, args))
    return 0
