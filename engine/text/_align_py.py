"""Pure-Python (numpy) alignment: the reference for, and fallback of, the C++ extension profuser._C.

Every function here has a twin in csrc/align.cpp with the same arguments and bit-identical results;
tests/engine/text/test_align*.py run both. The algorithms:

offsets(S [n,2], T [m,2]) -> int32 [n]
    Token i of a side is *clean* if it is the first token starting at its character (start_i != start_{i-1})
    and the previous token ends at or before that character (end_{i-1} <= start_i); token 0 is clean.
    Student token s takes teacher row r iff both are clean and start at the same character. Clean starts
    are strictly increasing, so one searchsorted does the matching: O((n + m) log m), no Python loop.

mined(teacher strings, student strings, band) -> int32 [n]
    FuseLLM's MinED DTW (profuser-spec.md 2.5). Rows i = teacher tokens, columns j = student tokens,
        D[i, j] = lev(t_i, s_j) + min(D[i-1, j], D[i, j-1], D[i-1, j-1]),  D[-1, -1] = 0, borders = inf.
    Backtrack from (m-1, n-1) choosing argmin over (diagonal, up = teacher step, left = student step),
    first minimum wins, so ties go to the diagonal; (0, 0) closes the path. Each student token j gets the
    list of teacher rows on the path in its column; rule: exactly one row i and t_i == s_j -> i (1-1 and
    n-1), otherwise -1 (1-n, mismatch). Because rows are *predicted* tokens, row i is the distribution
    that predicted t_i, which fixes FuseLLM's off-by-one. Band: row i may use columns
    [floor(i*n/m) - band, ceil((i+1)*n/m) - 1 + band] (cells outside are inf); None = full matrix.
    The DP runs over anti-diagonals, each one numpy vector op.

nearest(queries, candidates, max_dist) -> (int32 ids, int32 dists)
    For each query string: the candidate with the smallest Levenshtein distance d <= max_dist[q], ties to
    the smallest candidate index; -1 if none. Since d >= |len(a) - len(b)|, only candidates whose length
    is within max_dist are compared (the "length restriction": never |V_t| x |V_s| full comparisons).

Strings are sequences of code units (we pass byte strings decoded as latin-1: one char per byte).
"""

from __future__ import annotations

import numpy as np

try:  # C implementation of Levenshtein; a pure-Python DP otherwise
    import editdistance as _ed

    def lev(a: str, b: str) -> int:
        return _ed.eval(a, b)
except ImportError:  # pragma: no cover
    def lev(a: str, b: str) -> int:
        if len(a) < len(b):
            a, b = b, a
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]


# ----------------------------------------------------------------------------------------------------
# offsets
# ----------------------------------------------------------------------------------------------------


# The argument checks of the public API (text/align.py) live here, once, and run before either
# implementation: what they let through is a well-typed array or list, so the C++ and Python paths see the
# same input and raise the same ValueError for what is left (empty, not a span, ...; tests run both).


def _kind(x) -> str:
    return "None" if x is None else type(x).__name__


def as_offsets(off, name: str, seq_index: int) -> np.ndarray:
    """An offsets argument as int32 C-contiguous [n, 2]: integers, two columns, values in int32."""
    if type(off) is np.ndarray and off.dtype == np.int32 and off.ndim == 2 and off.shape[1] == 2 \
            and off.flags.c_contiguous:
        return off  # the loader's case, per sequence and side: no further work
    where = f"sequence {seq_index}: {name} offsets"
    if off is None or isinstance(off, (str, bytes)):
        raise ValueError(f"{where} must be an integer array [n, 2], got {_kind(off)}")
    a = np.asarray(off)
    if a.size and not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
        raise ValueError(f"{where} must be integers, got {a.dtype}")
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{where} must have shape [n, 2], got {a.shape}")
    if a.size and a.dtype != np.int32 and (int(a.max()) >= 2**31 or int(a.min()) < -(2**31)):
        v = int(a.max()) if int(a.max()) >= 2**31 else int(a.min())
        raise ValueError(f"{where} must fit in int32 (texts under 2^31 characters), got {v}")
    return np.ascontiguousarray(a, np.int32)


def as_strings(tokens, name: str, seq_index: int) -> list[str]:
    """A token-strings argument as list[str]: a list (not one str), every entry a str of valid Unicode."""
    where = f"sequence {seq_index}: {name} tokens"
    if tokens is None or isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__"):
        raise ValueError(f"{where} must be a list of str (one per token), got {_kind(tokens)}")
    tokens = list(tokens)
    for r, t in enumerate(tokens):
        if not isinstance(t, str):
            raise ValueError(f"{where[:-1]} {r} is not a str ({type(t).__name__})")
    try:
        "".join(tokens).encode("utf-8")
    except UnicodeEncodeError:
        r = next(r for r, t in enumerate(tokens) if not _valid_unicode(t))
        raise ValueError(f"{where[:-1]} {r} holds a lone surrogate ({tokens[r]!r}): not valid Unicode") from None
    return tokens


def _valid_unicode(t: str) -> bool:
    try:
        t.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def as_ids(ids, name: str) -> np.ndarray:
    """A token-ids argument as int64 [n]: integers (an empty list too), one dimension."""
    if ids is None or isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be an integer array [n], got {_kind(ids)}")
    a = np.asarray(ids)
    if a.size and not (np.issubdtype(a.dtype, np.integer) and a.dtype != np.bool_):
        raise ValueError(f"{name} must be integers, got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional [n], got shape {a.shape}")
    return a.astype(np.int64, copy=False)


def check_offsets(a: np.ndarray, name: str, seq_index: int) -> np.ndarray:
    """The content checks of one offsets array (as_offsets first), as in csrc/align.cpp: int64 [n, 2]."""
    if a.shape[0] == 0:
        raise ValueError(f"sequence {seq_index}: {name} offsets are empty")
    a = a.astype(np.int64, copy=False)
    bad = np.nonzero((a[:, 0] < 0) | (a[:, 1] < a[:, 0]))[0]
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"sequence {seq_index}: {name} offsets row {r} is not a span: {a[r].tolist()}")
    back = np.nonzero(a[1:, 0] < a[:-1, 0])[0]
    if back.size:
        r = int(back[0]) + 1
        raise ValueError(f"sequence {seq_index}: {name} offsets decrease at row {r}: start {int(a[r, 0])} "
                         f"after {int(a[r - 1, 0])}")
    return a


def clean_mask(a: np.ndarray) -> np.ndarray:
    """bool [n]: first token at its start and previous token ends at or before it (see the header)."""
    m = np.ones(a.shape[0], dtype=bool)
    m[1:] = (a[1:, 0] != a[:-1, 0]) & (a[:-1, 1] <= a[1:, 0])
    return m


def align_offsets(student, teacher, seq_index: int = 0) -> np.ndarray:
    """int32 [S]: teacher row for each student predicted token, -1 where none."""
    s = check_offsets(student, "student", seq_index)
    t = check_offsets(teacher, "teacher", seq_index)
    s_ok, t_ok = clean_mask(s), clean_mask(t)
    t_rows = np.nonzero(t_ok)[0]
    t_starts = t[t_rows, 0]
    pos = np.searchsorted(t_starts, s[:, 0])
    pos_c = np.minimum(pos, t_starts.size - 1)
    hit = s_ok & (pos < t_starts.size) & (t_starts[pos_c] == s[:, 0])
    return np.where(hit, t_rows[pos_c], -1).astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# mined DTW
# ----------------------------------------------------------------------------------------------------


def band_limits(m: int, n: int, band: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Column range [lo_i, hi_i] (inclusive) of each teacher row i; the full row when band is None."""
    i = np.arange(m, dtype=np.int64)
    if band is None:
        return np.zeros(m, np.int64), np.full(m, n - 1, np.int64)
    lo = (i * n) // m - band
    hi = -((-(i + 1) * n) // m) - 1 + band  # ceil((i+1) n / m) - 1 + band
    return np.clip(lo, 0, n - 1), np.clip(hi, 0, n - 1)


def _cost_matrix(teacher: list[str], student: list[str], lo, hi) -> np.ndarray:
    """float64 [m, n] Levenshtein costs inside the band (inf outside).

    Token strings repeat a lot, so lev is computed once per distinct (teacher string, student string) pair
    that occurs inside the band, then scattered with numpy.
    """
    m, n = len(teacher), len(student)
    ut: dict[str, int] = {}
    us: dict[str, int] = {}
    ti = np.array([ut.setdefault(x, len(ut)) for x in teacher], np.int64)
    sj = np.array([us.setdefault(x, len(us)) for x in student], np.int64)
    width = hi - lo + 1
    rows = np.repeat(np.arange(m), width)
    cols = np.arange(int(width.sum())) - np.repeat(np.cumsum(width) - width, width) + np.repeat(lo, width)
    key = ti[rows] * len(us) + sj[cols]
    uniq, inv = np.unique(key, return_inverse=True)
    t_list, s_list = list(ut), list(us)
    d = np.array([lev(t_list[k // len(us)], s_list[k % len(us)]) for k in uniq.tolist()], dtype=np.float64)
    C = np.full((m, n), np.inf)
    C[rows, cols] = d[inv]
    return C


def dtw_matrix(C: np.ndarray) -> np.ndarray:
    """Accumulated DTW cost D [m, n] from costs C, anti-diagonal by anti-diagonal (vectorized)."""
    m, n = C.shape
    D = np.full((m + 1, n + 1), np.inf)
    D[0, 0] = 0.0
    for k in range(2, m + n + 1):  # k = i + j in 1-based padded coordinates
        i_lo, i_hi = max(1, k - n), min(m, k - 1)
        ii = np.arange(i_lo, i_hi + 1)
        jj = k - ii
        best = np.minimum(np.minimum(D[ii - 1, jj], D[ii, jj - 1]), D[ii - 1, jj - 1])
        D[ii, jj] = C[ii - 1, jj - 1] + best
    return D[1:, 1:]


def dtw_backtrack(D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teacher rows per student column on the path: (count [n], single row or -1 [n])."""
    m, n = D.shape
    count = np.zeros(n, np.int64)
    row = np.full(n, -1, np.int64)
    i, j = m - 1, n - 1
    inf = np.inf
    while i > 0 or j > 0:
        count[j] += 1
        row[j] = i
        diag = D[i - 1, j - 1] if (i > 0 and j > 0) else inf
        up = D[i - 1, j] if i > 0 else inf
        left = D[i, j - 1] if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    count[0] += 1
    row[0] = 0
    return count, row


def align_mined(s: list[str], t: list[str], band=None, seq_index: int = 0) -> np.ndarray:
    """int32 [S]: teacher row for each student predicted token under MinED DTW, -1 where none (arguments
    checked by as_strings; band >= 0 or None)."""
    for name, x in (("student", s), ("teacher", t)):
        if len(x) == 0:  # as in csrc/align.cpp check_strings
            raise ValueError(f"sequence {seq_index}: {name} tokens are empty")
    lo, hi = band_limits(len(t), len(s), band)
    D = dtw_matrix(_cost_matrix(t, s, lo, hi))
    if not np.isfinite(D[-1, -1]):
        raise ValueError(f"sequence {seq_index}: no DTW path inside band={band}")
    count, row = dtw_backtrack(D)
    out = np.full(len(s), -1, np.int32)
    for j in np.nonzero(count == 1)[0]:
        if t[row[j]] == s[j]:
            out[j] = row[j]
    return out


# ----------------------------------------------------------------------------------------------------
# vocabulary: nearest by edit distance, pairwise distances
# ----------------------------------------------------------------------------------------------------


_DEL_MAX, _DEL_CAP = 2, 24  # same index rule as csrc/align.cpp (VariantIndex)


def _variants(s: str) -> set[str]:
    """s and every string obtained by deleting 1 or 2 of its characters."""
    out = {s}
    n = len(s)
    for i in range(n):
        one = s[:i] + s[i + 1:]
        out.add(one)
        for j in range(i, n - 1):
            out.add(one[:j] + one[j + 1:])
    return out


def _hist(s: str) -> np.ndarray:
    h = np.zeros(32, np.int32)
    np.add.at(h, np.frombuffer(s.encode("latin-1", "replace"), np.uint8) & 31, 1)
    return h


def nearest(queries: list[str], candidates: list[str], max_dist: np.ndarray,
            cand_ok: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest candidate per query (see the header). Returns (ids int32 [Q], dists int32 [Q]); -1 = none.

    Queries with max_dist <= 2 use a deletion-variant index (two strings within distance 2 share a string
    with <= 2 deletions from each); the others scan length buckets, skipping candidates whose folded
    byte-histogram bound max(|a|, |b|) - common exceeds the best distance so far. Both only skip
    candidates that cannot win, so the result is the exact (distance, index) minimum.
    """
    lens = np.array([len(c) for c in candidates], dtype=np.int64)
    ok = np.ones(len(candidates), bool) if cand_ok is None else np.asarray(cand_ok, bool)
    by_len: dict[int, np.ndarray] = {}
    hists: dict[int, np.ndarray] = {}
    ids = np.full(len(queries), -1, np.int32)
    dists = np.full(len(queries), -1, np.int32)
    small = [q for q, a in enumerate(queries)
             if 0 <= int(max_dist[q]) <= _DEL_MAX and 0 < len(a) and len(a) + int(max_dist[q]) <= _DEL_CAP]
    index: dict[str, list[int]] = {}
    if small:
        for c in np.nonzero(ok & (lens > 0) & (lens <= _DEL_CAP))[0].tolist():
            for v in _variants(candidates[c]):
                index.setdefault(v, []).append(c)
    small_set = set(small)
    for q, a in enumerate(queries):
        la, k = len(a), int(max_dist[q])
        if la == 0 or k < 0:
            continue
        best_d, best_id = k + 1, -1
        if q in small_set:
            seen = set()
            for v in _variants(a):
                for c in index.get(v, ()):
                    if c in seen:
                        continue
                    seen.add(c)
                    d = lev(a, candidates[c])
                    if d < best_d or (d == best_d and c < best_id):
                        best_d, best_id = d, c
        else:
            ha = _hist(a)
            for delta in range(0, k + 1):
                if delta > best_d:
                    break
                for L in ((la,) if delta == 0 else (la - delta, la + delta)):
                    if L <= 0:
                        continue
                    if L not in by_len:
                        by_len[L] = np.nonzero(ok & (lens == L))[0]
                        hists[L] = (np.stack([_hist(candidates[c]) for c in by_len[L]])
                                    if by_len[L].size else np.zeros((0, 32), np.int32))
                    if by_len[L].size == 0:
                        continue
                    bound = max(la, L) - np.minimum(hists[L], ha).sum(1)
                    for c in by_len[L][bound <= best_d].tolist():
                        d = lev(a, candidates[c])
                        if d < best_d or (d == best_d and c < best_id):
                            best_d, best_id = d, c
        if best_id >= 0:
            ids[q], dists[q] = best_id, best_d
    return ids, dists


def lev_pairs(a: list[str], b: list[str], ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """int32 [P]: lev(a[ia[p]], b[ib[p]])."""
    return np.array([lev(a[i], b[j]) for i, j in zip(ia.tolist(), ib.tolist())], dtype=np.int32)
