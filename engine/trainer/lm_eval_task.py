"""A knowledge task for lm-evaluation-harness built from held-out (prompt, response) pairs, and its runner.

    profuser eval --data runs/demo/heldout.jsonl --model runs/demo/train/final --lm-eval     # build + run
    lm_eval --model hf --model_args pretrained=runs/demo/train/final,dtype=float32 \\
        --include_path lm_eval_task --tasks profuser_heldout_mc --apply_chat_template  # the same, by hand
    (a model without a chat template, e.g. the Gemma-3 GGUF alias, also needs `,tokenizer=<copy>`: `profuser
    eval` prints the whole line; our exports carry the template they were trained with)

The task: each held-out prompt with four candidate answers, its own gold response and the gold responses of
three other held-out prompts (distractors drawn with a fixed seed, never the gold itself, never a duplicate
text). The model picks the candidate with the highest log-likelihood as the assistant's answer
(`output_type: multiple_choice`; lm-eval reports `acc` and the length-normalised `acc_norm`). On the shipped
WordNet corpus this is "pick the right definition of a word among four": knowledge a model has or lacks,
which held-out NLL on the gold answers alone does not separate from fitting the answers' style.

Files written to the task folder: `<task>.yaml` (the lm-eval task config, loading `items.jsonl` with the
`json` builder: no hub access) and `items.jsonl` ({id, question, choices, label}). Building is deterministic:
the same pairs and seed give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

TASK = "profuser_heldout_mc"
N_CHOICES = 4

_YAML = """\
# lm-evaluation-harness task written by profuser (engine/trainer/lm_eval_task.py); items.jsonl beside it
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def build_items(pairs: list[dict], seed: int = 0) -> list[dict]:
    """[{example_id?, prompt, response}] -> [{id, question, choices [4], label}] (label: the gold's index).

    Rows with earlier turns (`history`: a multi-turn conversation's later turns) are left out, with a warning
    counting them: lm-eval renders an item as one user message, so their context would be lost. ValueError
    when fewer than N_CHOICES distinct responses exist (no three distractors to draw)."""
    single = [p for p in pairs if not p.get("history")]
    if len(single) < len(pairs):
        import warnings

        warnings.warn(f"lm-eval task: {len(pairs) - len(single)} of {len(pairs)} rows continue a conversation "
                      "(earlier turns) and are left out: lm-eval renders an item as one user message", stacklevel=2)
    pairs = single
    texts = sorted({p["response"].strip() for p in pairs})
    if len(texts) < N_CHOICES:
        raise ValueError(f"lm-eval task: {len(texts)} distinct responses, need at least {N_CHOICES}")
    rng = random.Random(seed)
    items = []
    for i, p in enumerate(pairs):
        gold = p["response"].strip()
        others = [t for t in texts if t != gold]
        choices = rng.sample(others, N_CHOICES - 1) + [gold]
        rng.shuffle(choices)
        items.append({"id": str(p.get("example_id") or p.get("id") or i), "question": p["prompt"].strip(),
                      "choices": choices, "label": choices.index(gold)})
    return items


def write_task(pairs: list[dict], out_dir: str | Path, *, seed: int = 0, task: str = TASK) -> Path:
    """Write the task folder (module docstring); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = build_items(pairs, seed)
    (out / "items.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    (out / f"{task}.yaml").write_text(_YAML.format(task=task, items=str((out / "items.jsonl").resolve())))
    return out


def templated_tokenizer(model_dir: Path, out_root: Path) -> Path | None:
    """None when the model's tokenizer has a chat template; else a copy of it carrying the fallback template
    our training encoded with (text/chat.py: Gemma turn markers for the Gemma-3 GGUF, which ships none), so
    that lm-eval's `apply_chat_template` renders the prompts the way the model was trained on them."""
    from ..models import load_tokenizer
    from ..text.chat import fallback_chat_template

    tok = load_tokenizer(model_dir)
    if getattr(tok, "chat_template", None):
        return None
    out = out_root / hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]
    tok.chat_template = fallback_chat_template(tok)
    tok.save_pretrained(str(out))
    return out


def run_task(model_dir: str | Path, task_dir: str | Path, *, task: str = TASK, batch_size: int = 8,
             device: str = "cpu", dtype: str = "float32", limit: int | None = None) -> dict:
    """Run the task with lm-eval's `hf` model on a model spec: an alias (resolved to its converted folder,
    lm-eval would look it up on the hub) or an exported model folder (chat template applied, as the model
    was trained). Returns {"acc", "acc_norm", "n", "per_example": {id: {"acc", "acc_norm"}}, "model_args"}
    (model_args: what `lm_eval --model_args` needs to run the same by hand)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("the lm-eval task needs the lm-eval package: pip install lm-eval") from exc
    from ..models import resolve_model

    model_dir = resolve_model(model_dir)
    model_args = f"pretrained={model_dir},dtype={dtype}"
    tok_dir = templated_tokenizer(model_dir, Path(task_dir) / "tokenizers")
    if tok_dir is not None:
        model_args += f",tokenizer={tok_dir}"
    items = [json.loads(x) for x in (Path(task_dir) / "items.jsonl").read_text().splitlines()]
    res = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=[task], device=device,
        batch_size=batch_size, task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
        apply_chat_template=True, limit=limit)
    per = {}
    for s in res["samples"][task]:
        per[items[int(s["doc_id"])]["id"]] = {"acc": float(s["acc"]), "acc_norm": float(s["acc_norm"])}
    out = {k: float(res["results"][task][f"{k},none"]) for k in ("acc", "acc_norm")}
    return {**out, "n": len(per), "per_example": per, "model_args": model_args}
