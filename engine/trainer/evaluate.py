"""Held-out NLL / perplexity on gold responses, per predicted token and per byte (`profuser eval`).

For an example (prompt, response) a model with its own tokenizer and chat template predicts R tokens (the
response tokens plus the end-of-turn token, docs/contracts.md section 2):

    nll = -sum_r log p(token_r | prefix, tokens_<r)             (natural log)
    per token:  nll / R, perplexity exp(nll / R)                 (depends on the tokenizer)
    per byte:   nll / n_bytes, bits per byte nll / (n_bytes ln 2)  with n_bytes = UTF-8 bytes of the covered
                response + 1 for the end-of-turn                 (comparable across tokenizers)

Totals are sums over examples (nll_total / tokens_total), i.e. token-weighted means. Per byte is the
column to compare the student with sources that use another vocabulary.

The final report (Markdown + JSON) has one row for the student after training, the untouched target, and
every source (each with its own tokenizer and template), plus a few greedy samples of the student.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import MODES, ConfigError
from ..config_cli import Flag, add_config_arguments, config_from_args
from ..dist import device_for, release_freed_memory
from ..models import load_model, load_tokenizer, output_logits, pad_id, reference_models, resolve_dtype
from ..store import TeacherManifest, read_json
from ..text.chat import check_history, encode_example, predicted_bytes, split_conversation, turn_id


def load_eval_examples(path: str | Path, max_examples: int | None = None) -> list[dict]:
    """Rows {example_id, prompt, response, system, history} from a JSONL file, a Parquet file or a folder of
    part-*.parquet (a prepared set; history: the earlier turns of a multi-turn row, else None). A record may
    hold chat `messages` instead: one row per assistant turn, in the context of the turns before it (as
    `prepare` writes them; ids <id>#<n>). ValueError naming the file and row when a field is missing or
    malformed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"eval data {path} does not exist")
    rows: list[dict] = []
    if path.is_dir() or path.suffix == ".parquet":
        import pyarrow.parquet as pq

        files = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"eval data {path}: folder without part-*.parquet files")
        for f in files:
            for i, r in enumerate(pq.read_table(f).to_pylist()):
                rows += _rows(r, f, i)
                if max_examples and len(rows) >= max_examples:
                    return rows[:max_examples]
        return rows
    with open(path) as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {i}: not valid JSON ({e})") from None
            rows += _rows(r, path, i)
            if max_examples and len(rows) >= max_examples:
                return rows[:max_examples]
    return rows


def _rows(r: dict, path: Path, i: int) -> list[dict]:
    if not isinstance(r, dict):
        raise ValueError(f"{path}: row {i}: a record must be a JSON object, got {type(r).__name__}")
    if r.get("messages") is None:
        return [_row(r, path, i)]
    try:
        system, turns = split_conversation(r["messages"])
    except ValueError as exc:
        raise ValueError(f"{path}: row {i}: field 'messages': {exc}") from None
    rid = str(r.get("example_id", r.get("id", i)))
    return [{"example_id": turn_id(rid, t, len(turns)), "prompt": p, "response": a,
             "system": system, "history": h} for t, (p, a, h) in enumerate(turns)]


def _row(r: dict, path: Path, i: int) -> dict:
    for key in ("prompt", "response"):
        if not isinstance(r.get(key), str):
            raise ValueError(f"{path}: row {i}: field {key!r} missing or not a string")
    try:
        history = check_history(r.get("history")) or None
    except ValueError as exc:
        raise ValueError(f"{path}: row {i}: field 'history': {exc}") from None
    return {"example_id": str(r.get("example_id", r.get("id", i))), "prompt": r["prompt"],
            "response": r["response"], "system": r.get("system"), "history": history}


def _encode(tok, e: dict, max_length: int | None):
    """encode_example with the training max_length; a prompt that alone exceeds it is evaluated untruncated
    instead of failing the run (every model must see the same held-out examples to be comparable)."""
    try:
        return encode_example(tok, e["prompt"], e["response"], system=e["system"], history=e.get("history"),
                              max_length=max_length)
    except ValueError:
        if max_length is None:
            raise
        return encode_example(tok, e["prompt"], e["response"], system=e["system"], history=e.get("history"),
                              max_length=None)


PARTS = ("first_word", "content", "final_punct", "end_of_turn")


def position_parts(response: str, pred_offsets) -> np.ndarray:
    """int [R]: the index in PARTS of each predicted token of `response` (pred_offsets [R, 2] as in
    EncodedExample): the end-of-turn token (its span starts at len(response)); a token starting inside the first
    word (up to the first whitespace); one covering the final punctuation character; and the content between."""
    off = np.asarray(pred_offsets).reshape(-1, 2)
    text = response.rstrip()
    first_end = next((i for i, c in enumerate(response) if c.isspace()), len(response))
    last = len(text) - 1 if text and not text[-1].isalnum() else -1
    out = np.full(off.shape[0], PARTS.index("content"), np.int64)
    out[(off[:, 1] > last) & (off[:, 0] <= last) & (last >= 0)] = PARTS.index("final_punct")
    out[off[:, 0] < first_end] = PARTS.index("first_word")
    out[off[:, 0] >= len(response)] = PARTS.index("end_of_turn")
    return out


def nll_rows(lm, tok, examples: list[dict], *, max_length: int | None, batch_size: int,
             device: torch.device, parts: bool = False) -> list[tuple]:
    """Per example (nll_sum, n_predicted_tokens, n_bytes) under `lm` with tokenizer `tok`; with parts=True a
    fourth element, the NLL summed over each part of the answer ([len(PARTS)] floats, position_parts).

    The backbone runs on [B, L] and the output head only on the predicted positions ([N, H] -> [N, V]),
    so memory stays far below B * L * V for large vocabularies. Every rank of a ZeRO-3 job must call this
    with the same examples (the forwards gather parameters collectively).
    """
    backbone = getattr(lm, lm.base_model_prefix)
    pad = pad_id(tok)
    out: list[tuple[float, int, int]] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        encs = [_encode(tok, e, max_length) for e in chunk]
        L = max(len(x.input_ids) for x in encs)
        ids = torch.full((len(encs), L), pad, dtype=torch.long)
        mask = torch.zeros((len(encs), L), dtype=torch.long)
        for b, x in enumerate(encs):
            ids[b, :len(x.input_ids)] = torch.as_tensor(x.input_ids, dtype=torch.long)
            mask[b, :len(x.input_ids)] = 1
        hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device))[0]  # [B, L, H]
        pos = torch.cat([torch.as_tensor(x.pred_pos, dtype=torch.long) + b * L for b, x in enumerate(encs)])
        tgt = torch.cat([torch.as_tensor(x.pred_ids, dtype=torch.long) for x in encs]).to(device)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos.to(device))  # [N, H]
        logits = output_logits(lm, h)  # [N, V]: the model's own logits, as teach and training see them
        lp = logits.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1).double().cpu()  # [N]
        at = 0
        for e, x in zip(chunk, encs):
            R = x.n_predicted
            row = (float(-lp[at:at + R].sum()), R, predicted_bytes(e["response"], x.pred_offsets))
            if parts:
                by = np.zeros(len(PARTS))
                np.add.at(by, position_parts(e["response"], x.pred_offsets), -lp[at:at + R].numpy())
                row += (by.tolist(),)
            out.append(row)
            at += R
    return out


def summarize(rows: list[tuple[float, int, int]]) -> dict:
    nll = sum(r[0] for r in rows)
    toks = sum(r[1] for r in rows)
    nbytes = sum(r[2] for r in rows)
    per_tok = nll / max(toks, 1)
    per_byte = nll / max(nbytes, 1)
    return {"nll_per_token": per_tok, "ppl": math.exp(min(per_tok, 50.0)), "nll_per_byte": per_byte,
            "bits_per_byte": per_byte / math.log(2), "n_examples": len(rows), "n_tokens": toks, "n_bytes": nbytes}


def generate_samples(lm, tok, examples: list[dict], *, max_new_tokens: int, device: torch.device,
                     batch_size: int = 1) -> list[dict]:
    """Greedy continuations of the templated prompts, `batch_size` prompts per generate call.

    Batches are left-padded with the pad positions masked out, so each answer is the one-at-a-time answer
    up to float rounding (a near-tie between two tokens may still flip); batch_size 1 pads nothing."""
    pad = pad_id(tok)
    samples = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        prefixes = []
        for e in batch:
            enc = encode_example(tok, e["prompt"], "", system=e["system"], history=e.get("history"))
            prefixes.append(torch.as_tensor(enc.input_ids[: int(enc.pred_pos[0]) + 1], dtype=torch.long))
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, p in enumerate(prefixes):
            ids[j, width - len(p):], mask[j, width - len(p):] = p, 1
        with torch.no_grad():
            gen = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=pad)
        for j, e in enumerate(batch):
            text = tok.decode(gen[j, width:], skip_special_tokens=True)
            samples.append({"example_id": e["example_id"], "prompt": e["prompt"], "gold": e["response"],
                            "generated": text.strip()})
    return samples


def evaluate_specs(named: dict[str, str], examples: list[dict], *, max_length: int | None, batch_size: int,
                   device: torch.device | None = None, samples_of: str | None = None, n_samples: int = 0,
                   max_new_tokens: int = 48) -> tuple[dict, list]:
    """Evaluate several models (each loaded, used, freed in turn). Returns ({name: summary}, samples)."""
    device = device or device_for(0)
    dtype = resolve_dtype("auto", device)
    results, samples = {}, []
    for name, spec in named.items():
        tok = load_tokenizer(spec)
        lm = load_model(spec, dtype=dtype).to(device).eval()
        with torch.no_grad():
            res = summarize(nll_rows(lm, tok, examples, max_length=max_length, batch_size=batch_size,
                                     device=device))
        results[name] = {"model": str(spec), **res}
        if name == samples_of and n_samples:
            samples = generate_samples(lm, tok, examples[:n_samples], max_new_tokens=max_new_tokens, device=device)
        del lm
        gc.collect()
        release_freed_memory()  # the next model reuses nothing of this one (dist.py: host memory)
    return results, samples


def markdown_table(results: dict) -> str:
    lm = any("lm_eval_acc" in r for r in results.values())
    lines = ["| model | NLL / token | perplexity | bits / byte | tokens | bytes |" + (" lm-eval acc |" if lm else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if lm else "")]
    for name, r in results.items():
        acc = f" {r['lm_eval_acc']:.3f} |" if "lm_eval_acc" in r else (" – |" if lm else "")
        lines.append(f"| {name} | {r['nll_per_token']:.4f} | {r['ppl']:.2f} | {r['bits_per_byte']:.4f} | "
                     f"{r['n_tokens']} | {r['n_bytes']} |" + acc)
    return "\n".join(lines)


def write_report(out_dir: str | Path, results: dict, samples: list, meta: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps({"meta": meta, "results": results, "samples": samples},
                                                    indent=2))
    md = ["# ProFuser evaluation", "", f"Held-out set: `{meta.get('data')}` ({meta.get('n_examples')} examples, "
          "gold responses). Per byte is comparable across tokenizers; per token is not.", "",
          markdown_table(results), ""]
    if samples:
        md += ["## Samples (greedy)", ""]
        for s in samples:
            md += [f"**Prompt:** {s['prompt']}", "", f"- gold: {s['gold']}", f"- generated: {s['generated']}", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def source_models(data_dir: str | Path, sources: list[str]) -> dict[str, str]:
    """{source: model spec} from the teacher store manifests (the model each source was run with)."""
    out = {}
    for s in sources:
        for mode in MODES:
            m = TeacherManifest.path(data_dir, s, mode)
            if m.is_file():
                out[s] = read_json(m)["model"]
                break
        else:
            out[s] = s  # the source name is a model alias (the default layout)
    return out


def make_evaluator(cfg, tok, device: torch.device, data: str | None = None, max_examples: int | None = None):
    """A callable(lm) -> NLL dict on `data` (every rank runs the same forwards, as ZeRO-3 requires); None
    without data."""
    if not data:
        return None
    examples = load_eval_examples(data, max_examples)

    def evaluate_student(lm) -> dict:
        lm.eval()
        with torch.no_grad():
            rows = nll_rows(lm, tok, examples, max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size,
                            device=device)
        return summarize(rows)

    return evaluate_student


def final_report(cfg, student_dir: str | Path, out_dir: str | Path) -> Path:
    """Student after training, the untouched target and every source on the held-out set."""
    examples = load_eval_examples(cfg.eval.data, cfg.eval.max_examples)
    named = {"student (after)": str(student_dir)}
    if cfg.eval.references:
        named.update(reference_models(cfg.model.student, source_models(cfg.data.data_dir, cfg.data.sources)))
    results, samples = evaluate_specs(named, examples, max_length=cfg.data.max_length,
                                      batch_size=cfg.eval.batch_size, samples_of="student (after)",
                                      n_samples=cfg.eval.n_samples, max_new_tokens=cfg.eval.max_new_tokens)
    path = write_report(out_dir, results, samples, {"data": cfg.eval.data, "n_examples": len(examples),
                                                    "student": cfg.model.student, "output_dir": cfg.output_dir})
    print(markdown_table(results), file=sys.stderr, flush=True)
    return path


# ----------------------------------------------------------------------------------------------------
# command line: profuser eval --data heldout.jsonl --model student=runs/x/final --model smollm2-135m-instruct


@dataclass
class EvalCommandConfig:
    """Options of `profuser eval`."""

    data: str  # held-out JSONL / Parquet / prepared folder (prompt, response)
    models: list[str] = field(default_factory=list)  # NAME=SPEC or SPEC (alias or local HF folder), repeatable
    max_examples: int = 64  # held-out examples evaluated
    max_length: int = 512  # prompt + response tokens per example
    batch_size: int = 8  # examples per forward
    samples: int = 0  # greedy samples of the first model
    max_new_tokens: int = 48  # generated sample length
    out: str | None = None  # folder for report.md / report.json
    # also run the lm-eval multiple-choice task built from `data` (trainer/lm_eval_task.py) on every model; the
    # task folder goes to <out or .>/lm_eval_task
    lm_eval: bool = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, EvalCommandConfig, flags={"models": Flag("--model", parse=list)})


def run_command(args: argparse.Namespace) -> int:
    args = config_from_args(EvalCommandConfig, args)
    if not args.models:
        raise ConfigError("models: at least one (--model NAME=SPEC)")
    named = {}
    for m in args.models:
        name, _, spec = m.partition("=") if "=" in m else (m, "", m)
        named[name] = spec
    examples = load_eval_examples(args.data, args.max_examples)
    results, samples = evaluate_specs(named, examples, max_length=args.max_length, batch_size=args.batch_size,
                                      samples_of=next(iter(named)), n_samples=args.samples,
                                      max_new_tokens=args.max_new_tokens)
    if args.lm_eval:
        from .lm_eval_task import TASK, run_task, write_task

        task = write_task(examples, Path(args.out or ".") / "lm_eval_task")
        for name, spec in named.items():
            got = run_task(spec, task, batch_size=args.batch_size)
            results[name].update(lm_eval_acc=got["acc"], lm_eval_acc_norm=got["acc_norm"])
            print(f"lm-eval task, {name} by hand: lm_eval --model hf --model_args {got['model_args']} "
                  f"--include_path {task} --tasks {TASK} --apply_chat_template")
    print(markdown_table(results))
    if args.out:
        print(f"report: {write_report(args.out, results, samples, {'data': args.data, 'n_examples': len(examples)})}")
    return 0
