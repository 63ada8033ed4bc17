"""Encoding that data can never turn into control tokens.

A response that contains the text `<|im_end|>` (or `<end_of_turn>`, `</s>`, `<|eot_id|>`) must stay text: a
tokenizer left to itself parses it as the special token, and the student would learn to end its turn in
the middle of an answer. Control tokens may only come from a chat template. So every piece of user or
model text (prompt, system prompt, response, generated text) is encoded with special-token text kept as
text (`split_special_tokens`, the backend's `encode_special_tokens`), and a templated prompt is encoded
in segments: the special tokens the TEMPLATE writes become their ids, every run of text between them
(template text and content together, as the tokenizer would see it) is encoded as text.

    encode_text(tok, text)              ids of content                              list[int]
    encode_texts(tok, texts, offsets)   many at once (the fast backend), with character spans
    template_ids(tok, text)             ids of template-only text (a suffix): specials parsed
    prefix_ids(tok, prompt, system, render, history)       the templated prompt, control tokens only where the
                                                           template puts them
    prefix_segments(tok, prompt, system, render, history)  [(text, is_special)] behind prefix_ids

Segmenting gives the ids a normal encode would give whenever the content holds no special-token text
(tokenizers split at special tokens first and encode each run on its own); `tests/engine/text/
test_literal_text.py` checks this for every known tokenizer. A template that rewrites its content (beyond
trimming) cannot be segmented: its prompts are encoded as before, and a prompt or system prompt that
holds special-token text there is a ValueError rather than a control token.
"""

from __future__ import annotations

import re
import weakref

_PROMPT = "\x00\x02PROFUSER_PROMPT\x02\x00"
_SYSTEM = "\x00\x03PROFUSER_SYSTEM\x03\x00"
_SPECIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def special_tokens(tok) -> tuple[dict[str, int], re.Pattern | None]:
    """({content: id} of the tokenizer's special added tokens, a regex matching any of them, longest first)."""
    try:
        return _SPECIALS[tok]
    except (KeyError, TypeError):
        pass
    table = {}
    decoder = getattr(tok, "added_tokens_decoder", None)
    for i, t in (decoder if isinstance(decoder, dict) else {}).items():
        if getattr(t, "special", False) and t.content:
            table[t.content] = int(i)
    contents, ids = getattr(tok, "all_special_tokens", None), getattr(tok, "all_special_ids", None)
    for content, i in zip(contents if isinstance(contents, list) else [], ids if isinstance(ids, list) else []):
        if isinstance(content, str) and content and i is not None:
            table.setdefault(content, int(i))
    pattern = re.compile("|".join(re.escape(c) for c in sorted(table, key=len, reverse=True))) if table else None
    out = (table, pattern)
    try:
        _SPECIALS[tok] = out
    except TypeError:
        pass
    return out


def _backend(tok):
    """The Rust tokenizer when calling it directly is what tok(...) does (no truncation or padding set):
    it skips transformers' per-example conversion to Python dicts (half the tokenization time)."""
    bt = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if bt is None or bt.truncation is not None or bt.padding is not None or \
            not hasattr(bt, "encode_special_tokens"):
        return None
    return bt


def encode_texts(tok, texts: list[str], offsets: bool = False):
    """Content ids of many texts, special-token text kept as text -> list of id lists (with offsets=True:
    (ids, [(start, end)] character spans) lists)."""
    if not texts:
        return ([], []) if offsets else []
    bt = _backend(tok)
    if bt is not None:
        before = bt.encode_special_tokens
        bt.encode_special_tokens = True
        try:
            if offsets:
                encs = bt.encode_batch(texts, add_special_tokens=False)
                return [e.ids for e in encs], [e.offsets for e in encs]
            return [e.ids for e in bt.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            bt.encode_special_tokens = before
    kw = dict(add_special_tokens=False, return_offsets_mapping=offsets)
    try:
        enc = tok(texts, split_special_tokens=True, **kw)
    except (TypeError, ValueError, NotImplementedError):  # a backend that cannot split (MistralCommonBackend)
        if offsets:
            raise
        enc = tok(texts, add_special_tokens=False)
        table, _ = special_tokens(tok)
        ids = set(table.values())
        for text, row in zip(texts, enc["input_ids"]):
            if ids.intersection(row):
                raise ValueError(f"this tokenizer turns special-token text in {text[:60]!r} into a control token "
                                 "and cannot keep it as text") from None
    return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]


def encode_text(tok, text: str) -> list[int]:
    """Content ids of one text (prompt, system prompt, response), special-token text kept as text."""
    return list(encode_texts(tok, [text])[0]) if text else []


def template_ids(tok, text: str) -> list[int]:
    """Ids of text the chat template wrote by itself (a suffix): its special tokens are control tokens."""
    return list(tok(text, add_special_tokens=False)["input_ids"]) if text else []


def _split(pattern, text: str) -> list[tuple[str, bool]]:
    """text -> [(run, False) | (special, True)], runs possibly empty-free."""
    out, at = [], 0
    for m in (pattern.finditer(text) if pattern is not None else ()):
        if m.start() > at:
            out.append((text[at:m.start()], False))
        out.append((m.group(0), True))
        at = m.end()
    if at < len(text):
        out.append((text[at:], False))
    return out


def _history_mark(i: int) -> str:
    return f"\x00\x04PROFUSER_TURN{i}\x04\x00"


def _fill(text: str, values: list[tuple[str, str]]) -> str:
    """text with each placeholder replaced by its value."""
    for mark, value in values:
        text = text.replace(mark, value)
    return text


def prefix_segments(tok, prompt: str, system: str | None, render, history: list | None = None
                    ) -> list[tuple[str, bool]] | None:
    """The templated prompt as [(text, is_special)], special only where the template writes a special
    token; None when the template rewrites its content (then it cannot be segmented).

    render(tok, prompt, system, history) -> the templated prefix string (text.chat.render_parts' first part);
    history: the earlier turns [{role, content}], each content a placeholder of its own while segmenting."""
    _, pattern = special_tokens(tok)
    history = list(history or ())
    rendered = render(tok, prompt, system, history)
    marks = [{"role": m["role"], "content": _history_mark(i)} for i, m in enumerate(history)]
    marked = render(tok, _PROMPT, None if system is None else _SYSTEM, marks)
    for strip in (False, True):  # as given, then as a template with `| trim` writes them
        fill = (lambda t: t.strip()) if strip else (lambda t: t)
        values = [(_PROMPT, fill(prompt)), (_SYSTEM, fill(system) if system is not None else "")]
        values += [(_history_mark(i), fill(m["content"])) for i, m in enumerate(history)]
        segs = [(t, True) if special else (_fill(t, values), False) for t, special in _split(pattern, marked)]
        if "".join(t for t, _ in segs) == rendered:
            return segs
    return None


def prefix_ids(tok, prompt: str, system: str | None, render, history: list | None = None) -> list[int]:
    """The templated prompt's ids: control tokens only where the template writes them (module header)."""
    segs = prefix_segments(tok, prompt, system, render, history)
    table, pattern = special_tokens(tok)
    if segs is None:
        texts = [("prompt", prompt), ("system prompt", system)]
        texts += [(f"earlier turn {i} ({m['role']})", m["content"]) for i, m in enumerate(history or ())]
        for name, text in texts:
            found = pattern.search(text) if (pattern is not None and text) else None
            if found:
                raise ValueError(f"the {name} holds special-token text {found.group(0)!r} and this chat template "
                                 "rewrites its content, so it cannot be kept as text")
        return template_ids(tok, render(tok, prompt, system, history))
    ids: list[int] = []
    for text, special in segs:
        ids += [table[text]] if special else encode_text(tok, text)
    return ids
