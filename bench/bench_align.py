"""Alignment benchmark (issue #5): SmolLM2 student x Gemma-3 teacher on real 2048-token text.

Measured in one run, on the same inputs:
  offsets   C++ (per call and batched) and the numpy fallback            student tokens / s
  mined     C++ (full matrix and band=64), the numpy fallback, and FuseLLM's pure-Python DTW
            re-implemented here from its description (profuser-spec.md 2.5: nested Python loops,
            editdistance cost, np.argmin backtrack over (diag, up, left))       student tokens / s
  vocab map Gemma-3 (262,144) -> SmolLM2 (49,152): exact, exact+mined (C++, all cores), projection  seconds
All sequence timings are single-threaded, so tokens/s is per core. The machine is shared: the JSON
records the load average before and after, and each timing is the best of `--reps` repeats (the least
disturbed run) next to the median.

Text: responses of the shipped corpus data/*.jsonl joined with newlines plus a multilingual paragraph
(CJK, emoji, digits, whitespace runs), cut into sequences of exactly 2048 SmolLM2 predicted tokens.

    python bench/bench_align.py [--seqs 8] [--reps 5] [--skip-vocab] [--out bench/results/align_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from profuser.engine.passes.prepare import shipped_corpus
from profuser.engine.text.tokenizers import load_known

from harness import machine_name

RESULTS = Path(__file__).resolve().parent / "results"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MULTILINGUAL = (
    "東京は日本の首都です。中文测试：你好，世界！ Emoji 🙂🚀👩‍💻 and digits 1234567890, 3.14159.\n"
    "    indented   code:\n\tdef f(x):\n\t\treturn x ** 2  # comment\n\n\n"
    "Ünïcödé àccents, Ελληνικά, русский текст, العربية.   trailing   \n"
)


def corpus_text(min_chars: int) -> str:
    parts = []
    for path in [shipped_corpus()]:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                parts.append(json.loads(line)["response"])
                if i % 40 == 39:
                    parts.append(MULTILINGUAL)
    text = "\n".join(parts) if parts else ""
    while len(text) < min_chars:  # no corpus shipped: the multilingual paragraph repeated
        text += MULTILINGUAL
    return text


def make_sequences(s_tok, t_tok, n_seqs: int, n_tokens: int):
    from profuser.engine.text.chat import encode_example

    text = corpus_text(n_seqs * n_tokens * 6)
    ids = s_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.array([o[0] for o in ids["offset_mapping"]])
    seqs = []
    for k in range(n_seqs):
        a, b = k * n_tokens, (k + 1) * n_tokens - 1  # -1: the end-of-turn is the 2048th predicted token
        if b >= len(starts):
            break
        resp = text[starts[a]:starts[b]]
        es, et = encode_example(s_tok, "Continue.", resp), encode_example(t_tok, "Continue.", resp)
        seqs.append((resp, es, et))
    return seqs


def timeit(fn, reps: int) -> dict:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"best_s": min(ts), "median_s": statistics.median(ts), "reps": reps}


def fusellm_dtw(series_1, series_2, norm_func):
    """FuseLLM's dtw() as described in profuser-spec.md 2.5 (pure Python, full matrix)."""
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            cost = norm_func(vec1, vec2)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    mappings_2 = [[] for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        mappings_2[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([option_diag, option_up, option_left])
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    mappings_2[0].append(0)
    return mappings_2


def fusellm_align(student_tokens, teacher_tokens):
    import editdistance

    cols = fusellm_dtw(teacher_tokens, student_tokens, lambda a, b: editdistance.eval(a, b))
    return np.array([c[0] if len(c) == 1 and teacher_tokens[c[0]] == student_tokens[k] else -1
                     for k, c in enumerate(cols)], dtype=np.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--band", type=int, default=64)
    ap.add_argument("--skip-vocab", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "align_cpu.json"))
    args = ap.parse_args(argv)

    from profuser.engine.text import align

    if not align.HAVE_EXT:
        print("profuser._C is not built: only the Python rows can be measured", file=sys.stderr)
    load_before = os.getloadavg()
    s_tok, t_tok = load_known("smollm2"), load_known("gemma3")
    seqs = make_sequences(s_tok, t_tok, args.seqs, args.tokens)
    S = [es.pred_offsets for _, es, _ in seqs]
    T = [et.pred_offsets for _, _, et in seqs]
    n_student = sum(s.shape[0] for s in S)
    n_teacher = sum(t.shape[0] for t in T)
    print(f"{len(seqs)} sequences, {n_student} student / {n_teacher} teacher predicted tokens")
    rows = []

    def row(name, method, timing, tokens, **extra):
        r = {"name": name, "method": method, "tokens": tokens, **timing,
             "tokens_per_s": tokens / timing["best_s"], **extra}
        rows.append(r)
        print(f"{name:14s} {method:26s} {r['tokens_per_s']:>14,.0f} tok/s  "
              f"(best {timing['best_s'] * 1e3:9.3f} ms, median {timing['median_s'] * 1e3:9.3f} ms)")
        return r

    # ---- offsets ----
    impls = [("cpp", True)] if align.HAVE_EXT else []
    impls.append(("python", False))
    off_rows = {}
    for label, ext in impls:
        one = timeit(lambda ext=ext: [align.align_offsets(s, t, use_ext=ext) for s, t in zip(S, T)], args.reps * 20)
        off_rows[label] = row("offsets", label, one, n_student)
        batch = timeit(lambda ext=ext: align.align_offsets_batch(S, T, use_ext=ext), args.reps * 20)
        row("offsets_batch", label, batch, n_student)
    ref = [align.align_offsets(s, t, use_ext=False) for s, t in zip(S, T)]
    aligned_fraction = float(np.mean(np.concatenate(ref) >= 0))

    # ---- mined ----
    resp, es, et = seqs[0]
    ss, ts = align.token_strings(s_tok, es.pred_ids), align.token_strings(t_tok, et.pred_ids)
    n0 = len(ss)
    mined_rows = {}
    for label, ext in impls:
        mined_rows[label + "_full"] = row("mined", f"{label} full", timeit(
            lambda ext=ext: align.align_mined(ss, ts, use_ext=ext), args.reps if ext else 1), n0)
        mined_rows[label + "_band"] = row("mined", f"{label} band={args.band}", timeit(
            lambda ext=ext: align.align_mined(ss, ts, band=args.band, use_ext=ext), args.reps if ext else 1), n0)
    t0 = time.perf_counter()
    fl = fusellm_align(ss, ts)
    fl_s = time.perf_counter() - t0
    fl_timing = {"best_s": fl_s, "median_s": fl_s, "reps": 1}
    mined_rows["fusellm"] = row("mined", "FuseLLM-style pure Python", fl_timing, n0)
    same = bool((fl == align.align_mined(ss, ts, use_ext=False)).all())
    print(f"FuseLLM-style result identical to ours (full matrix): {same}")

    # ---- vocab map ----
    vocab = {}
    if not args.skip_vocab:
        from profuser.engine.text import vocab_map

        for method in ("exact", "exact+mined", "projection"):
            vocab_map._INFO.clear()  # each method from cold tokenizer tables
            t0, c0 = time.perf_counter(), time.process_time()
            m = align.build_vocab_map(t_tok, s_tok, method=method, cache_dir=False)
            v = vocab[method] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                 "mapped": int((m >= 0).sum()), "teacher_size": int(m.shape[0]),
                                 "student_size": len(s_tok)}
            print(f"vocab map {method:12s} {v['wall_s']:8.1f} s wall, {v['cpu_s']:8.1f} s cpu, "
                  f"{v['mapped']:,} / {m.shape[0]:,} teacher ids mapped")

    ratios = {}
    speed = {k: r["tokens_per_s"] for k, r in mined_rows.items()}
    if "cpp" in off_rows:
        ratios["offsets_cpp_vs_python"] = off_rows["cpp"]["tokens_per_s"] / off_rows["python"]["tokens_per_s"]
        for k in ("cpp_full", "cpp_band"):
            ratios[f"mined_{k}_vs_fusellm"] = speed[k] / speed["fusellm"]
    for k in ("python_full", "python_band"):
        ratios[f"mined_{k}_vs_fusellm"] = speed[k] / speed["fusellm"]
    out = {
        "bench": "align", "machine": machine_name(), "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(), "have_ext": align.HAVE_EXT, "sequences": len(seqs),
        "student_tokens": n_student, "teacher_tokens": n_teacher,
        "offsets_aligned_fraction": aligned_fraction, "fusellm_identical": same, "rows": rows, "ratios": ratios,
        "vocab_map": vocab, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "goals": {"offsets_tokens_per_s_per_core": 5e6, "mined_vs_fusellm": 100, "mined_vocab_map_s": 120},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
