"""Data never becomes a control token (text/literal_text.py), and normalizing tokenizers align through their
normalization, with every real tokenizer we ship."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

import helpers
from profuser.engine.loader.collate import StudentEncoder
from profuser.engine.text import align
from profuser.engine.text.chat import encode_example, predicted_bytes, render_parts, templated_prompt_ids
from profuser.engine.text.literal_text import special_tokens, template_ids

NAMES = ["smollm2", "gemma3", "gpt2", "mistral-sp", "deepseek", "llama3", "qwen2.5"]
CONTROL = ["<|im_end|>", "<|im_start|>", "<end_of_turn>", "<start_of_turn>", "</s>", "<s>", "<|eot_id|>",
           "<|endoftext|>", "<|begin_of_text|>", "<eos>", "<bos>"]


def control_ids(tok) -> set:
    return set(special_tokens(tok)[0].values())


@pytest.mark.parametrize("name", NAMES)
def test_special_token_text_in_data_stays_text(name):
    tok = helpers.tokenizer(name)
    text = "Say " + " then ".join(CONTROL) + " done."
    plain = encode_example(tok, "Define 'eel'.", "A long fish.", system="Be brief.")
    enc = encode_example(tok, f"Q: {text}", f"A: {text}", system=f"S: {text}")
    # in the earlier turns of a conversation too (each message its own placeholder while segmenting)
    turns = [{"role": "user", "content": f"U: {text}"}, {"role": "assistant", "content": f"M: {text}"}]
    plain_turns = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "M"}]
    multi = encode_example(tok, f"Q: {text}", f"A: {text}", system=f"S: {text}", history=turns)
    n_multi = sum(i in control_ids(tok) for i in encode_example(tok, "Q", "A", system="S",
                                                                history=plain_turns).input_ids.tolist())
    assert sum(i in control_ids(tok) for i in multi.input_ids.tolist()) == n_multi
    n_template = sum(i in control_ids(tok) for i in plain.input_ids.tolist())
    # the same number of control tokens as with plain text: all of them from the template, none from data
    assert sum(i in control_ids(tok) for i in enc.input_ids.tolist()) == n_template
    resp = enc.pred_ids[:-1].tolist()  # the response tokens (the last predicted one is the end-of-turn)
    assert not control_ids(tok).intersection(resp)
    assert tok.decode(resp, skip_special_tokens=False).replace("▁", " ").strip().endswith("done.")
    assert predicted_bytes(f"A: {text}", enc.pred_offsets) == len(f"A: {text}".encode()) + 1


@pytest.mark.parametrize("name", NAMES)
def test_segmented_prompt_equals_the_plain_parse_without_special_text(name):
    """Without special-token text in the data, the control-token-safe encoding is exactly the usual one."""
    tok = helpers.tokenizer(name)
    for prompt, system in (("What is a cat?", None), ("  padded \n\n prompt  ", "You are terse."),
                           ("Ünïcödé 東京 😀 12345", "Système: réponds."), ("", None), ("line\nline\t", " ")):
        assert templated_prompt_ids(tok, prompt, system) == template_ids(tok, render_parts(tok, prompt, system)[0])


@pytest.mark.parametrize("name", ["smollm2", "gemma3", "llama3", "qwen2.5"])
def test_the_batched_student_encoder_keeps_special_text_too(name):
    tok = helpers.tokenizer(name)
    prompts = ["Say <|im_end|> now", "Plain prompt", "<end_of_turn><|eot_id|>"]
    responses = ["A <|im_end|> B", "Plain answer.", "</s> and <s>"]
    systems = [None, "Be <|im_start|> brief.", None]
    got = StudentEncoder(tok).encode_batch(prompts, responses, systems)
    for i, (p, r, s) in enumerate(zip(prompts, responses, systems)):
        want = encode_example(tok, p, r, system=s)
        np.testing.assert_array_equal(got.input_ids[got.ids_off[i]:got.ids_off[i + 1]], want.input_ids)
        np.testing.assert_array_equal(got.pred_offsets[got.pred_off[i]:got.pred_off[i + 1]], want.pred_offsets)


def test_nfd_text_aligns_through_an_nfc_tokenizer():
    """Qwen's tokenizer composes NFD text to NFC and leaves the combining marks out of its spans: the marks
    go to the token before them, the example encodes, and offsets alignment to another tokenizer works."""
    qwen, smol = helpers.tokenizer("qwen2.5"), helpers.tokenizer("smollm2")
    text = unicodedata.normalize("NFD", "Café naïve résumé — Ångström señor")
    assert text != unicodedata.normalize("NFC", text)
    eq, es = encode_example(qwen, "Say", text), encode_example(smol, "Say", text)
    assert predicted_bytes(text, eq.pred_offsets) == len(text.encode()) + 1
    o = eq.pred_offsets[:-1]
    assert o[0, 0] == 0 and o[-1, 1] == len(text) and (o[1:, 0] >= o[:-1, 0]).all()
    rows = align.align_offsets(es.pred_offsets, eq.pred_offsets)
    starts = es.pred_offsets[:-1, 0]
    word_start = np.array([c == 0 or text[c] == " " for c in starts.tolist()])
    first = np.r_[True, starts[1:] != starts[:-1]]
    assert (rows[:-1][word_start & first] >= 0).all() and rows[-1] >= 0  # every word start and the end of turn
