"""Vocabulary maps on real tokenizers: exact, specials by role, MinED nearest, statistics map, cache."""

import editdistance
import numpy as np
import pytest

import helpers as real_tokenizers
from profuser.engine.text import align
from profuser.engine.text.chat import encode_example
from profuser.engine.text.vocab_map import coalign_counts, vocab_info


@pytest.fixture(params=[False, True], ids=["python", "cpp"])
def use_ext(request):
    if request.param and not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    return request.param


@pytest.fixture(scope="module")
def gemma_smol():
    return real_tokenizers.load("gemma3"), real_tokenizers.load("smollm2")


def test_exact_map_every_shared_string(gemma_smol, tmp_path):
    g, s = gemma_smol
    m = align.build_vocab_map(g, s, method="exact", cache_dir=tmp_path)
    gi, si = vocab_info(g), vocab_info(s)
    assert m.shape == (len(g),) and m.dtype == np.int32
    student = {}
    for i in range(si.size):
        if not si.special[i]:
            student.setdefault(si.bytes[i], i)
    n_checked = 0
    for t in range(gi.size):
        if gi.special[t]:
            continue
        want = student.get(gi.bytes[t], -1)
        assert m[t] == want, (t, gi.pieces[t], m[t], want)
        n_checked += want >= 0
    assert n_checked > 40_000  # "▁the" == "Ġthe", "<0x0A>" == "Ċ", ...
    tid = g.convert_tokens_to_ids("▁the")
    assert s.convert_ids_to_tokens(int(m[tid])) == "Ġthe"
    assert s.convert_ids_to_tokens(int(m[g.convert_tokens_to_ids("<0x0A>")])) == "Ċ"


def test_specials_by_role(gemma_smol, tmp_path):
    g, s = gemma_smol
    m = align.build_vocab_map(g, s, method="exact", cache_dir=tmp_path)
    im_end, im_start = s.convert_tokens_to_ids("<|im_end|>"), s.convert_tokens_to_ids("<|im_start|>")
    assert m[g.convert_tokens_to_ids("<end_of_turn>")] == im_end  # chat end-of-turn
    assert m[g.eos_token_id] == s.eos_token_id == im_end
    assert m[g.bos_token_id] == s.bos_token_id == im_start
    assert m[g.pad_token_id] == s.pad_token_id
    assert m[g.unk_token_id] == s.unk_token_id
    r = align.build_vocab_map(s, g, method="exact", cache_dir=tmp_path)
    # SmolLM2's <|im_end|> is both its EOS and its end-of-turn: the end-of-turn role wins
    assert r[im_end] == g.convert_tokens_to_ids("<end_of_turn>")
    assert r[im_start] == g.bos_token_id
    # the predicted end-of-turn of an encoded example maps onto the student's predicted end-of-turn
    et, es = encode_example(g, "q", "a"), encode_example(s, "q", "a")
    assert m[et.pred_ids[-1]] == es.pred_ids[-1]


def test_nearest_matches_brute_force(gemma_smol, use_ext):
    g, s = gemma_smol
    gi, si = vocab_info(g), vocab_info(s)
    rng = np.random.default_rng(0)
    cand_ids = rng.choice(si.size, 4000, replace=False)
    cands = [si.bytes[i].decode("latin-1") for i in cand_ids]
    queries = [gi.bytes[i].decode("latin-1") for i in rng.choice(gi.size, 150, replace=False)]
    max_dist = np.maximum(1, (np.array([len(q) for q in queries]) * 0.5).astype(np.int64)).astype(np.int32)
    ok = np.ones(len(cands), bool)
    impl = align._ExtVocab if use_ext else align._PyVocab
    ids, dists = impl.nearest(queries, cands, max_dist, ok)
    for q, a in enumerate(queries):
        d = np.array([editdistance.eval(a, c) if c else 10**9 for c in cands])
        best = int(d.min()) if a else 10**9
        if best <= max_dist[q] and a:
            assert dists[q] == best and ids[q] == int(np.nonzero(d == best)[0][0]), (a, ids[q], dists[q])
        else:
            assert ids[q] == -1


def test_nearest_cpp_equals_python_edge_cases():
    if not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    rng = np.random.default_rng(1)
    alpha = list("ab \xe3\x83")
    cands = ["".join(rng.choice(alpha, int(rng.integers(0, 9)))) for _ in range(2000)] + ["a" * 300, "b" * 70]
    queries = ["".join(rng.choice(alpha + ["x"], int(rng.integers(0, 12)))) for _ in range(400)]
    queries += ["a" * 290, "b" * 66, ""]
    max_dist = rng.integers(-1, 6, len(queries)).astype(np.int32)
    max_dist[-3:] = 20
    ok = rng.random(len(cands)) < 0.9
    a = align._PyVocab.nearest(queries, cands, max_dist, ok)
    b = align._ExtVocab.nearest(queries, cands, max_dist, ok)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def _corpus_counts(t_tok, s_tok, texts):
    T, S, A = [], [], []
    for text in texts:
        et, es = encode_example(t_tok, "q", text), encode_example(s_tok, "q", text)
        T.append(et.pred_ids)
        S.append(es.pred_ids)
        A.append(align.align_offsets(es.pred_offsets, et.pred_offsets))
    return T, S, A


TEXTS = ["The quick brown fox jumps over the lazy dog.", "東京は日本の首都です。",
         "numbers 12345 and 678",
         "Emoji 🙂 text", "tokenization is fun; tokenizers differ", "interoperability internationalization"]


def test_coalign_counts_brute_force(gemma_smol):
    g, s = gemma_smol
    T, S, A = _corpus_counts(g, s, TEXTS)
    ti, si, cnt = coalign_counts(T, S, A)
    brute = {}
    for t, st, al in zip(T, S, A):
        for j, r in enumerate(al.tolist()):
            if r >= 0:
                key = (int(t[r]), int(st[j]))
                brute[key] = brute.get(key, 0) + 1
    assert dict(zip(zip(ti.tolist(), si.tolist()), cnt.tolist())) == brute
    with pytest.raises(ValueError, match="sequence 1: alignment refers to teacher row"):
        coalign_counts(T[:2], S[:2], [A[0], np.full_like(A[1], 10**6)])


def test_stats_map_brute_force(gemma_smol, use_ext, tmp_path):
    g, s = gemma_smol
    T, S, A = _corpus_counts(g, s, TEXTS)
    counts = coalign_counts(T, S, A)
    exact = align.build_vocab_map(g, s, method="exact", cache_dir=False, use_ext=use_ext)
    m = align.build_vocab_map(g, s, method="exact+stats", counts=counts, cache_dir=tmp_path, use_ext=use_ext)
    gi, si = vocab_info(g), vocab_info(s)
    ti, sj, cc = counts
    n_stats = 0
    for t in np.unique(ti).tolist():
        if exact[t] >= 0 or gi.special[t]:
            assert m[t] == exact[t]
            continue
        a = gi.bytes[t].decode("latin-1")
        best = None
        for k in np.nonzero(ti == t)[0].tolist():
            b = si.bytes[sj[k]].decode("latin-1")
            if si.special[sj[k]]:
                continue
            score = editdistance.eval(a, b) * (0.1 if (a in b or b in a) else 1.0) / (1 + np.exp(-cc[k]))
            if best is None or (score, sj[k]) < best:
                best = (score, int(sj[k]))
        assert m[t] == (best[1] if best else -1)
        n_stats += best is not None
    assert n_stats > 0  # e.g. Gemma's "東京" -> SmolLM2's first byte piece of 東
    # tokens never co-aligned and not exact stay unmapped
    seen = np.zeros(len(g), bool)
    seen[ti] = True
    assert (m[~seen & (exact < 0) & ~gi.special] == -1).all()


def test_cache_roundtrip_and_sizes(tmp_path):
    g, s = real_tokenizers.load("gpt2"), real_tokenizers.load("smollm2")
    kw = dict(method="exact", teacher_size=50_304, student_size=40_000, cache_dir=tmp_path)
    m = align.build_vocab_map(g, s, **kw)
    assert m.shape == (50_304,)
    assert (m[len(g):] == -1).all() and m.max() < 40_000
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    # a second call reads the cache file (it is not rewritten)
    stamp = files[0].stat().st_mtime_ns
    assert (align.build_vocab_map(g, s, **kw) == m).all() and files[0].stat().st_mtime_ns == stamp
    # a cache file that no longer matches its digest (corrupt, or planted) is never used: rebuilt, warned
    planted = m.copy()
    planted[0] = 12345
    np.save(files[0], planted)
    with pytest.warns(UserWarning, match="does not match its digest"):
        again = align.build_vocab_map(g, s, **kw)
    assert (again == m).all()
    # a different method or student size is a different cache entry
    other = align.build_vocab_map(g, s, method="exact", teacher_size=50_304, cache_dir=tmp_path)
    assert other[0] != 12345 and len(list(tmp_path.glob("*.npy"))) == 2


def test_bad_method(gemma_smol):
    g, s = gemma_smol
    with pytest.raises(ValueError, match="method must be"):
        align.build_vocab_map(g, s, method="mined", cache_dir=False)
    with pytest.raises(ValueError, match="needs counts"):
        align.build_vocab_map(g, s, method="exact+stats", cache_dir=False)


def test_mined_small_vocab_cpp_equals_brute_force(tmp_path):
    """Full build_vocab_map with MinED (C++) on a SentencePiece teacher, a sample checked by brute force:
    the smallest distance within the bound, a prefix of the teacher's bytes on ties, else the smallest id;
    never a byte-fallback piece."""
    if not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    t, s = real_tokenizers.load("mistral-sp"), real_tokenizers.load("smollm2")
    rng = np.random.default_rng(2)
    # student_size=3000 restricts the candidates (brute force over 3000 per sampled teacher token)
    a = align.build_vocab_map(t, s, method="exact+mined", student_size=3000, cache_dir=False, use_ext=True)
    ti, si = vocab_info(t), vocab_info(s)
    exact = align.build_vocab_map(t, s, method="exact", student_size=3000, cache_dir=False)
    todo = np.nonzero((exact < 0) & ~ti.special)[0]
    sample = rng.choice(todo, 200, replace=False)
    cands = [i for i in range(3000) if not si.special[i] and not si.byte_fallback[i]]
    s_str = si.strings()
    n_prefix = 0
    for tid in sample.tolist():
        q = ti.bytes[tid].decode("latin-1")
        d = np.array([editdistance.eval(q, s_str[c]) for c in cands])
        bound = max(1, int(len(q) * 0.34))
        if d.min() > bound:
            assert a[tid] == -1, (q, a[tid])
            continue
        best = [c for c, x in zip(cands, d) if x == d.min()]
        prefix = [c for c in best if q.startswith(s_str[c]) and len(s_str[c]) == len(q) - d.min()]
        n_prefix += bool(prefix) and min(prefix) != min(best)
        assert a[tid] == (min(prefix) if prefix else min(best)), (q, a[tid], best, prefix)
    assert n_prefix > 0  # the prefix tie rule decided some of the sample
    assert (a[exact >= 0] == exact[exact >= 0]).all()
    assert (a >= 0).sum() > (exact >= 0).sum()


@pytest.mark.slow
def test_full_mined_map_gemma_to_smollm2(gemma_smol, tmp_path):
    g, s = gemma_smol
    m = align.build_vocab_map(g, s, method="exact+mined", cache_dir=tmp_path)
    exact = align.build_vocab_map(g, s, method="exact", cache_dir=tmp_path)
    assert (m[exact >= 0] == exact[exact >= 0]).all()
    assert (m >= 0).sum() > (exact >= 0).sum() + 50_000
