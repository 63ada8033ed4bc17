"""Teacher-vocabulary -> student-vocabulary maps (int32 [V_t], -1 = none), cached on disk.

Token normalization. Every id becomes the bytes it stands for: byte-level BPE pieces ("Ġthe", "Ċ",
"æĿ") go through GPT-2's byte<->unicode table; SentencePiece pieces have "▁" -> " " and byte tokens
"<0x0A>" -> b"\\n"; anything else is its UTF-8. Comparing bytes makes "Ġthe" (SmolLM2) equal "▁the"
(Gemma), and a byte piece equal the SentencePiece byte token of the same byte.

Methods: "projection" (the default) or "exact", optionally followed by "+mined" and/or "+stats". Map, in
order (a teacher id keeps the first rule that maps it):
1. specials by role: BOS, EOS, PAD, UNK and the chat end-of-turn token (the first token the template
   writes after the response: <|im_end|>, <end_of_turn>, ...). Teacher end-of-turn -> student
   end-of-turn, teacher EOS -> student EOS (or the student's end-of-turn when it has no EOS), and so
   on. Other special/added tokens map only to a special student token with the same content.
2. "projection": a teacher token whose bytes are text maps to the student token the student tokenizer
   emits FIRST for that text, in running text: the text is encoded after a context ("\n", else "0")
   that ends at a token boundary, so a word-start token (" international") and a continuation ("ing")
   are each read as the marker says. A longer teacher token so lands on the student's next token
   (" international" -> " intern", "123" -> "1"), several teacher ids may meet on one student id (the
   loss sums them), and the student's own segmentation decides ("12" -> "1" for a digit-splitting
   student, never its unused "12" piece). Whitespace runs are read before what the teacher emits them
   before (RIGHT_CONTEXTS: tokenizers split "    x" as "    "+"x" or "   "+" x"). A piece that ends
   inside a multi-byte character (byte-level " \xf0\x9f") keeps its exact twin when the student has one,
   else it is read completed to a character (" \U0001f000": the student's " " before an emoji).
   "exact" (instead of 2): same normalized bytes.
3. exact: same normalized bytes. Ties never go to a SentencePiece byte-fallback piece (<0x2C>) when a
   regular piece has the same bytes (the tokenizer emits the regular one), then to the smallest id.
4. "mined" (FuseLLM's MinED map, length-restricted): the student token with the smallest byte-level
   Levenshtein distance d <= max(1, floor(max_distance_ratio * len)) (default ratio 0.34); ties prefer
   a candidate that is a prefix of the teacher's bytes (the student's next token for that text), then
   the smallest id; byte-fallback pieces are never candidates. Since d >= |len_t - len_s|, only
   students of nearby lengths are compared (C++: bit-parallel Myers, threads; Python: editdistance).
   Beyond the bound a token stays unmapped: a far "nearest" token is noise, and unmapped teacher mass
   is handled by the loss's missing_mass policy. Unlike FuseLLM, which deletes the space markers ("Ġ",
   "▁") before the edit distance, the markers are normalized to a space and kept: " the" (a word) and
   "the" (inside a word) are different tokens, and the student emits them in different places.
4. "stats" (FuseChat's statistics-based map): from sparse co-alignment counts C[t, s] (pairs seen
   aligned in a corpus): argmin over {s : C[t, s] > 0} of lev(t, s) * (0.1 if one string contains the
   other else 1) * sigmoid(C[t, s]), ties -> smallest s. Counts stay sparse (pairs + np.unique), never a
   dense V_s x V_t matrix.
Student ids >= student_size (tokens the student model has no row for) are never targets.

Cache: <cache_dir>/<teacher hash[:16]>-<student hash[:16]>-<method>-s<V_s>-t<V_t>-v<MAP_VERSION>
[-r<ratio>][-c<counts hash>].npy, cache_dir defaulting to $PROFUSER_CACHE/vocab_maps; written to a
temporary name and renamed, its sha256 beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import warnings
import weakref
from pathlib import Path

import numpy as np

from ..fileio import atomic_write, write_text_atomic
from ..models import cache_root
from ._align_py import as_ids

# in every cache key: a map built by older rules is never reused (2: tie rules and projection)
MAP_VERSION = 2
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def is_byte_level(tok) -> bool:
    """Whether the tokenizer's pieces are written in GPT-2's byte-unicode alphabet."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        for part in (backend.decoder, backend.pre_tokenizer):
            if part is not None and "ByteLevel" in str(part.__getstate__() if hasattr(part, "__getstate__")
                                                        else part):
                return True
        return False
    return False


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes one vocabulary piece stands for (see the module header)."""
    if byte_level:
        try:
            return bytes(_BYTE_DECODER[c] for c in piece)
        except KeyError:
            return piece.encode("utf-8")
    m = _BYTE_TOKEN.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class VocabInfo:
    """Per-tokenizer tables: normalized bytes of every id, which ids are special, role ids."""

    def __init__(self, tok):
        n = len(tok)
        pieces = tok.convert_ids_to_tokens(list(range(n)))
        bl = is_byte_level(tok)
        special = np.zeros(n, bool)
        added = getattr(tok, "added_tokens_decoder", None) or {}
        for i, t in added.items():
            if int(i) < n and getattr(t, "special", True):
                special[int(i)] = True
        for i in getattr(tok, "all_special_ids", []) or []:
            if i is not None and 0 <= int(i) < n:
                special[int(i)] = True
        self.size = n
        self.pieces = [p if p is not None else "" for p in pieces]
        self.special = special
        self.bytes = [self.pieces[i].encode("utf-8") if special[i] else piece_bytes(self.pieces[i], bl)
                      for i in range(n)]
        # SentencePiece byte-fallback pieces (<0x2C>): the tokenizer emits them only for characters it has
        # no piece for, never when a regular piece has the same bytes
        self.byte_fallback = np.array([not bl and not special[i] and bool(_BYTE_TOKEN.match(self.pieces[i]))
                                       for i in range(n)], bool)
        self.roles = _roles(tok)

    def strings(self) -> list[str]:
        """Normalized pieces as latin-1 strings (one char per byte), for edit distances."""
        return [b.decode("latin-1") for b in self.bytes]


def vocab_info(tok) -> VocabInfo:
    try:
        return _INFO[tok]
    except (KeyError, TypeError):
        pass
    info = VocabInfo(tok)
    try:
        _INFO[tok] = info
    except TypeError:
        pass
    return info


def _roles(tok) -> dict[str, int]:
    from .chat import _fallback_specials, render_parts
    from .literal_text import template_ids

    roles = {}
    for role in ("bos", "eos", "pad", "unk"):
        i = getattr(tok, f"{role}_token_id", None)
        if i is not None:
            roles[role] = int(i)
    try:
        _, suffix = render_parts(tok, "x")
        ids = template_ids(tok, suffix)
        if not getattr(tok, "chat_template", None) and not ids:
            ids = _fallback_specials(tok)[1]
        if ids:
            roles["eot"] = int(ids[0])
    except Exception:  # noqa: BLE001 - a broken template must not stop the vocabulary map
        pass
    if "eot" not in roles and "eos" in roles:
        roles["eot"] = roles["eos"]
    return roles


def _special_map(t: VocabInfo, s: VocabInfo, student_size: int) -> dict[int, int]:
    """Teacher special id -> student special id by role, then by identical content."""
    out: dict[int, int] = {}
    fallback = {"eos": ("eos", "eot"), "eot": ("eot", "eos"), "bos": ("bos",), "pad": ("pad", "eos"),
                "unk": ("unk",)}
    for role in ("eot", "eos", "bos", "pad", "unk"):  # eot first: it wins when one id has two roles
        ti = t.roles.get(role)
        if ti is None or ti in out:
            continue
        for cand in fallback[role]:
            si = s.roles.get(cand)
            if si is not None and si < student_size:
                out[ti] = si
                break
    content = {s.pieces[i]: i for i in np.nonzero(s.special)[0][::-1].tolist() if i < student_size}
    for ti in np.nonzero(t.special)[0].tolist():
        if ti not in out and t.pieces[ti] in content:
            out[ti] = content[t.pieces[ti]]
    return out


def exact_map(t: VocabInfo, s: VocabInfo, student_size: int) -> np.ndarray:
    """int32 [V_t]: non-special teacher id -> non-special student id with identical bytes, else -1 (a regular
    piece before a byte-fallback piece, then the smallest id)."""
    table = byte_table(s, student_size)
    out = np.full(t.size, -1, np.int32)
    for i in range(t.size):
        if not t.special[i]:
            out[i] = table.get(t.bytes[i], -1)
    return out


def byte_table(s: VocabInfo, student_size: int) -> dict[bytes, int]:
    """{normalized bytes: the student id the tokenizer emits for them}: regular pieces win over byte-fallback
    pieces, then the smallest id wins."""
    table: dict[bytes, int] = {}
    for fallback in (True, False):  # later writes win: regular pieces overwrite byte-fallback ones
        for i in range(min(s.size, student_size) - 1, -1, -1):  # reversed: the smallest id wins
            if not s.special[i] and s.bytes[i] and s.byte_fallback[i] == fallback:
                table[s.bytes[i]] = i
    return table


CONTEXTS = ("\n", "0", "")  # left contexts that end at a token boundary in every tokenizer we know


def first_ids(tok, texts: list[str], right: list[str] | None = None) -> np.ndarray:
    """int32 [len(texts)]: the id `tok` emits first for each text in running text, followed by right[i]
    (-1 for an empty encoding). Each text is encoded after the first context of CONTEXTS whose own tokens
    stay intact in front of it (a clean boundary), so word starts and continuations keep their meaning."""
    from .literal_text import encode_texts

    out = np.full(len(texts), -1, np.int64)
    right = right or [""] * len(texts)
    todo = np.arange(len(texts))
    for ctx in CONTEXTS:
        if todo.size == 0:
            break
        head = list(encode_texts(tok, [ctx])[0]) if ctx else []
        got = encode_texts(tok, [ctx + texts[i] + right[i] for i in todo.tolist()])
        clean = np.array([len(g) > len(head) and list(g[: len(head)]) == head for g in got], bool)
        out[todo[clean]] = [g[len(head)] for g, c in zip(got, clean) if c]
        todo = todo[~clean]
    return out.astype(np.int32)


# what may follow a token that ends in whitespace. Tokenizers split whitespace runs differently ("   x"
# is "   "+"x" in one, "  "+" x" in another), so a run is projected in a context where the TEACHER emits it:
# a word-like one where the student emits the same text, else the first word-like one, else a line end
WORD_CONTEXTS = ("x", "0", " x")
RIGHT_CONTEXTS = WORD_CONTEXTS + ("\n", "")


def projection_map(t: VocabInfo, s: VocabInfo, teacher_tok, student_tok, student_size: int) -> np.ndarray:
    """int32 [V_t]: teacher id -> the student's first token for the same text (module header, rule 2);
    pieces of a character (not valid UTF-8): the student piece with the same bytes; -1 where neither exists."""
    out = exact_map(t, s, student_size)  # pieces of a multi-byte character keep their exact twin
    idx, texts = [], []
    for i in range(t.size):
        if t.special[i] or not t.bytes[i] or t.byte_fallback[i]:
            continue  # a byte-fallback piece (<0x20>, never emitted where " " is) keeps its exact twin
        try:
            texts.append(t.bytes[i].decode("utf-8"))
        except UnicodeDecodeError:
            # a piece that ends inside a character (" \xf0\x9f": a space, then an emoji's first bytes), with no
            # exact twin: the student's first token for the piece completed to a character
            whole = _complete(t.bytes[i])
            if out[i] >= 0 or whole is None:
                continue
            texts.append(whole)
        idx.append(i)
    ids = np.asarray(idx, np.int64)
    right = [""] * len(texts)
    ws = [k for k, x in enumerate(texts) if x[-1:].isspace()]
    if ws:
        # among the right contexts where the teacher emits the token itself: a word-like one where the student
        # emits the same text (" " before a digit, "   " before " word"), else the first
        sub = [texts[k] for k in ws]
        pick: dict[int, tuple[str, bool]] = {}
        for r in RIGHT_CONTEXTS:
            tf = first_ids(teacher_tok, sub, [r] * len(sub)).tolist()
            sf = first_ids(student_tok, sub, [r] * len(sub)).tolist()
            for j, k in enumerate(ws):
                if tf[j] != ids[k] or pick.get(k, (None, False))[1]:
                    continue
                same = 0 <= sf[j] < s.size and s.bytes[sf[j]] == t.bytes[ids[k]] and r in WORD_CONTEXTS
                if k not in pick or same:
                    pick[k] = (r, same)
        for k in ws:
            right[k] = pick.get(k, (RIGHT_CONTEXTS[0], False))[0]
    first = first_ids(student_tok, texts, right)
    first[first >= student_size] = -1
    out[ids] = first
    return out


def _complete(b: bytes) -> str | None:
    """The text of `b` with its last, cut character completed by the smallest continuation bytes (" \xf0\x9f"
    -> " \U0001f000"), None when `b` is no such cut."""
    for n in (1, 2, 3):
        try:
            return (b + b"\x80" * n).decode("utf-8")
        except UnicodeDecodeError:
            pass
    return None


def prefer_prefixes(queries: list[str], ids: np.ndarray, dists: np.ndarray, table: dict[bytes, int]) -> np.ndarray:
    """MinED ties: the candidate at the winning distance d that is a prefix of the query (its first
    len - d characters: the student's next token for that text) wins over a smaller id."""
    out = np.asarray(ids, np.int32).copy()
    for q in np.nonzero(out >= 0)[0].tolist():
        cut = len(queries[q]) - int(dists[q])
        if cut > 0:
            out[q] = table.get(queries[q][:cut].encode("latin-1"), out[q])
    return out


def coalign_counts(teacher_ids_list, student_ids_list,
                   alignments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse co-alignment counts from aligned sequences.

    teacher_ids_list[b] int [R_b], student_ids_list[b] int [S_b], alignments[b] int [S_b] (teacher row or -1).
    Returns (t_ids, s_ids, counts), int64 [P] each, one entry per distinct (teacher id, student id) pair.
    """
    lists = (("teacher_ids_list", teacher_ids_list), ("student_ids_list", student_ids_list),
             ("alignments", alignments))
    for name, x in lists:
        if not isinstance(x, (list, tuple)):
            raise ValueError(f"{name} must be a list of int arrays (one per sequence), got {type(x).__name__}")
    if not len(teacher_ids_list) == len(student_ids_list) == len(alignments):
        raise ValueError(f"lists differ in length: {', '.join(f'{n} {len(x)}' for n, x in lists)}")
    ts, ss = [], []
    for b, (tid, sid, al) in enumerate(zip(teacher_ids_list, student_ids_list, alignments)):
        tid, sid, al = (as_ids(x, f"sequence {b}: {n}") for x, n in
                        ((tid, "teacher ids"), (sid, "student ids"), (al, "alignment")))
        if al.shape != sid.shape:
            raise ValueError(f"sequence {b}: alignment has shape {al.shape}, student ids {sid.shape}")
        if (al >= tid.shape[0]).any():
            raise ValueError(f"sequence {b}: alignment refers to teacher row >= {tid.shape[0]}")
        keep = al >= 0
        ts.append(tid[al[keep]])
        ss.append(sid[keep])
    if not ts:
        return (np.zeros(0, np.int64),) * 3
    t, s = np.concatenate(ts), np.concatenate(ss)
    if t.size == 0:
        return (np.zeros(0, np.int64),) * 3
    base = int(s.max()) + 1
    keys, counts = np.unique(t * base + s, return_counts=True)
    return keys // base, keys % base, counts.astype(np.int64)


def stats_choice(t_str: list[str], s_str: list[str], t_ids, s_ids, counts,
                 lev_pairs) -> tuple[np.ndarray, np.ndarray]:
    """FuseChat's argmin per teacher id over its co-aligned student ids -> (teacher ids, student ids)."""
    t_ids, s_ids, counts = (np.asarray(x, np.int64) for x in (t_ids, s_ids, counts))
    if t_ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d = lev_pairs(t_str, s_str, t_ids, s_ids).astype(np.float64)
    contains = np.array([(a in b) or (b in a) for a, b in
                         ((t_str[i], s_str[j]) for i, j in zip(t_ids.tolist(), s_ids.tolist()))])
    score = d * np.where(contains, 0.1, 1.0) * (1.0 / (1.0 + np.exp(-counts.astype(np.float64))))
    order = np.lexsort((s_ids, score, t_ids))  # by teacher, then score, then smallest student id
    first = np.ones(order.size, bool)
    first[1:] = t_ids[order][1:] != t_ids[order][:-1]
    pick = order[first]
    return t_ids[pick], s_ids[pick]


def build(teacher_tok, student_tok, *, method: str, teacher_size: int | None, student_size: int | None,
          cache_dir, counts, max_distance_ratio: float, impl, hash_fn) -> np.ndarray:
    """The map (see the module header); `impl` provides nearest() and lev_pairs() (C++ or Python)."""
    for name, tok in (("teacher_tok", teacher_tok), ("student_tok", student_tok)):
        if not hasattr(tok, "convert_ids_to_tokens"):
            raise ValueError(f"{name} must be a Hugging Face tokenizer, got {type(tok).__name__}")
    for name, v in (("teacher_size", teacher_size), ("student_size", student_size)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    if not isinstance(max_distance_ratio, (int, float)) or not math.isfinite(max_distance_ratio) \
            or max_distance_ratio < 0:
        raise ValueError(f"max_distance_ratio must be a finite number >= 0, got {max_distance_ratio!r}")
    parts = method.split("+") if isinstance(method, str) else [None]
    if parts[0] not in ("exact", "projection") or any(p not in ("mined", "stats") for p in parts[1:]):
        raise ValueError(f"method must be 'projection' or 'exact', optionally followed by '+mined' and/or "
                         f"'+stats', got {method!r}")
    if "stats" in parts and counts is None:
        raise ValueError("method with '+stats' needs counts=(t_ids, s_ids, counts) from coalign_counts()")
    V_t = max(len(teacher_tok), teacher_size or 0)
    s_size = len(student_tok) if student_size is None else int(student_size)

    key = f"{hash_fn(teacher_tok)[:16]}-{hash_fn(student_tok)[:16]}-{method}-s{s_size}-t{V_t}-v{MAP_VERSION}"
    if "mined" in parts:
        key += f"-r{max_distance_ratio:g}"
    if counts is not None and "stats" in parts:
        h = hashlib.sha256()
        for a in counts:
            h.update(np.ascontiguousarray(np.asarray(a, np.int64)).tobytes())
        key += f"-c{h.hexdigest()[:12]}"
    path = None
    if cache_dir is not False:
        root = Path(cache_dir) if cache_dir else cache_root() / "vocab_maps"
        path = root / f"{key}.npy"
        m = _load_cached(path, V_t)
        if m is not None:
            return m

    t, s = vocab_info(teacher_tok), vocab_info(student_tok)
    out = np.full(V_t, -1, np.int32)
    if parts[0] == "projection":
        out[: t.size] = projection_map(t, s, teacher_tok, student_tok, s_size)
    else:
        out[: t.size] = exact_map(t, s, s_size)
    for ti, si in _special_map(t, s, s_size).items():
        out[ti] = si
    todo = np.nonzero((out[: t.size] < 0) & ~t.special)[0]
    t_str = s_str = None
    if "mined" in parts and todo.size:
        t_str, s_str = t.strings(), s.strings()
        queries = [t_str[i] for i in todo.tolist()]
        max_dist = np.maximum(1, (np.array([len(q) for q in queries]) * max_distance_ratio).astype(np.int64))
        cand_ok = ~s.special & ~s.byte_fallback
        cand_ok[s_size:] = False
        ids, dists = impl.nearest(queries, s_str, max_dist.astype(np.int32), cand_ok)
        regular = {b: i for b, i in byte_table(s, s_size).items() if not s.byte_fallback[i]}
        out[todo] = prefer_prefixes(queries, ids, dists, regular)
        todo = todo[ids < 0]
    if "stats" in parts and todo.size:
        if t_str is None:
            t_str, s_str = t.strings(), s.strings()
        ct, cs, cc = (np.asarray(a, np.int64) for a in counts)
        if ct.size and ((ct < 0).any() or (ct >= t.size).any() or (cs < 0).any() or (cs >= s.size).any()):
            raise ValueError("counts hold ids outside the teacher or student vocabulary")
        want = np.zeros(t.size, bool)
        want[todo] = True
        keep = want[ct] & (cs < s_size) & ~s.special[cs] if ct.size else np.zeros(0, bool)
        ti, si = stats_choice(t_str, s_str, ct[keep], cs[keep], cc[keep], impl.lev_pairs)
        out[ti] = si
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, out)
        data = buf.getvalue()
        meta = {"method": method, "teacher_size": V_t, "student_size": s_size, "mapped": int((out >= 0).sum()),
                "sha256": hashlib.sha256(data).hexdigest()}
        write_text_atomic(path.with_suffix(".json"), json.dumps(meta))  # the digest first, then the map
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return out


def _load_cached(path: Path, V_t: int) -> np.ndarray | None:
    """A cached map whose bytes match the digest beside it, else None (rebuilt, with a warning when the file
    exists: a corrupt cache never reaches the loss)."""
    if not path.exists():
        return None
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == meta.get("sha256"):
            m = np.load(path)
            if m.shape == (V_t,) and m.dtype == np.int32:
                return m
    except (OSError, ValueError):
        pass
    warnings.warn(f"{path}: cached vocabulary map does not match its digest (corrupt or from an older version); "
                  "rebuilding it", stacklevel=3)
    return None


