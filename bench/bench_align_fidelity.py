"""Alignment fidelity: where a teacher's probability lands in the student's vocabulary.

For each (teacher -> student) pair of real tokenizers and each text of 12 kinds (bench/fidelity_texts.py),
both sides encode the same response (text.chat.encode_example), the student's predicted tokens are aligned
to the teacher's by character offsets (text.align.align_offsets), and at every aligned position the
teacher's ACTUAL next token goes through the vocabulary map:

    hit      the map sends it to the student's actual next token
    miss     to another student token
    dropped  nowhere (-1)

Positions are split by what the teacher's token spans against the student's (both start at the same
character): "covers" when the teacher's token reaches at least as far (same text or longer: the map can
land on the student's token), "shorter" when it ends first (" inter" vs " international", "4" vs "45":
no static map can name the student's longer token; reported on its own). "bf dup" counts mappings onto a
SentencePiece byte-fallback piece whose bytes the student also has as a regular piece (never emitted).

Real distributions: SmolLM2-135M-Instruct and Gemma-3-270M teacher-forced on the same texts (top-10
log-probs at every predicted position); at the aligned positions, the share of the teacher's top-10 mass
whose ids the map keeps (maps somewhere), per kind, both directions. By probability (bench/fidelity_probability.py):
the same two models through teach, the loader (span_rule first_piece and chain) and the kernels' target, the
realised token's target probability against the teacher's own probability of its string.

Byte canonicalisation: every map compares the bytes a piece stands for (`Ġthe` == `▁the`, `<0x0A>` == "\n");
"raw overlap" counts pieces whose raw strings are equal, "byte overlap" those whose bytes are, and the map
"exact-raw" (raw strings, no canonicalisation) is scored beside "exact" to show what it changes.

    python bench/bench_align_fidelity.py [--methods exact+mined projection] [--no-models]
Writes bench/results/align_fidelity.json (+ .png: hit per pair and kind) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from profuser.engine.models import pad_id
from profuser.engine.text import align
from profuser.engine.text.chat import encode_example
from profuser.engine.text.tokenizers import load_known
from profuser.engine.text.vocab_map import vocab_info

import fidelity_probability
from fidelity_texts import TEXTS
from harness import machine_name

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Please answer."
PAIRS = [("gemma3", "smollm2"), ("smollm2", "gemma3"), ("gpt2", "smollm2"), ("llama3", "qwen2.5"),
         ("mistral-sp", "smollm2"), ("deepseek", "gemma3"), ("llama3", "gemma3"), ("qwen2.5", "llama3")]
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def aligned_positions(teacher, student, text: str):
    """[(teacher id, student id, "covers" | "shorter")] at the offsets-aligned response positions."""
    es, et = encode_example(student, PROMPT, text), encode_example(teacher, PROMPT, text)
    rows = align.align_offsets(es.pred_offsets, et.pred_offsets)
    tb, sb = vocab_info(teacher).bytes, vocab_info(student).bytes
    out = []
    for s in range(len(rows) - 1):  # the last predicted token is the end-of-turn (a special: mapped by role)
        r = int(rows[s])
        if r < 0 or r == len(et.pred_ids) - 1:
            continue
        t_id, s_id = int(et.pred_ids[r]), int(es.pred_ids[s])
        t_end, s_end = int(et.pred_offsets[r, 1]), int(es.pred_offsets[s, 1])
        t_len, s_len = len(tb[t_id].lstrip(b" ")), len(sb[s_id].lstrip(b" "))  # a dummy-prefix space aside
        covers = t_end > s_end or (t_end == s_end and t_len >= s_len)
        out.append((t_id, s_id, "covers" if covers else "shorter"))
    return out


def raw_exact_map(teacher, student) -> np.ndarray:
    """Teacher id -> student id with the identical raw piece string (no byte canonicalisation), -1 else."""
    s_index = {p: i for i, p in enumerate(student.convert_ids_to_tokens(list(range(len(student)))))}
    return np.array([s_index.get(p, -1) for p in teacher.convert_ids_to_tokens(list(range(len(teacher))))],
                    np.int64)


def overlap(teacher, student) -> dict:
    """Vocabulary overlap: equal raw piece strings vs equal bytes (the canonical form every map compares)."""
    raw_t = set(teacher.convert_ids_to_tokens(list(range(len(teacher)))))
    raw_s = set(student.convert_ids_to_tokens(list(range(len(student)))))
    tb, sb = vocab_info(teacher), vocab_info(student)
    byt_t = {b for b, sp in zip(tb.bytes, tb.special) if b and not sp}
    byt_s = {b for b, sp in zip(sb.bytes, sb.special) if b and not sp}
    return {"raw": len(raw_t & raw_s), "bytes": len(byt_t & byt_s)}


def score_pair(teacher, student, vmap: np.ndarray) -> dict:
    s_info = vocab_info(student)
    regular = {b for b, fb in zip(s_info.bytes, s_info.byte_fallback) if not fb}
    per_kind = {}
    for kind, texts in TEXTS.items():
        c = dict(covers=0, hit=0, miss=0, dropped=0, shorter=0, shorter_hit=0, bf_dup=0)
        for text in texts:
            for t_id, s_id, cat in aligned_positions(teacher, student, text):
                m = int(vmap[t_id]) if t_id < len(vmap) else -1
                if m >= 0 and s_info.byte_fallback[m] and s_info.bytes[m] in regular:
                    c["bf_dup"] += 1
                if cat == "shorter":
                    c["shorter"] += 1
                    c["shorter_hit"] += int(m == s_id)
                    continue
                c["covers"] += 1
                c["hit" if m == s_id else "dropped" if m < 0 else "miss"] += 1
        per_kind[kind] = c
    total = {k: sum(c[k] for c in per_kind.values()) for k in next(iter(per_kind.values()))}
    return {"total": total, "per_kind": per_kind}


def mass_kept(teacher_name: str, student_name: str, vmaps: dict[str, np.ndarray]) -> dict:
    """Per kind and method: the share of a real teacher's top-10 mass at aligned positions that the map keeps."""
    import torch

    from profuser.engine import models
    from profuser.engine.passes.forward import forward_predicted

    teacher, student = load_known(teacher_name), load_known(student_name)
    model = models.load_model(MODELS[teacher_name])
    pad = pad_id(teacher)
    out: dict = {m: {} for m in vmaps}
    for kind, texts in TEXTS.items():
        kept = {m: 0.0 for m in vmaps}
        total = 0.0
        for text in texts:
            es, et = encode_example(student, PROMPT, text), encode_example(teacher, PROMPT, text)
            rows = align.align_offsets(es.pred_offsets, et.pred_offsets)
            ids, lps, _ = forward_predicted(model, [et], 10, torch.device("cpu"), pad)
            for r in rows[:-1][rows[:-1] >= 0].tolist():
                p = np.exp(lps[r].astype(np.float64))
                total += p.sum()
                for m, vm in vmaps.items():
                    kept[m] += p[vm[ids[r]] >= 0].sum()
        for m in vmaps:
            out[m][kind] = kept[m] / max(total, 1e-12)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["exact+mined", "projection"])
    ap.add_argument("--no-models", action="store_true", help="skip the real-distribution mass (no model loads)")
    ap.add_argument("--out", default=str(RESULTS / "align_fidelity.json"))
    a = ap.parse_args(argv)
    report: dict = {"bench": "align_fidelity", "machine": machine_name(), "kinds": list(TEXTS),
                    "n_texts": sum(len(v) for v in TEXTS.values()), "pairs": {}, "mass_kept": {}, "build_s": {},
                    "overlap": {}, "prob_fidelity": {}}
    maps: dict = {}
    for t_name, s_name in PAIRS:
        teacher, student = load_known(t_name), load_known(s_name)
        key = f"{t_name}->{s_name}"
        report["pairs"][key] = {}
        report["overlap"][key] = overlap(teacher, student)
        report["pairs"][key]["exact-raw"] = score_pair(teacher, student, raw_exact_map(teacher, student))
        for method in a.methods:
            t0 = time.perf_counter()
            vm = align.build_vocab_map(teacher, student, method=method, cache_dir=False)
            report["build_s"][f"{key} {method}"] = round(time.perf_counter() - t0, 2)
            maps[(key, method)] = vm
            report["pairs"][key][method] = score_pair(teacher, student, vm)
            tot = report["pairs"][key][method]["total"]
            n = max(tot['covers'], 1)
            print(f"{key:22s} {method:12s} covers {tot['covers']:5d} hit {tot['hit'] / n:.3f} "
                  f"miss {tot['miss'] / n:.3f} dropped {tot['dropped'] / n:.3f} "
                  f"| shorter {tot['shorter']:4d} | bf dup {tot['bf_dup']}", flush=True)
    if not a.no_models:
        for t_name, s_name in (("gemma3", "smollm2"), ("smollm2", "gemma3")):
            key = f"{t_name}->{s_name}"
            report["mass_kept"][key] = mass_kept(t_name, s_name, {m: maps[(key, m)] for m in a.methods})
            with tempfile.TemporaryDirectory() as work:
                report["prob_fidelity"][f"{MODELS[t_name]} -> {s_name}"] = fidelity_probability.measure(
                    MODELS[t_name], MODELS[s_name], Path(work))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    plot(report, Path(a.out).with_suffix(".png"))
    print(tables(report))
    if report["prob_fidelity"]:
        print(fidelity_probability.tables(report["prob_fidelity"]))
    return 0


def plot(report: dict, path: Path) -> None:
    """Heatmap per map: covers-hit per pair (rows) and text kind (columns); white where < 10 positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(next(iter(report["pairs"].values())))
    pairs, kinds = list(report["pairs"]), report["kinds"]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 0.45 * len(pairs) + 2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = np.full((len(pairs), len(kinds)), np.nan)
        for i, key in enumerate(pairs):
            for j, kind in enumerate(kinds):
                c = report["pairs"][key][method]["per_kind"][kind]
                if c["covers"] >= 10:
                    grid[i, j] = c["hit"] / c["covers"]
        im = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(pairs)), pairs if ax is axes[0][0] else [], fontsize=8)
        ax.set_title(f"{method}: teacher token lands on the student's target", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"alignment fidelity ({report['machine']})", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def tables(report: dict) -> str:
    lines = ["| teacher -> student | map | covers: hit | miss | dropped | worst kind, >= 10 positions (hit) "
             "| shorter (static hit) | bf dup |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for key, by_method in report["pairs"].items():
        for method, res in by_method.items():
            tot, kinds = res["total"], res["per_kind"]
            n = max(tot["covers"], 1)
            worst = min((k for k in kinds if kinds[k]["covers"] >= 10), default=next(iter(kinds)),
                        key=lambda k: kinds[k]["hit"] / max(kinds[k]["covers"], 1))
            w = kinds[worst]["hit"] / max(kinds[worst]["covers"], 1)
            lines.append(f"| {key} | {method} | {tot['hit'] / n:.3f} | {tot['miss'] / n:.3f} "
                         f"| {tot['dropped'] / n:.3f} "
                         f"| {worst} ({w:.3f}) | {tot['shorter']} ({tot['shorter_hit'] / max(tot['shorter'], 1):.2f}) "
                         f"| {tot['bf_dup']} |")
    if report["mass_kept"]:
        kinds = report["kinds"]
        lines += ["", "| real teacher -> student | map | " + " | ".join(kinds) + " |",
                  "|---|---|" + "---:|" * len(kinds)]
        for key, by_method in report["mass_kept"].items():
            for method, per_kind in by_method.items():
                lines.append(f"| {key} | {method} | " + " | ".join(f"{per_kind[k]:.3f}" for k in kinds) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
