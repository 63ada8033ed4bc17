"""Chat encoding shared by the teacher pass, the loader and the trainer (docs/contracts.md section 2).

An example (prompt, response[, system]) becomes

    input_ids = prefix_ids + response_ids + suffix_ids

where prefix = the chat template rendered with add_generation_prompt=True, and suffix = what the template
writes after the assistant content (its first token is the end-of-turn token: <|im_end|>, <end_of_turn>,
</s>, ...). Each part is tokenized on its own with add_special_tokens=False, so no token straddles the
response boundary and the response tokens (and their character offsets) do not depend on the template.

The *predicted tokens* are the response tokens plus the end-of-turn token. Predicted token r sits at
input position pred_pos[r] + 1, has id pred_ids[r], and covers characters pred_offsets[r] = [start, end)
of `response`; the end-of-turn token covers [len(response), len(response)).

Offsets. Fast tokenizers give offsets directly. We make them canonical so that two tokenizers describe
the same text the same way: a gap between one token's end and the next token's start (whitespace that a
tokenizer trims from its offsets, or the dummy-prefix space of SentencePiece) is given to the following
token, so the spans cover the response with no holes; byte pieces of one multi-byte character keep the
overlapping spans the tokenizer gives them (all pieces report the whole character). Tokenizers without
offsets (slow tokenizers, MistralCommonBackend) fall back to cumulative decoding: the span of token i
is [len(decode(ids[:i])), len(decode(ids[:i+1]))), with pieces that decode to an incomplete character
("\\ufffd") folded into the character they complete.

Multi-turn conversations: `history` holds the earlier turns ([{role, content}], user / assistant from the
user's). They are context inside the prefix, rendered by the same template (every model renders the
conversation its own way), so the predicted tokens and their offsets are still those of `response` and the
alignment stays per turn. max_length drops the oldest exchanges before it cuts the response.

Suffix detection renders the conversation once with a sentinel as the assistant content: everything
after the sentinel is the suffix. This is robust to templates that strip or rewrite the content
(e.g. Gemma's `| trim`). A tokenizer without a chat template gets a plain fallback template (Gemma turn
markers when the vocabulary has them, else "User:/Assistant:" ended by the EOS token).
"""

from __future__ import annotations

import unicodedata
import weakref
from dataclasses import dataclass

import numpy as np

from .literal_text import encode_text, encode_texts, prefix_ids, template_ids

_SENTINEL = "\x00\x01PROFUSER_RESPONSE\x01\x00"


@dataclass
class EncodedExample:
    """One templated conversation and its predicted tokens.

    input_ids:    int32 [L]     prefix + response + end-of-turn (+ rest of the suffix)
    pred_pos:     int32 [R]     position p whose next token input_ids[p + 1] is predicted token r
    pred_offsets: int32 [R, 2]  character span [start, end) of predicted token r inside `response`
    pred_ids:     int32 [R]     == input_ids[pred_pos + 1]
    """

    input_ids: np.ndarray
    pred_pos: np.ndarray
    pred_offsets: np.ndarray
    pred_ids: np.ndarray

    @property
    def n_predicted(self) -> int:
        return int(self.pred_ids.shape[0])


# ----------------------------------------------------------------------------------------------------
# templates
# ----------------------------------------------------------------------------------------------------


def _messages(prompt: str, response: str | None, system: str | None, history: list | None = None) -> list[dict]:
    """The conversation as chat messages: system, the earlier turns (history: [{role, content}], alternating
    user / assistant and ending with the assistant's), the prompt, then the response when given."""
    msgs = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs += [{"role": m["role"], "content": m["content"]} for m in (history or ())]
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def _has_token(tok, text: str) -> bool:
    """True if `text` is one token of the vocabulary (cheap: no get_vocab() dict of 262k entries)."""
    vocab = getattr(tok, "vocab", None)
    if isinstance(vocab, dict):
        return text in vocab
    try:
        tid = tok.convert_tokens_to_ids(text)
    except Exception:  # noqa: BLE001 - backends without a token table: treat as absent
        return False
    return isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id


_MARKERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _gemma_markers(tok) -> bool:
    """Whether the vocabulary has Gemma's turn markers (cached per tokenizer object)."""
    try:
        return _MARKERS[tok]
    except (KeyError, TypeError):
        pass
    has = _has_token(tok, "<start_of_turn>") and _has_token(tok, "<end_of_turn>")
    try:
        _MARKERS[tok] = has
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return has


# The fallback templates for tokenizers without one, as Jinja: _fallback_render renders them for our own
# encoding, and whatever renders chats itself gets the same text from `fallback_chat_template` (one copy of
# the layout): lm-eval's `--apply_chat_template`, and a user's `apply_chat_template` on an export, which
# carries the template (trainer/checkpoint.py). There BOS / EOS are the tokens' text, which tokenizers read
# as the special tokens; our own encoding renders them empty and adds the ids (_fallback_specials), as some
# backends do not parse special tokens in text. Both give the same ids (tests/engine/text/test_chat.py).
_BOS = "{%- if bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}"
_EOS = "(eos_token if eos_token is defined and eos_token else '')"
_GEMMA_FALLBACK = (
    _BOS +  # Gemma's turn markers end the turn: no EOS (as _fallback_specials)
    "{%- set sys = namespace(text=none) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set sys.text = m['content'] -%}"
    "{%- elif m['role'] == 'user' -%}"
    "{{ '<start_of_turn>user\n' }}{%- if sys.text is not none -%}{{ sys.text + '\n\n' }}{%- endif -%}"
    "{{ m['content'] + '<end_of_turn>\n' }}{%- set sys.text = none -%}"  # the first user turn only, as Gemma's
    "{%- else -%}{{ '<start_of_turn>model\n' + m['content'] + '<end_of_turn>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
_PLAIN_FALLBACK = (
    _BOS +
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\n\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'User: ' + m['content'] + '\n' }}"
    "{%- else -%}{{ 'Assistant: ' + m['content'] + " + _EOS + " }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}")


def fallback_chat_template(tok) -> str:
    """The Jinja chat template used for a tokenizer without one: Gemma turn markers when the vocabulary has
    them, else "User:/Assistant:"."""
    return _GEMMA_FALLBACK if _gemma_markers(tok) else _PLAIN_FALLBACK


_COMPILED: dict = {}  # template text -> compiled template


def _jinja(template: str):
    """The template compiled once, in the environment transformers renders chat templates in."""
    compiled = _COMPILED.get(template)
    if compiled is None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compiled = _COMPILED[template] = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined).from_string(template)
    return compiled


def _fallback_render(tok, prompt: str, response: str | None, system: str | None, history=None) -> str:
    """The fallback template rendered (fallback_chat_template). Returns the prefix when response is None.

    BOS and the EOS ending the predicted turn render empty (their ids: _fallback_specials); the EOS ending each
    earlier assistant turn of the prefix is its token's text, which the segmenting encoder (literal_text)
    maps to the token's id: the ids a renderer with the real EOS gives."""
    eos = getattr(tok, "eos_token", None) if response is None and history else ""
    return _jinja(fallback_chat_template(tok)).render(messages=_messages(prompt, response, system, history),
                                                      add_generation_prompt=response is None,
                                                      bos_token="", eos_token=eos or "")


def _fallback_specials(tok) -> tuple[list[int], list[int]]:
    """(ids before the prefix, ids after the suffix) of the fallback template: [BOS], [EOS]."""
    bos = [int(tok.bos_token_id)] if getattr(tok, "bos_token_id", None) is not None else []
    gemma = _gemma_markers(tok)
    eos = [] if gemma or tok.eos_token_id is None else [int(tok.eos_token_id)]
    return bos, eos


def templated_prompt_ids(tok, prompt: str, system: str | None = None, history: list | None = None) -> list[int]:
    """Ids of the templated prompt (without the fallback template's BOS): special-token text in the prompt,
    system prompt or earlier turns stays text; control tokens come only from the template (literal_text.py)."""
    return prefix_ids(tok, prompt, system, lambda t, p, s, h: render_parts(t, p, s, h)[0], history)


def render_parts(tok, prompt: str, system: str | None = None, history: list | None = None) -> tuple[str, str]:
    """(prefix, suffix) strings of the template around the assistant content (history: the earlier turns)."""
    if getattr(tok, "chat_template", None):
        prefix = tok.apply_chat_template(_messages(prompt, None, system, history), tokenize=False,
                                         add_generation_prompt=True)
        full = tok.apply_chat_template(_messages(prompt, _SENTINEL, system, history), tokenize=False)
    else:
        prefix = _fallback_render(tok, prompt, None, system, history)
        full = _fallback_render(tok, prompt, _SENTINEL, system, history)
    at = full.find(_SENTINEL)
    if at < 0:
        raise ValueError("the chat template dropped the assistant content; cannot locate the response")
    suffix = full[at + len(_SENTINEL):]
    return prefix, suffix


# ----------------------------------------------------------------------------------------------------
# tokenization with offsets
# ----------------------------------------------------------------------------------------------------


def _decode_offsets(tok, ids: list[int], text: str) -> np.ndarray:
    """Cumulative-decoding offsets for tokenizers without an offset mapping. int32 [n, 2]."""
    n = len(ids)
    out = np.zeros((n, 2), dtype=np.int32)
    prev_len = 0
    pending = []  # tokens whose bytes do not yet form a whole character
    for i in range(n):
        s = tok.decode(ids[: i + 1])
        if s.endswith("\ufffd") and not text[: len(s)].endswith("\ufffd"):
            pending.append(i)
            continue
        cur = len(s)
        start = prev_len
        for j in pending:  # every piece of a split character reports the whole character
            out[j] = (start, cur)
        pending.clear()
        out[i] = (start, cur)
        prev_len = cur
    for j in pending:
        out[j] = (prev_len, len(text))
    return out


def tokenize_with_offsets(tok, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and canonical character spans of `text` tokenized alone, without special tokens.

    Returns (ids int32 [n], offsets int32 [n, 2]). Raises ValueError when the spans do not cover the text
    (ids that do not describe the text).
    """
    if not text:
        return np.zeros(0, np.int32), np.zeros((0, 2), np.int32)
    offsets = None
    try:
        ids_l, off_l = encode_texts(tok, [text], offsets=True)
        ids = np.asarray(ids_l[0], dtype=np.int32)
        offsets = np.asarray(off_l[0], dtype=np.int32).reshape(-1, 2)
    except (NotImplementedError, TypeError, ValueError, KeyError):  # no offsets (MistralCommonBackend)
        ids = np.asarray(encode_text(tok, text), dtype=np.int32)
    if offsets is None or offsets.shape[0] != ids.shape[0]:
        offsets = _decode_offsets(tok, ids.tolist(), text)
    return ids, canonical_offsets(offsets, text)


def canonical_offsets(offsets: np.ndarray, text: str) -> np.ndarray:
    """Give each inter-token gap to the following token (see the module header). int32 [n, 2] -> [n, 2].

    A gap of combining marks (a text in NFD read by an NFC-normalizing tokenizer, which composes them into
    the character before) goes to the previous token instead. Raises ValueError if spans leave the text,
    go backwards, or skip other text (the ids do not describe the text).
    """
    off = np.array(offsets, dtype=np.int64, copy=True)
    n = off.shape[0]
    if n == 0:
        return off.astype(np.int32)
    if (off < 0).any() or (off > len(text)).any() or (off[:, 1] < off[:, 0]).any():
        raise ValueError(f"token offsets do not fit the text of length {len(text)}")
    # prev_end[i] = max end of tokens before i (the running frontier); 0 for the first token
    frontier = np.maximum.accumulate(off[:, 1])
    prev_end = np.concatenate([[0], frontier[:-1]])
    if (np.diff(off[:, 0]) < 0).any():
        raise ValueError("token offsets go backwards")
    for i in np.nonzero(off[:, 0] > prev_end)[0].tolist():
        skipped = text[prev_end[i]:off[i, 0]]
        if not skipped.strip() or i == 0:  # whitespace (or anything before the first token): the next token's
            if skipped.strip() and not _absorbed(skipped):
                raise ValueError(f"token offsets skip text {skipped!r} at character {prev_end[i]}: the ids do not "
                                 "decode to the text")
            off[i, 0] = prev_end[i]
        elif _absorbed(skipped):  # marks a normalizer composed into the previous character: the previous token's
            off[i - 1, 1] = max(off[i - 1, 1], off[i, 0])
        else:
            raise ValueError(f"token offsets skip text {skipped!r} at character {prev_end[i]}: the ids do not decode "
                             "to the text")
    tail = text[int(off[:, 1].max()):]
    if tail.strip():
        if not _absorbed(tail):
            raise ValueError(f"token offsets end at character {int(off[:, 1].max())} but the text has {len(text)}")
        off[-1, 1] = len(text)  # trailing marks a normalizer composed into the last token
    return off.astype(np.int32)


def _absorbed(skipped: str) -> bool:
    """Characters a normalizing tokenizer (NFC, NFKC) composes into the character before them and leaves
    out of every span: combining marks (and whitespace). They belong to the token before the gap."""
    return all(unicodedata.category(c).startswith("M") or c.isspace() for c in skipped)


# ----------------------------------------------------------------------------------------------------
# the encoder
# ----------------------------------------------------------------------------------------------------


def end_of_turn_id(tok, suffix_ids: list[int]) -> int:
    if suffix_ids:
        return int(suffix_ids[0])
    if tok.eos_token_id is None:
        raise ValueError("the chat template writes nothing after the response and the tokenizer has no EOS")
    return int(tok.eos_token_id)


def truncate(P: int, resp_ids, resp_off, suffix_ids: list, max_length: int | None):
    """Fit prompt (P tokens) + response + suffix into max_length by cutting the response, then the suffix.

    The prompt is never cut. When the whole response fits, the suffix keeps what fits (the end-of-turn
    first, so it is still predicted); when the response is cut, the suffix is dropped and the turn does
    not end. Returns (resp_ids [n], resp_off [n, 2], suffix_ids)."""
    n_resp = len(resp_ids)
    if max_length is None or P + n_resp + len(suffix_ids) <= max_length:
        return resp_ids, resp_off, suffix_ids
    if P >= max_length:
        raise ValueError(f"max_length={max_length} leaves no room for the response: the templated prompt "
                         f"alone has {P} tokens")
    keep = min(n_resp, max_length - P)
    suffix_ids = suffix_ids[: max_length - P - n_resp] if keep == n_resp else []
    return resp_ids[:keep], resp_off[:keep], suffix_ids


def predicted_bytes(response: str, pred_offsets) -> int:
    """UTF-8 bytes of the text a row's predicted tokens cover, + 1 when the end-of-turn is predicted.

    The one byte count of the project: MinCE per byte (teach, generate), held-out NLL per byte (eval)
    and the store's n_bytes check all use it (the store through `predicted_bytes_rows`, the same rule
    for many rows at once). pred_offsets int [R, 2] as in EncodedExample (the end-of-turn token's span is
    [len(response), len(response)]); a truncated response counts only its covered prefix and no end-of-turn.
    """
    off = np.asarray(pred_offsets).reshape(-1, 2)
    return int(predicted_bytes_rows([response], off, np.array([0, off.shape[0]]))[0])


def predicted_bytes_rows(responses: list[str], offsets: np.ndarray, tok_off: np.ndarray) -> np.ndarray:
    """predicted_bytes of n rows: responses [n], offsets int [sum R, 2], row i owns [tok_off[i], tok_off[i+1])
    -> int64 [n]. Offsets must lie inside their response (callers check that first)."""
    n = len(responses)
    out = np.zeros(n, np.int64)
    full = np.diff(tok_off) > 0
    if not full.any():
        return out
    starts = np.asarray(tok_off[:-1])[full]
    max_end = np.maximum.reduceat(offsets[:, 1], starts)
    last_start = offsets[np.asarray(tok_off[1:])[full] - 1, 0]
    for i, end, last in zip(np.nonzero(full)[0].tolist(), max_end.tolist(), last_start.tolist()):
        r = responses[i]
        out[i] = len((r if end >= len(r) else r[:end]).encode("utf-8")) + int(last == len(r))
    return out


def encode_example(tok, prompt: str, response: str, *, system: str | None = None, history: list | None = None,
                   max_length: int | None = None) -> EncodedExample:
    """Encode one conversation turn; see EncodedExample for the shapes.

    history: the earlier turns of a multi-turn conversation ([{role, content}], alternating user / assistant,
    ending with the assistant's), context only: the predicted tokens are those of `response`. max_length
    first cuts the history from its oldest exchange (user + assistant) until the whole turn fits or no
    history is left, then truncates the response (then the end-of-turn is not predicted: the turn did not
    end); the prompt itself is never truncated: ValueError if the prefix alone leaves no room for a token.
    """
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"prompt and response must be str, got {type(prompt).__name__} and "
                         f"{type(response).__name__}")
    history = check_history(history)
    resp_ids, resp_off = tokenize_with_offsets(tok, response)
    while True:
        _, suffix = render_parts(tok, prompt, system, history)
        prefix_ids = templated_prompt_ids(tok, prompt, system, history)
        suffix_ids = template_ids(tok, suffix)
        if not getattr(tok, "chat_template", None):
            before, after = _fallback_specials(tok)
            prefix_ids, suffix_ids = before + prefix_ids, suffix_ids + after
        if not history or max_length is None or \
                len(prefix_ids) + len(resp_ids) + max(len(suffix_ids), 1) <= max_length:
            break
        history = history[2:]  # the oldest exchange goes first (models see the most recent context)
    if not prefix_ids:
        raise ValueError("the templated prompt encodes to no tokens: nothing predicts the first response "
                         "token")
    eot = end_of_turn_id(tok, suffix_ids)
    if not suffix_ids:
        suffix_ids = [eot]

    P = len(prefix_ids)
    resp_ids, resp_off, suffix_ids = truncate(P, resp_ids, resp_off, suffix_ids, max_length)
    n_resp = len(resp_ids)
    ends_turn = len(suffix_ids) > 0

    input_ids = np.empty(P + n_resp + len(suffix_ids), dtype=np.int32)
    input_ids[:P] = prefix_ids
    input_ids[P:P + n_resp] = resp_ids
    input_ids[P + n_resp:] = suffix_ids
    R = n_resp + int(ends_turn)
    pred_pos = np.arange(P - 1, P - 1 + R, dtype=np.int32)
    pred_offsets = np.empty((R, 2), dtype=np.int32)
    pred_offsets[:n_resp] = resp_off
    if ends_turn:
        pred_offsets[n_resp] = len(response)
    pred_ids = input_ids[pred_pos + 1].copy()
    return EncodedExample(input_ids=input_ids, pred_pos=pred_pos, pred_offsets=pred_offsets,
                          pred_ids=pred_ids)


def split_conversation(msgs, *, every: bool = True) -> tuple[str | None, list[tuple[str, str, list | None]]]:
    """Chat messages -> (system, [(prompt, response, history)]): the turns a model is trained or evaluated on.

    After an optional leading system message, user and assistant messages alternate from the user's and end with
    the assistant's. every=True: one turn per assistant message, its history the messages before its prompt (None
    for the first); every=False: the final assistant message only. ValueError naming the message otherwise."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("must be a non-empty list of {role, content}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be an object with string 'role' and 'content'")
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = msgs[1:] if system is not None else msgs
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i + (system is not None)}: role {m['role']!r} where {want!r} was expected "
                             "(after an optional system message, user and assistant alternate from the user's)")
    if len(turns) < 2 or len(turns) % 2:
        raise ValueError("messages must end with a user message followed by the assistant's response")
    plain = [{"role": m["role"], "content": m["content"]} for m in turns]
    ends = range(1, len(plain), 2) if every else [len(plain) - 1]
    return system, [(plain[a - 1]["content"], plain[a]["content"], plain[:a - 1] or None) for a in ends]


def turn_id(record_id: str, t: int, n_turns: int) -> str:
    """The example id of turn t (0-based) of a record giving n_turns examples: the record's id for one,
    `<id>#<t + 1>` for several (prepare and eval data name a conversation's turns alike)."""
    return record_id if n_turns == 1 else f"{record_id}#{t + 1}"


def check_history(history) -> list[dict]:
    """The earlier turns as a list of {role, content}: user and assistant alternating from the user's,
    ending with the assistant's (the prompt is the next user turn). None or [] -> []. ValueError naming the
    turn otherwise (a prepared set holds only such histories: passes/prepare.py)."""
    if history is None:
        return []
    out = []
    for i, m in enumerate(history):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        want = "user" if i % 2 == 0 else "assistant"
        if role != want or not isinstance(content, str):
            raise ValueError(f"history turn {i}: expected a {want} message with string content, got {m!r:.80}")
        out.append({"role": role, "content": content})
    if len(out) % 2:
        raise ValueError(f"history of {len(out)} turns ends with a user message (the prompt is the next one)")
    return out
