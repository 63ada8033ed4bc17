"""Alignment fidelity by probability (issue #24, item 4): what the aligned target gives the student's token.

For a real teacher model and a student tokenizer, the texts of bench/fidelity_texts.py go through the real
pipeline: a prepared set, `teach` (the teacher model teacher-forced, top-10 stored), the FusionLoader under
each span rule, and the kernels' fused-target builder (kernels/targets.py) under each missing-mass rule. At
every offsets-aligned response position of the student:

    q       the target's probability of the student's realised token (the mass on its id)
    truth   the teacher's own probability of the student token's string, by the chain rule over the teacher's
            tokens of exactly that string, from a separate float32 forward of the teacher (not the store)

Positions are classed by the teacher tokens that make up the student's token (a.. the last one starting
before its end): "one_to_one" (one teacher token, the same string), "spanning" (several teacher tokens
ending exactly where the student's token ends: the string has a teacher probability), "straddle" (the
teacher's tokens cross the student token's end), "longer" (the teacher's token is longer than the student's:
its string is not a sequence of teacher tokens; no truth) and "partial" (the student's token is a byte
piece of a character; no truth). Reported per text kind: mean |q - truth| at one_to_one and at spanning
positions; the share of target mass on tokens the student emits there (1 minus the mass on strict
byte-prefixes of its token and on byte-fallback pieces where it emits a regular token); the share on those
byte-fallback pieces alone.
"""

from __future__ import annotations

import numpy as np

from profuser.engine.text import align
from profuser.engine.text.chat import encode_example
from profuser.engine.text.vocab_map import vocab_info

from fidelity_texts import TEXTS

PROMPT = "Please answer."
K = 10
RULES = ("first_piece", "chain")
MISSING = ("renormalize", "tail_bucket")


def classify(s_off: np.ndarray, t_off: np.ndarray, G: np.ndarray, t_lp: np.ndarray) -> list:
    """[(class, truth log-prob or None)] per student predicted token (the end-of-turn excluded: None class)."""
    out = []
    for s in range(len(G)):
        r = int(G[s])
        if r < 0 or s == len(G) - 1:
            out.append((None, None))
            continue
        c1 = int(s_off[s, 1])
        if s + 1 < len(G) and s_off[s + 1, 0] < c1:  # a byte piece followed by the rest of its character
            out.append(("partial", None))
            continue
        if t_off[r, 1] > c1:
            out.append(("longer", None))
            continue
        b = r  # the last teacher token starting before c1 (byte pieces of one character share its span)
        while b + 1 < len(t_off) and t_off[b + 1, 0] < c1:
            b += 1
        if t_off[b, 1] != c1:
            out.append(("straddle", None))
        else:
            out.append(("one_to_one" if b == r else "spanning", float(t_lp[r:b + 1].sum())))
    return out


def measure(t_spec: str, s_spec: str, work) -> dict:
    """{rule: {missing_mass: {kind: counters}}} for teacher model t_spec and the student tokenizer of s_spec."""
    import torch

    from profuser.engine import models
    from profuser.engine.config import DataConfig
    from profuser.engine.loader import FusionLoader
    from profuser.engine.models import pad_id
    from profuser.engine.passes import teach
    from profuser.engine.passes.forward import forward_predicted
    from profuser.engine.passes.options import PassConfig
    from profuser.engine.tools import synthetic as fx
    from profuser.kernels.params import FusionParams
    from profuser.kernels.targets import build_sparse_target

    t_tok, s_tok = models.load_tokenizer(t_spec), models.load_tokenizer(s_spec)
    examples = [{"example_id": f"{kind}/{i}", "prompt": PROMPT, "response": text, "system": None}
                for kind, texts in TEXTS.items() for i, text in enumerate(texts)]
    response = {e["example_id"]: e["response"] for e in examples}
    fx.write_prepared(work, examples, shard_size=len(examples))
    teach.teach(PassConfig(data_dir=str(work), sources=[t_spec], names=["t"], k=K, progress=False, max_length=None,
                           dtype="float32"))
    model = models.load_model(t_spec)
    truth_lp = {}
    with torch.no_grad():
        for e in examples:  # the separate float32 forward: the teacher's log-prob of each of its own tokens
            enc = encode_example(t_tok, PROMPT, e["response"])
            truth_lp[e["example_id"]] = (enc, forward_predicted(model, [enc], 1, torch.device("cpu"),
                                                                 pad_id(t_tok))[2].astype(np.float64))
    del model
    s_info = vocab_info(s_tok)
    fallback = np.asarray(s_info.byte_fallback, bool)
    out: dict = {}
    for rule in RULES:
        loader = FusionLoader(DataConfig(data_dir=str(work), sources=["t"], k=K, max_length=4096, shuffle_buffer=1,
                                         micro_batch_size=len(examples), span_rule=rule, packing=False),
                              s_tok,
                              student=s_spec)
        batch = next(iter(loader))
        out[rule] = {}
        for mm in MISSING:
            tgt = build_sparse_target(batch["labels"].flatten(), batch["teacher_ids"].flatten(1, 2),
                                      batch["teacher_logprobs"].flatten(1, 2).float(),
                                      batch["teacher_weights"].flatten(1, 2), loader.vocab_maps,
                                      FusionParams(missing_mass=mm), dtype=torch.float64)
            L = batch["labels"].shape[1]
            per_kind = {kind: dict(one_to_one=0, spanning=0, straddle=0, longer=0, partial=0, err_one=0.0,
                                   err_span=0.0, mass=0.0, emitted=0.0, fallback=0.0) for kind in TEXTS}
            for b, eid in enumerate(batch["example_ids"]):
                kind = eid.split("/")[0]
                c = per_kind[kind]
                t_enc, t_lp = truth_lp[eid]
                s_enc = encode_example(s_tok, PROMPT, response[eid])
                G = align.align_offsets(s_enc.pred_offsets, t_enc.pred_offsets)
                for s, (cls, truth) in enumerate(classify(s_enc.pred_offsets, t_enc.pred_offsets, G, t_lp)):
                    if cls is None:
                        continue
                    c[cls] += 1
                    row = b * L + int(s_enc.pred_pos[s])
                    ids, mass = tgt.ids[row].numpy(), tgt.mass[row].numpy()
                    label = int(s_enc.pred_ids[s])
                    q = float(mass[ids == label].sum())
                    if truth is not None:
                        c["err_one" if cls == "one_to_one" else "err_span"] += abs(q - float(np.exp(truth)))
                    lb = s_info.bytes[label]
                    kept = ids >= 0
                    prefix = np.array([len(s_info.bytes[i]) < len(lb) and lb.startswith(s_info.bytes[i])
                                       for i in ids[kept]], bool)
                    fb = fallback[ids[kept]] & (not fallback[label])
                    total = float(mass[kept].sum())
                    c["mass"] += total
                    c["emitted"] += total - float(mass[kept][prefix | fb].sum())
                    c["fallback"] += float(mass[kept][fb].sum())
            out[rule][mm] = {kind: summarize(c) for kind, c in per_kind.items()}
            keys = next(iter(per_kind.values()))
            out[rule][mm]["all"] = summarize({k: sum(c[k] for c in per_kind.values()) for k in keys})
        out[rule]["loader_stats"] = dict(loader.stats)
    return out


def summarize(c: dict) -> dict:
    return {"one_to_one": c["one_to_one"], "spanning": c["spanning"], "straddle": c["straddle"],
            "longer": c["longer"], "partial": c["partial"], "mae_one_to_one": c["err_one"] / max(c["one_to_one"], 1),
            "mae_spanning": c["err_span"] / max(c["spanning"], 1),
            "on_emitted": c["emitted"] / max(c["mass"], 1e-12), "fallback_share": c["fallback"] / max(c["mass"], 1e-12),
            "fallback_mass": c["fallback"]}


def tables(report: dict) -> str:
    """Two Markdown tables: every pair and rule over all texts, and spanning MAE per text kind."""
    lines = ["| teacher model -> student | span_rule | missing_mass | spanning positions (MAE) | one-to-one (MAE) "
             "| straddle | share of target mass on tokens the student emits | on byte-fallback pieces |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for pair, by_rule in report.items():
        for rule in RULES:
            for mm in MISSING:
                a = by_rule[rule][mm]["all"]
                lines.append(f"| {pair} | {rule} | {mm} | {a['spanning']} ({a['mae_spanning']:.4f}) | "
                             f"{a['one_to_one']} ({a['mae_one_to_one']:.4f}) | {a['straddle']} | "
                             f"{a['on_emitted']:.4f} | {a['fallback_share']:.4f} |")
    kinds = list(TEXTS)
    lines += ["", "Spanning positions, MAE of the realised token's target probability (tail_bucket), per kind "
              "(positions):", "", "| teacher model -> student | span_rule | " + " | ".join(kinds) + " |",
              "|---|---|" + "---:|" * len(kinds)]
    for pair, by_rule in report.items():
        for rule in RULES:
            d = by_rule[rule]["tail_bucket"]
            lines.append(f"| {pair} | {rule} | " + " | ".join(
                f"{d[k]['mae_spanning']:.3f} ({d[k]['spanning']})" if d[k]["spanning"] else "-" for k in kinds) + " |")
    return "\n".join(lines)
