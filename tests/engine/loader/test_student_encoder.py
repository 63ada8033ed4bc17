"""collate.StudentEncoder.encode_batch (the loader's batched student encoding) == chat.encode_example, example by
example."""

from __future__ import annotations

import numpy as np
import pytest

import helpers as rt
from profuser.engine.loader.collate import StudentEncoder
from profuser.engine.text import chat
from profuser.engine.tools import synthetic as fx

# Gemma-3's template (its GGUF tokenizer ships none): it trims the content, a case the sentinel must survive
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\\n' }}{% endif %}")


def load(name, monkeypatch):
    if name != "gemma3+template":
        return rt.load(name)
    tok = rt.load("gemma3")  # the shared instance, its template set for this test only (loading is slow)
    monkeypatch.setattr(tok, "chat_template", GEMMA_TEMPLATE, raising=False)
    return tok


# smollm2 and gemma3+template take the batched path; the others (no chat template) the per-example fallback
@pytest.mark.parametrize("name", ["smollm2", "gemma3+template", "gemma3", "gpt2", "deepseek"])
@pytest.mark.parametrize("max_length", [None, 48, 20])
def test_encode_batch_equals_encode_example(name, max_length, monkeypatch):
    tok = load(name, monkeypatch)
    ex = fx.corpus(40, extra_every=2, system_every=3)
    prompts, responses, systems = ([e[k] for e in ex] for k in ("prompt", "response", "system"))
    errors = []
    got = StudentEncoder(tok).encode_batch(prompts, responses, systems, max_length=max_length, errors=errors)
    failed = dict(errors)
    n_ok = 0
    for i, e in enumerate(ex):
        a, z = got.ids_off[i], got.ids_off[i + 1]
        pa_, pz = got.pred_off[i], got.pred_off[i + 1]
        try:
            want = chat.encode_example(tok, e["prompt"], e["response"], system=e["system"],
                                       max_length=max_length)
        except ValueError as exc:
            assert i in failed and str(exc).split(":")[0] in failed[i]
            assert z == a and pz == pa_
            continue
        assert i not in failed
        n_ok += 1
        np.testing.assert_array_equal(got.input_ids[a:z], want.input_ids)
        np.testing.assert_array_equal(got.pred_pos[pa_:pz], want.pred_pos)
        np.testing.assert_array_equal(got.pred_ids[pa_:pz], want.pred_ids)
        np.testing.assert_array_equal(got.pred_offsets[pa_:pz], want.pred_offsets)
    assert n_ok > 0 or len(failed) == len(ex)  # SmolLM2's system prompt alone exceeds 20 tokens


def test_encode_batch_raises_without_an_error_list():
    tok = rt.load("smollm2")
    with pytest.raises(ValueError, match="max_length=8"):
        StudentEncoder(tok).encode_batch(["What is a cat?"], ["An animal."], [None], max_length=8)


@pytest.mark.parametrize("name", ["smollm2", "gemma3+template", "gpt2"])
@pytest.mark.parametrize("max_length", [None, 60, 20])
def test_multi_turn_rows_equal_encode_example(name, max_length, monkeypatch):
    """A batch with earlier turns (the loader's multi-turn rows, encoded one by one) beside single exchanges
    (through the template plans) encodes each row as encode_example does, in order, history cut to
    max_length included, and names each row that cannot fit by its index in the batch."""
    tok = load(name, monkeypatch)
    ex = fx.corpus(12, extra_every=3, system_every=4)
    histories = [None if i % 3 == 0 else [{"role": "user", "content": ex[i - 1]["prompt"]},
                                          {"role": "assistant", "content": " " + ex[i - 1]["response"]}] * (i % 3)
                 for i in range(len(ex))]
    prompts, responses, systems = ([e[k] for e in ex] for k in ("prompt", "response", "system"))
    errors = []
    got = StudentEncoder(tok).encode_batch(prompts, responses, systems, max_length=max_length, errors=errors,
                                           histories=histories)
    failed = dict(errors)
    assert (len(failed) > 0) == (max_length == 20)  # at 20 tokens some templated prompts alone do not fit
    for i, e in enumerate(ex):
        try:
            want = chat.encode_example(tok, e["prompt"], e["response"], system=e["system"], history=histories[i],
                                       max_length=max_length)
        except ValueError as exc:
            assert i in failed and str(exc).split(":")[0] in failed[i]
            assert got.ids_off[i] == got.ids_off[i + 1] and got.pred_off[i] == got.pred_off[i + 1]
            continue
        assert i not in failed
        a, z = got.ids_off[i], got.ids_off[i + 1]
        np.testing.assert_array_equal(got.input_ids[a:z], want.input_ids)
        np.testing.assert_array_equal(got.pred_offsets[got.pred_off[i]:got.pred_off[i + 1]], want.pred_offsets)
