"""The export's model card (<export>/README.md): what was fused from what, how, on which data, what it measured.

    write_model_card(export_dir, cfg, summary, inputs)   rank 0, after the export (and its report) exist

Everything in the card is read from the run itself - the resolved config, the sources' store manifests (the
model each source ran with), the data digests the checkpoints recorded, the validation-picked step, the
report's held-out numbers - so a card never claims what the run did not do. The YAML header is the Hugging
Face model-card metadata (library_name, tags, base_model when the target is a hub-style id).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import write_text_atomic
from ..models import hub_id


def model_card(cfg, summary: dict, inputs: dict) -> str:
    """The card's markdown (cfg: the run's TrainConfig; summary: train()'s summary; inputs: the data digests)."""
    from .evaluate import source_models

    try:
        from profuser import __version__
    except ImportError:  # pragma: no cover - the engine imported without the top-level package
        __version__ = "unknown"
    sources = source_models(cfg.data.data_dir, list(cfg.data.sources))
    repo = hub_id(str(cfg.model.student))
    base = repo[0] if repo else None
    head = ["---", "library_name: transformers", "tags: [profuser, knowledge-fusion, distillation]"]
    if base:
        head.append(f"base_model: {base}")
    head += ["---", ""]
    sel = summary.get("selected")
    s, loss = cfg.schedule, cfg.loss
    lines = [
        f"# {Path(cfg.output_dir).name}: {cfg.model.student} fused from {len(sources)} source(s)",
        "",
        f"Trained with ProFuser {__version__} (knowledge fusion of several source LLMs into one target, "
        "arXiv 2408.04998). Every line below is read from the run.",
        "",
        "| | |", "|---|---|",
        f"| target (student) | `{cfg.model.student}` |",
        *[f"| source `{name}` | `{spec}` |" for name, spec in sources.items()],
        f"| schedule | `{s.kind}` (switch at {s.switch_fraction:g} of the steps; stage 1 weights {s.stage1}, "
        f"stage 2 {s.stage2}) |",
        f"| loss | {loss.lam:g} CE + {1 - loss.lam:g} KL(fused teacher top-{cfg.data.k} \\|\\| student), temperature "
        f"{loss.temperature:g}, missing mass `{loss.missing_mass}`, span rule `{cfg.data.span_rule}` |",
        f"| fusion weights | `{cfg.data.advantage}` per {cfg.data.advantage_level}, CE {cfg.data.ce_metric} |",
        f"| optimizer | AdamW lr {cfg.optim.lr:g} ({cfg.optim.decay}), {cfg.optim.max_steps} steps, seed {cfg.seed} |",
        f"| exported step | {sel['step']} (lowest validation bits/byte {sel['bits_per_byte']:.4f} on "
        f"`{cfg.eval.validation}`) |" if sel else f"| exported step | {cfg.optim.max_steps} (the last) |",
        f"| weights | {cfg.checkpoint.export_dtype} safetensors |",
        "",
        "## Data (sha256 of what the run trained on)",
        "",
        *[f"- `{part}`: `{digest}`" for part, digest in sorted(inputs.items())],
    ]
    report = Path(summary["report"]) if summary.get("report") else None
    if report is not None and (report.parent / "report.json").is_file():
        got = json.loads((report.parent / "report.json").read_text())
        lines += ["", f"## Held-out results (`{cfg.eval.data}`, {got['meta'].get('n_examples')} examples)", "",
                  "| model | bits/byte | NLL/token |", "|---|---:|---:|"]
        lines += [f"| {name} | {r['bits_per_byte']:.4f} | {r['nll_per_token']:.4f} |"
                  for name, r in got["results"].items()]
    lines += ["", "The full resolved configuration is `config.yaml` beside the run's checkpoints."]
    return "\n".join(head + lines) + "\n"


def write_model_card(export_dir: str | Path, cfg, summary: dict, inputs: dict) -> Path:
    path = Path(export_dir) / "README.md"
    write_text_atomic(path, model_card(cfg, summary, inputs))
    return path
