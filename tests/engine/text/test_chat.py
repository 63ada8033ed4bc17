"""chat.encode_example with real tokenizers: layout, predicted tokens, offsets, truncation, bad input."""

import numpy as np
import pytest

import helpers as real_tokenizers
from profuser.engine.text.chat import canonical_offsets, encode_example, tokenize_with_offsets

TEXTS = [
    "The capital of France is Paris.",
    " leading space, trailing space ",
    "東京は日本の首都です。 中文测试",
    "emoji 🙂🚀 and ZWJ 👩‍💻 family",
    "digits 1234567890 and 3.14159, 1,000,000",
    "runs   of    spaces\n\n\nand\t\ttabs\n",
    "User: hi\nAssistant: hello <b>bold</b> ```py\nx = 1\n```",
]


def check_example(tok, prompt, response, e, max_length=None):
    L = e.input_ids.shape[0]
    R = e.pred_ids.shape[0]
    assert e.input_ids.dtype == e.pred_pos.dtype == e.pred_ids.dtype == e.pred_offsets.dtype == np.int32
    assert e.pred_offsets.shape == (R, 2)
    np.testing.assert_array_equal(e.pred_ids, e.input_ids[e.pred_pos + 1])
    assert (np.diff(e.pred_pos) == 1).all()  # the response is one contiguous block
    assert (e.pred_offsets >= 0).all() and (e.pred_offsets <= len(response)).all()
    assert (np.diff(e.pred_offsets[:, 0]) >= 0).all()
    if max_length is not None:
        assert L <= max_length


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_example_real(name, text):
    tok = real_tokenizers.load(name)
    e = encode_example(tok, "Say something.", text)
    check_example(tok, "Say something.", text, e)
    # last predicted token is the end-of-turn with the empty span at the end of the response
    assert e.pred_offsets[-1].tolist() == [len(text), len(text)]
    eot = "<|im_end|>" if name == "smollm2" else "<end_of_turn>"
    assert tok.convert_ids_to_tokens(int(e.pred_ids[-1])) == eot
    # the response tokens decode back to the response (no template token leaks into it)
    assert tok.decode(e.pred_ids[:-1].tolist()) == text
    # spans cover the response: each token's text is response[start:end] and gaps are absorbed
    starts, ends = e.pred_offsets[:-1, 0], e.pred_offsets[:-1, 1]
    assert starts[0] == 0 and ends.max() == len(text)
    frontier = np.maximum.accumulate(ends)
    assert (starts[1:] <= frontier[:-1]).all()


def test_prefix_is_generation_prompt():
    tok = real_tokenizers.load("smollm2")
    e = encode_example(tok, "What is 2+2?", "4", system="Be brief.")
    prefix = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "What is 2+2?"}],
                                     tokenize=False, add_generation_prompt=True)
    P = len(tok(prefix, add_special_tokens=False)["input_ids"])
    assert e.pred_pos[0] == P - 1
    assert tok.decode(e.input_ids[:P].tolist()) == prefix
    # suffix after <|im_end|> is the template's newline
    assert tok.decode(e.input_ids[P:].tolist()) == "4<|im_end|>\n"


def test_fallback_template_without_chat_template():
    tok = real_tokenizers.load("gpt2")  # no chat template: "User:/Assistant:" + EOS
    e = encode_example(tok, "hi", " there")
    check_example(tok, "hi", " there", e)
    assert int(e.pred_ids[-1]) == tok.eos_token_id
    assert int(e.input_ids[0]) == tok.bos_token_id
    assert tok.decode(e.input_ids[1:].tolist()).startswith("User: hi\nAssistant: ")


def test_gemma_fallback_uses_turn_markers():
    tok = real_tokenizers.load("gemma3")
    e = encode_example(tok, "hi", "yo", system="sys")
    text = tok.decode(e.input_ids.tolist())
    assert text == "<bos><start_of_turn>user\nsys\n\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n"


def test_max_length_truncates_response_only():
    tok = real_tokenizers.load("smollm2")
    full = encode_example(tok, "q", "one two three four five six seven")
    P = int(full.pred_pos[0]) + 1
    e = encode_example(tok, "q", "one two three four five six seven", max_length=P + 3)
    check_example(tok, "q", "one two three four five six seven", e, max_length=P + 3)
    assert e.input_ids.shape[0] == P + 3
    np.testing.assert_array_equal(e.input_ids, full.input_ids[: P + 3])
    assert e.pred_ids.shape[0] == 3  # three response tokens, no end-of-turn: the turn did not end
    np.testing.assert_array_equal(e.pred_offsets, full.pred_offsets[:3])
    # room for the whole response and the end-of-turn but not the trailing newline
    n = full.input_ids.shape[0]
    e2 = encode_example(tok, "q", "one two three four five six seven", max_length=n - 1)
    np.testing.assert_array_equal(e2.pred_ids, full.pred_ids)
    with pytest.raises(ValueError, match="max_length=5 leaves no room"):
        encode_example(tok, "q", "x", max_length=5)


def test_empty_response_predicts_only_end_of_turn():
    tok = real_tokenizers.load("smollm2")
    e = encode_example(tok, "q", "")
    assert e.pred_ids.tolist() == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert e.pred_offsets.tolist() == [[0, 0]]


def test_bad_types_rejected():
    tok = real_tokenizers.load("smollm2")
    with pytest.raises(ValueError, match="must be str"):
        encode_example(tok, "q", None)


def test_decode_fallback_offsets_tekken():
    """MistralCommonBackend gives no offsets: cumulative decoding must give the same kind of spans."""
    tok = real_tokenizers.load("tekken")
    text = "Hi 東京 🙂  12345\n\nok"
    ids, off = tokenize_with_offsets(tok, text)
    assert ids.shape[0] == off.shape[0] > 0
    assert off[0, 0] == 0 and off[:, 1].max() == len(text)
    # whole-character tokens: the span's text is what the token decodes to
    for i, (a, b) in enumerate(off.tolist()):
        piece = tok.decode([int(ids[i])])
        if "\ufffd" not in piece:
            assert text[a:b] == piece


def test_canonical_offsets_rules():
    text = "ab  cd"
    # a tokenizer that trims the whitespace from " cd": the gap goes to the next token
    np.testing.assert_array_equal(canonical_offsets(np.array([[0, 2], [4, 6]]), text), [[0, 2], [2, 6]])
    with pytest.raises(ValueError, match="skip text 'b'"):
        canonical_offsets(np.array([[0, 1], [2, 6]]), "abcdef")
    with pytest.raises(ValueError, match="do not fit the text"):
        canonical_offsets(np.array([[0, 9]]), text)
    with pytest.raises(ValueError, match="end at character 2"):
        canonical_offsets(np.array([[0, 2]]), "abcd")


def test_predicted_bytes_is_the_one_byte_count():
    """The byte count behind MinCE per byte, eval bits per byte and the store's n_bytes check."""
    from profuser.engine.text.chat import predicted_bytes

    tok = real_tokenizers.load("smollm2")
    resp = "Tokyo (東京) 😀 café"
    full = encode_example(tok, "Where?", resp)
    assert predicted_bytes(resp, full.pred_offsets) == len(resp.encode()) + 1  # + the end-of-turn
    cut = encode_example(tok, "Where?", resp, max_length=int(full.pred_pos[0]) + 4)  # response truncated
    covered = resp[: int(cut.pred_offsets[:, 1].max())]
    assert predicted_bytes(resp, cut.pred_offsets) == len(covered.encode()) < len(resp.encode())  # no end-of-turn
    assert predicted_bytes("", encode_example(tok, "Hi", "").pred_offsets) == 1  # only the end-of-turn
    assert predicted_bytes("x", []) == 0


@pytest.mark.parametrize("name", ["gpt2", "gemma3"])
def test_exported_fallback_template_gives_the_training_ids(name, tmp_path):
    """An export of a model without a chat template carries the fallback one it was trained with
    (trainer/checkpoint.py). On it our encoder takes the template path, a user's `apply_chat_template` and
    lm-eval render BOS / EOS as text: every way gives the ids training used without the template."""
    from profuser.engine.loader.collate import StudentEncoder
    from profuser.engine.models import load_tokenizer
    from profuser.engine.text.chat import fallback_chat_template

    tok = real_tokenizers.load(name)
    assert not getattr(tok, "chat_template", None)
    tok.save_pretrained(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text(fallback_chat_template(tok), encoding="utf-8")
    exported = load_tokenizer(tmp_path)
    assert exported.chat_template == fallback_chat_template(tok)
    cases = [(p, r, s) for p in ("hi", TEXTS[2]) for r in TEXTS[:5] for s in (None, "Be brief.")]
    for p, r, s in cases:
        a, b = encode_example(tok, p, r, system=s), encode_example(exported, p, r, system=s)
        for field in ("input_ids", "pred_pos", "pred_ids", "pred_offsets"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{field} {p!r} {r!r} {s!r}")
        msgs = ([{"role": "system", "content": s}] if s else []) + [{"role": "user", "content": p}]
        prompt = exported.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert prompt.startswith(tok.bos_token)  # the BOS as text, read as the BOS id
        P = int(a.pred_pos[0]) + 1
        assert exported(prompt, add_special_tokens=False)["input_ids"] == a.input_ids[:P].tolist()
    ps, rs, ss = (list(x) for x in zip(*cases))
    x, y = StudentEncoder(tok).encode_batch(ps, rs, ss), StudentEncoder(exported).encode_batch(ps, rs, ss)
    for field in ("input_ids", "ids_off", "pred_pos", "pred_ids", "pred_offsets", "pred_off"):
        np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    if name == "gpt2":  # the plain layout ends the turn with EOS, as text for the tools, as the id for us
        full = exported.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                            tokenize=False)
        assert full.endswith("Assistant: yo" + tok.eos_token)


# ------------------------------------------------------------------------------------------------------------
# multi-turn conversations: earlier turns are context, the predicted tokens are the last response's
# ------------------------------------------------------------------------------------------------------------

HISTORY = [{"role": "user", "content": "Define 'eel'."}, {"role": "assistant", "content": "A long fish."},
           {"role": "user", "content": "And 'emu'?"}, {"role": "assistant", "content": " A big bird. "}]
MULTI_TURN_NAMES = ["smollm2", "gemma3", "gpt2", "mistral-sp", "deepseek", "llama3", "qwen2.5"]


@pytest.mark.parametrize("name", MULTI_TURN_NAMES)
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_history_is_rendered_by_the_template_and_predicts_only_the_last_turn(name, system):
    """The prefix is the model's own template over the whole conversation (its fallback for tokenizers without
    one: each earlier assistant turn ended by the EOS id, as an export's template writes it); the predicted
    tokens are the last response's, exactly as without history."""
    from profuser.engine.text.chat import fallback_chat_template

    tok = real_tokenizers.load(name)
    for response in TEXTS[:4]:
        e = encode_example(tok, "And 'elk'?", response, system=system, history=HISTORY)
        alone = encode_example(tok, "And 'elk'?", response, system=system)
        check_example(tok, "And 'elk'?", response, e)
        np.testing.assert_array_equal(e.pred_ids, alone.pred_ids)
        np.testing.assert_array_equal(e.pred_offsets, alone.pred_offsets)
        assert len(e.input_ids) > len(alone.input_ids) + 8
        msgs = ([{"role": "system", "content": system}] if system else []) + HISTORY + \
            [{"role": "user", "content": "And 'elk'?"}]
        template = getattr(tok, "chat_template", None) or fallback_chat_template(tok)
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template)
        P = int(e.pred_pos[0]) + 1
        assert tok(prompt, add_special_tokens=False)["input_ids"] == e.input_ids[:P].tolist()
        assert "A long fish." in tok.decode(e.input_ids[:P].tolist())


def test_max_length_cuts_the_oldest_exchange_first_never_the_prompt():
    tok = real_tokenizers.load("smollm2")
    full = encode_example(tok, "And 'elk'?", "A large deer.", history=HISTORY)
    newest = encode_example(tok, "And 'elk'?", "A large deer.", history=HISTORY[2:])
    none = encode_example(tok, "And 'elk'?", "A large deer.")
    assert encode_example(tok, "And 'elk'?", "A large deer.", history=HISTORY,
                          max_length=len(full.input_ids)).input_ids.tolist() == full.input_ids.tolist()
    cut = encode_example(tok, "And 'elk'?", "A large deer.", history=HISTORY, max_length=len(full.input_ids) - 1)
    assert cut.input_ids.tolist() == newest.input_ids.tolist()
    cut = encode_example(tok, "And 'elk'?", "A large deer.", history=HISTORY, max_length=len(newest.input_ids) - 1)
    assert cut.input_ids.tolist() == none.input_ids.tolist()
    P = int(none.pred_pos[0]) + 1  # no history left: the response is cut as for a single exchange
    cut = encode_example(tok, "And 'elk'?", "A large deer.", history=HISTORY, max_length=P + 2)
    assert cut.input_ids.tolist() == none.input_ids[:P + 2].tolist()
    with pytest.raises(ValueError, match="leaves no room for the response"):
        encode_example(tok, "And 'elk'?", "A large deer.", history=HISTORY, max_length=P)


@pytest.mark.parametrize("history, message", [
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "history turn 0: expected a user"),
    ([{"role": "user", "content": "x"}], "ends with a user message"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "history turn 0"),
    (["hi", "there"], "history turn 0"),
])
def test_malformed_history_is_named(history, message):
    with pytest.raises(ValueError, match=message):
        encode_example(real_tokenizers.load("gpt2"), "q", "a", history=history)
