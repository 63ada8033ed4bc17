"""Token and vocabulary alignment between a teacher tokenizer and the student's (docs/contracts.md §2).

    align_offsets(student_offsets [S, 2], teacher_offsets [R, 2]) -> int32 [S]   (default method)
    align_offsets_batch(list of [S_b, 2], list of [R_b, 2])         -> list of int32 [S_b]
    align_mined(student_tokens, teacher_tokens, band=None)          -> int32 [S]   (FuseLLM MinED DTW)
    build_vocab_map(teacher_tok, student_tok, method=...)           -> int32 [V_t] (teacher id -> student id)
    tokenizer_hash(tok) -> sha256 hex;  token_strings(tok, ids) -> normalized token strings
    HAVE_EXT: the C++ extension profuser._C is loaded (PROFUSER_NO_EXT=1 forces the Python fallback)

Rows are *predicted tokens* (chat.encode_example): student predicted token s gets the distribution of the
teacher row r that predicted the teacher token aligned with it, or -1 (no teacher term at s).
The algorithms are described in _align_py.py (offsets, mined) and vocab_map.py (maps); csrc/align.cpp
implements the same ones in C++ with identical results. Both validate their inputs and raise ValueError
naming the sequence index and what failed (the C++ side never indexes unchecked memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref

import numpy as np

from . import _align_py as _py
from . import vocab_map as _vm
from .vocab_map import coalign_counts  # noqa: F401  (public: counts for method="exact+stats")

_C = None
if os.environ.get("PROFUSER_NO_EXT") != "1":
    try:
        from profuser import _C  # type: ignore[no-redef]
    except ImportError:
        _C = None
HAVE_EXT: bool = _C is not None


def _impl(use_ext: bool | None):
    if use_ext is None:
        use_ext = HAVE_EXT
    if use_ext and _C is None:
        raise RuntimeError("profuser._C is not available (not built, or PROFUSER_NO_EXT=1)")
    return _C if use_ext else None


# ----------------------------------------------------------------------------------------------------
# sequence alignment
# ----------------------------------------------------------------------------------------------------


def align_offsets(student_offsets, teacher_offsets, *, seq_index: int = 0,
                  use_ext: bool | None = None) -> np.ndarray:
    """Teacher row per student predicted token by exact character offsets.

    student_offsets int [S, 2], teacher_offsets int [R, 2] (spans [start, end) in the same text) ->
    int32 [S], -1 where the student token does not start cleanly where a teacher token starts cleanly.
    """
    ext = _impl(use_ext)
    s, t = _py.as_offsets(student_offsets, "student", seq_index), _py.as_offsets(teacher_offsets, "teacher", seq_index)
    return _py.align_offsets(s, t, seq_index) if ext is None else ext.align_offsets(s, t, int(seq_index))


def align_offsets_batch(student_offsets: list, teacher_offsets: list, *, use_ext: bool | None = None) -> list:
    """align_offsets over a batch: list of [S_b, 2] and list of [R_b, 2] -> list of int32 [S_b].

    One call into C++ for the whole batch (the loader's per-example overhead); seq_index = position b.
    """
    for name, x in (("student_offsets", student_offsets), ("teacher_offsets", teacher_offsets)):
        if not isinstance(x, (list, tuple)):
            raise ValueError(f"{name} must be a list of int arrays [n, 2], got {type(x).__name__}")
    if len(student_offsets) != len(teacher_offsets):
        raise ValueError(f"batch sizes differ: {len(student_offsets)} student vs {len(teacher_offsets)} "
                         "teacher")
    ext = _impl(use_ext)
    ss = [_py.as_offsets(s, "student", b) for b, s in enumerate(student_offsets)]
    ts = [_py.as_offsets(t, "teacher", b) for b, t in enumerate(teacher_offsets)]
    if ext is None:
        return [_py.align_offsets(s, t, b) for b, (s, t) in enumerate(zip(ss, ts))]
    return ext.align_offsets_batch(ss, ts)


def _normalize(tokens: list[str]) -> list[str]:
    # marker-normalized strings: SentencePiece "▁" and byte-level "Ġ" both mean a space
    return [t.replace("\u2581", " ").replace("\u0120", " ") for t in tokens]


def _codepoints(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    flat = np.frombuffer("".join(tokens).encode("utf-32-le"), dtype=np.int32)
    off = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    return flat, off


def align_mined(student_tokens, teacher_tokens, *, band: int | None = None, seq_index: int = 0,
                use_ext: bool | None = None) -> np.ndarray:
    """Teacher row per student predicted token by FuseLLM's MinED DTW with the off-by-one fixed.

    student_tokens list[str] [S], teacher_tokens list[str] [R] (e.g. from token_strings) -> int32 [S].
    band: half-width (in student tokens) of the DTW band around the length-scaled diagonal; None = full.
    """
    s = _normalize(_py.as_strings(student_tokens, "student", seq_index))
    t = _normalize(_py.as_strings(teacher_tokens, "teacher", seq_index))
    if band is not None and (not isinstance(band, (int, np.integer)) or isinstance(band, bool) or band < 0):
        raise ValueError(f"band must be a non-negative int or None, got {band!r}")
    ext = _impl(use_ext)
    if ext is None:
        return _py.align_mined(s, t, band, seq_index)
    sf, so = _codepoints(s)
    tf, to = _codepoints(t)
    return ext.align_mined(sf, so, tf, to, -1 if band is None else int(band), int(seq_index))


def token_strings(tok, ids) -> list[str]:
    """Normalized string of each id [n] -> list[str] [n]: the bytes it stands for, one char per byte
    (latin-1), so byte pieces of one character and whole characters compare byte by byte. Special tokens
    with a role get a role name ("\\x00eot\\x00", ...), so <|im_end|> and <end_of_turn> compare equal."""
    ids = _py.as_ids(ids, "ids")
    info = _vm.vocab_info(tok)
    if ids.size and (ids.min() < 0 or ids.max() >= info.size):
        bad = int(ids[(ids < 0) | (ids >= info.size)][0])
        raise ValueError(f"token id {bad} is outside the vocabulary of size {info.size}")
    role_of = {}
    for role in ("unk", "pad", "bos", "eos", "eot"):  # later roles win: eot over eos when one id has both
        if role in info.roles:
            role_of[info.roles[role]] = f"\x00{role}\x00"
    return [role_of.get(i) or info.bytes[i].decode("latin-1") for i in ids.tolist()]


# ----------------------------------------------------------------------------------------------------
# vocabulary maps
# ----------------------------------------------------------------------------------------------------


class _PyVocab:
    nearest = staticmethod(_py.nearest)
    lev_pairs = staticmethod(_py.lev_pairs)


class _ExtVocab:
    @staticmethod
    def nearest(queries, candidates, max_dist, cand_ok):
        if not queries or not candidates:
            return np.full(len(queries), -1, np.int32), np.full(len(queries), -1, np.int32)
        qf, qo = _bytes_flat(queries)
        cf, co = _bytes_flat(candidates)
        return _C.nearest(qf, qo, cf, co, np.ascontiguousarray(max_dist, np.int32),
                          np.ascontiguousarray(cand_ok, np.uint8), 0)

    @staticmethod
    def lev_pairs(a, b, ia, ib):
        if len(ia) == 0:
            return np.zeros(0, np.int32)
        af, ao = _bytes_flat(a)
        bf, bo = _bytes_flat(b)
        return _C.lev_pairs(af, ao, bf, bo, np.ascontiguousarray(ia, np.int64),
                            np.ascontiguousarray(ib, np.int64))


def _bytes_flat(strs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """latin-1 strings -> (uint8 flat, int64 offsets [n+1])."""
    data = "".join(strs).encode("latin-1")
    lens = np.fromiter((len(x) for x in strs), dtype=np.int64, count=len(strs))
    off = np.zeros(len(strs) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    return np.frombuffer(data, dtype=np.uint8), off


def build_vocab_map(teacher_tok, student_tok, *, method: str = "projection", teacher_size: int | None = None,
                    student_size: int | None = None, cache_dir=None, counts=None,
                    max_distance_ratio: float = 0.34, use_ext: bool | None = None) -> np.ndarray:
    """Teacher id -> student id, int32 [max(len(teacher_tok), teacher_size)], -1 = none (see vocab_map.py).

    method: "projection" (the default) or "exact", optionally followed by "+mined" and/or "+stats";
    counts = coalign_counts(...) for stats. cache_dir=None -> $PROFUSER_CACHE/vocab_maps; cache_dir=False
    disables the cache.
    """
    impl = _ExtVocab if _impl(use_ext) is not None else _PyVocab
    return _vm.build(teacher_tok, student_tok, method=method, teacher_size=teacher_size,
                     student_size=student_size, cache_dir=cache_dir, counts=counts,
                     max_distance_ratio=max_distance_ratio, impl=impl, hash_fn=tokenizer_hash)


_HASHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_hash(tok) -> str:
    """Stable sha256 hex of the vocabulary (pieces by id), merges, special tokens and chat template.

    Two loads of the same tokenizer (a GGUF conversion and its save_pretrained copy) hash the same;
    any change to what the ids mean changes it. Cached per tokenizer object.
    """
    try:
        return _HASHES[tok]
    except (KeyError, TypeError):
        pass
    h = hashlib.sha256()
    n = len(tok)
    h.update(f"n={n}\n".encode())
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    h.update("\x00".join(p if p is not None else "" for p in pieces).encode("utf-8", "surrogatepass"))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = model.get("merges") or []
        h.update(b"\nmerges\n")
        h.update(json.dumps(merges, ensure_ascii=False).encode("utf-8"))
    specials = {k: getattr(tok, f"{k}_token", None) for k in ("bos", "eos", "pad", "unk")}
    h.update(json.dumps(specials, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(sorted(int(i) for i in (getattr(tok, "all_special_ids", []) or []) if i is not None))
             .encode())
    h.update((getattr(tok, "chat_template", None) or "").encode("utf-8"))
    out = h.hexdigest()
    try:
        _HASHES[tok] = out
    except TypeError:
        pass
    return out


__all__ = ["HAVE_EXT", "align_offsets", "align_offsets_batch", "align_mined", "build_vocab_map",
           "tokenizer_hash", "token_strings", "coalign_counts"]
