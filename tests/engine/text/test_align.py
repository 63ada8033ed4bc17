"""Sequence alignment (offsets, mined) on hand-made cases: rules, bad input, C++ == Python.

Every test runs on both implementations through the `use_ext` fixture (False = numpy fallback,
True = profuser._C; skipped when the extension is not built).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from profuser.engine.text import _align_py, align


@pytest.fixture(params=[False, True], ids=["python", "cpp"])
def use_ext(request):
    if request.param and not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    return request.param


def off(*spans):
    return np.array(spans, dtype=np.int32).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------
# offsets
# ---------------------------------------------------------------------------------------------------


def test_offsets_same_tokenization_is_identity(use_ext):
    s = off((0, 3), (3, 6), (6, 7), (7, 7))
    np.testing.assert_array_equal(align.align_offsets(s, s, use_ext=use_ext), [0, 1, 2, 3])


def test_offsets_split_and_merge(use_ext):
    # text "hello world": student "hel","lo"," world","<eot>"; teacher "hello"," wor","ld","<eot>"
    s = off((0, 3), (3, 5), (5, 11), (11, 11))
    t = off((0, 5), (5, 9), (9, 11), (11, 11))
    # student 0 starts at 0 like teacher 0; student 1 at 3 (no teacher start); student 2 at 5 like teacher 1
    np.testing.assert_array_equal(align.align_offsets(s, t, use_ext=use_ext), [0, -1, 1, 3])


def test_offsets_byte_pieces_only_first_piece_aligns(use_ext):
    # "a東" : student byte-level pieces of 東 all report (1, 2); teacher has one token for it
    s = off((0, 1), (1, 2), (1, 2), (1, 2), (2, 2))
    t = off((0, 1), (1, 2), (2, 2))
    np.testing.assert_array_equal(align.align_offsets(s, t, use_ext=use_ext), [0, 1, -1, -1, 2])
    # and the other way round: the teacher's continuation pieces are never targets
    np.testing.assert_array_equal(align.align_offsets(t, s, use_ext=use_ext), [0, 1, 4])


def test_offsets_overlapping_previous_token_is_not_clean(use_ext):
    # student token 1 starts at 2 but token 0 ends at 3 (overlap): not a clean boundary
    s = off((0, 3), (2, 4), (4, 4))
    t = off((0, 2), (2, 4), (4, 4))
    np.testing.assert_array_equal(align.align_offsets(s, t, use_ext=use_ext), [0, -1, 2])


def test_offsets_batch_matches_single(use_ext):
    rng = np.random.default_rng(0)
    S, T = [], []
    for _ in range(20):
        n = int(rng.integers(1, 40))
        cuts_s = np.sort(rng.choice(np.arange(1, 100), size=n - 1, replace=False))
        cuts_t = np.sort(rng.choice(np.arange(1, 100), size=int(rng.integers(1, 40)), replace=False))
        bs = np.concatenate([[0], cuts_s, [100]])
        bt = np.concatenate([[0], cuts_t, [100]])
        S.append(np.stack([bs[:-1], bs[1:]], 1).astype(np.int32))
        T.append(np.stack([bt[:-1], bt[1:]], 1).astype(np.int32))
    batch = align.align_offsets_batch(S, T, use_ext=use_ext)
    for b in range(20):
        single = align.align_offsets(S[b], T[b], use_ext=use_ext)
        np.testing.assert_array_equal(batch[b], single)
        # partitions of the same text: aligned iff the start is a cut on both sides
        ts = set(T[b][:, 0].tolist())
        want = [list(T[b][:, 0]).index(c) if c in ts else -1 for c in S[b][:, 0]]
        np.testing.assert_array_equal(single, want)


def test_offsets_random_cpp_equals_python():
    if not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    rng = np.random.default_rng(1)
    for _ in range(200):
        def rand_offsets():
            n = int(rng.integers(1, 30))
            starts = np.sort(rng.integers(0, 50, n))
            ends = starts + rng.integers(0, 4, n)
            return np.stack([starts, ends], 1).astype(np.int32)
        s, t = rand_offsets(), rand_offsets()
        np.testing.assert_array_equal(align.align_offsets(s, t, use_ext=True),
                                      align.align_offsets(s, t, use_ext=False))


@pytest.mark.parametrize("bad, what", [
    (np.zeros((0, 2), np.int32), "student offsets are empty"),
    (off((0, 2), (1, 3), (0, 4)), "student offsets decrease at row 2"),
    (off((0, 2), (3, 1)), "student offsets row 1 is not a span"),
    (off((-1, 2)), "student offsets row 0 is not a span"),
    (np.zeros((3, 3), np.int32), "shape"),
])
def test_offsets_bad_input_names_sequence(use_ext, bad, what):
    good = off((0, 1), (1, 1))
    with pytest.raises(ValueError, match=f"sequence 5: .*{what}" if what != "shape" else "sequence 5.*shape"):
        align.align_offsets(bad, good, seq_index=5, use_ext=use_ext)


def test_offsets_batch_bad_input_names_index(use_ext):
    good = off((0, 1), (1, 1))
    with pytest.raises(ValueError, match="sequence 2: teacher offsets are empty"):
        align.align_offsets_batch([good] * 3, [good, good, np.zeros((0, 2), np.int32)], use_ext=use_ext)
    with pytest.raises(ValueError, match="batch sizes differ"):
        align.align_offsets_batch([good] * 3, [good] * 2, use_ext=use_ext)


# ---------------------------------------------------------------------------------------------------
# mined (FuseLLM MinED DTW with the off-by-one fixed)
# ---------------------------------------------------------------------------------------------------


def test_mined_one_to_one(use_ext):
    s = ["Ġthe", "Ġcat", "Ġsat"]
    t = ["▁the", "▁cat", "▁sat"]
    np.testing.assert_array_equal(align.align_mined(s, t, use_ext=use_ext), [0, 1, 2])


def test_mined_n_to_one_uses_row_only_when_strings_match(use_ext):
    # n-1: student " cat","s" both sit on teacher row 1 (" cat"); only the student token whose string
    # equals the teacher's takes the row, the other gets -1
    s = ["Ġthe", "Ġcat", "s", "Ġsat"]
    t = ["▁the", "▁cat", "▁sat"]
    np.testing.assert_array_equal(align.align_mined(s, t, use_ext=use_ext), [0, 1, -1, 2])
    # n-1 with no equal string: " cat","s" vs teacher " cats" -> both -1
    t2 = ["▁the", "▁cats", "▁sat"]
    np.testing.assert_array_equal(align.align_mined(s, t2, use_ext=use_ext), [0, -1, -1, 2])


def test_mined_one_to_n_is_unaligned(use_ext):
    # 1-n: the teacher splits " hello" into " hel","lo": the student column holds two rows -> -1;
    # later tokens realign (rows refer to the teacher's predicted tokens, so " world" -> row 2)
    s = ["Ġhello", "Ġworld", "!"]
    t = ["▁hel", "lo", "▁world", "!"]
    np.testing.assert_array_equal(align.align_mined(s, t, use_ext=use_ext), [-1, 2, 3])


def test_mined_mismatch_is_unaligned(use_ext):
    s = ["Ġa", "Ġdog", "Ġran"]
    t = ["▁a", "▁cat", "▁ran"]
    np.testing.assert_array_equal(align.align_mined(s, t, use_ext=use_ext), [0, -1, 2])


def test_mined_ties_go_to_the_diagonal():
    # equal-cost paths: with two identical tokens the backtrack must prefer the diagonal
    D = np.array([[0.0, 1.0], [1.0, 0.0]])
    count, row = _align_py.dtw_backtrack(D)
    np.testing.assert_array_equal(count, [1, 1])
    np.testing.assert_array_equal(row, [0, 1])
    D = np.array([[1.0, 1.0], [1.0, 1.0]])  # all ties at (1, 1): diagonal step to (0, 0)
    count, row = _align_py.dtw_backtrack(D)
    np.testing.assert_array_equal(row, [0, 1])


def test_mined_matches_naive_fusellm_dtw(use_ext):
    """Against a literal transcription of FuseLLM's dtw() (profuser-spec.md 2.5), full matrix."""
    import editdistance

    rng = np.random.default_rng(3)
    words = ["the", "cat", "s", "sat", "on", "mat", "a", "at", " ", "ca", "t"]
    for _ in range(30):
        t = [str(w) for w in rng.choice(words, int(rng.integers(1, 12)))]
        s = [str(w) for w in rng.choice(words, int(rng.integers(1, 12)))]
        m, n = len(t), len(s)
        M = np.zeros((m + 1, n + 1))
        M[0, :] = np.inf
        M[:, 0] = np.inf
        M[0, 0] = 0
        for i in range(m):
            for j in range(n):
                M[i + 1, j + 1] = editdistance.eval(t[i], s[j]) + min(M[i, j + 1], M[i + 1, j], M[i, j])
        M = M[1:, 1:]
        i, j = m - 1, n - 1
        cols = [[] for _ in range(n)]
        while i > 0 or j > 0:
            cols[j].append(i)
            opts = [M[i - 1, j - 1] if i > 0 and j > 0 else np.inf, M[i - 1, j] if i > 0 else np.inf,
                    M[i, j - 1] if j > 0 else np.inf]
            mv = int(np.argmin(opts))
            i, j = (i - 1, j - 1) if mv == 0 else ((i - 1, j) if mv == 1 else (i, j - 1))
        cols[0].append(0)
        want = [c[0] if len(c) == 1 and t[c[0]] == s[k] else -1 for k, c in enumerate(cols)]
        np.testing.assert_array_equal(align.align_mined(s, t, use_ext=use_ext), want)


def test_mined_band_cpp_equals_python():
    if not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    rng = np.random.default_rng(4)
    words = ["the", "cat", "s", "sat", "on", "mat", "東", "京", "🙂", "\n", "  "]
    for band in (None, 0, 1, 2, 5):
        for _ in range(20):
            t = [str(w) for w in rng.choice(words, int(rng.integers(1, 40)))]
            s = [str(w) for w in rng.choice(words, int(rng.integers(1, 40)))]
            np.testing.assert_array_equal(align.align_mined(s, t, band=band, use_ext=True),
                                          align.align_mined(s, t, band=band, use_ext=False))


def test_mined_many_distinct_strings_cpp_equals_python():
    """Full matrix with many distinct strings of equal length (the C++ fills its cost memo four strings at a
    time), empty strings, strings over 64 code units (the plain Levenshtein path) and code points >= 256."""
    if not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    rng = np.random.default_rng(5)
    alphabet = list("abcab ") + ["東", "🙂", "é"]
    lengths = [0, 1, 2, 3, 3, 4, 4, 5, 6, 8, 65, 70]

    def tokens(n):
        return ["".join(rng.choice(alphabet, int(rng.choice(lengths)))) for _ in range(n)]

    for _ in range(12):
        s, t = tokens(int(rng.integers(20, 120))), tokens(int(rng.integers(20, 120)))
        t[: len(t) // 3] = s[: len(t) // 3]  # a matching stretch, so some tokens align
        for band in (None, 3):
            np.testing.assert_array_equal(align.align_mined(s, t, band=band, use_ext=True),
                                          align.align_mined(s, t, band=band, use_ext=False))


def test_mined_wide_band_equals_full(use_ext):
    s = ["Ġthe", "Ġcat", "s", "Ġsat", "Ġon", "Ġthe", "Ġmat"]
    t = ["▁the", "▁cats", "▁sat", "▁on", "▁the", "▁m", "at"]
    np.testing.assert_array_equal(align.align_mined(s, t, band=10, use_ext=use_ext),
                                  align.align_mined(s, t, use_ext=use_ext))


def test_no_ext_env_forces_fallback():
    code = "from profuser.engine.text import align; print(align.HAVE_EXT)"
    env = dict(os.environ, PROFUSER_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
