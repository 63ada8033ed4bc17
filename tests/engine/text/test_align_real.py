"""Alignment properties on real text with real tokenizers (SmolLM2 <-> Gemma-3, then other families).

For every aligned pair (s -> r): the student's and the teacher's predicted tokens start at the same
character; aligned rows increase with s (monotonic); the end-of-turn aligns to the end-of-turn;
C++ and Python give identical results.
"""

import numpy as np
import pytest

import helpers as real_tokenizers
from profuser.engine.text import align
from profuser.engine.text.chat import encode_example

TEXT = (
    "The quick brown fox jumps over the lazy dog. 東京は日本の首都です。 中文测试：你好，世界！\n\n"
    "Emoji 🙂🚀👩‍💻 and digits 1234567890, 3.14159, 2,048 tokens.\n"
    "    indented   code:\n\tdef f(x):\n\t\treturn x ** 2  # comment\n\n\n"
    "User: hi\nAssistant: hello <|fake|> [INST] not a template [/INST]\n"
    "Ünïcödé àccents, Ελληνικά, русский текст, العربية.   trailing   "
)

PAIRS = [("smollm2", "gemma3"), ("gemma3", "smollm2"), ("smollm2", "gpt2"), ("mistral-sp", "smollm2"),
         ("deepseek", "gemma3"), ("gpt2", "mistral-sp")]


@pytest.fixture(params=[False, True], ids=["python", "cpp"])
def use_ext(request):
    if request.param and not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    return request.param


def _encode(name, text):
    return encode_example(real_tokenizers.load(name), "Write something.", text)


def check_alignment(es, et, a):
    assert a.shape == (es.pred_ids.shape[0],) and a.dtype == np.int32
    hit = np.nonzero(a >= 0)[0]
    assert hit.size > 0
    # same start character on both sides
    np.testing.assert_array_equal(es.pred_offsets[hit, 0], et.pred_offsets[a[hit], 0])
    # monotonic: strictly increasing teacher rows
    assert (np.diff(a[hit]) > 0).all()
    # end-of-turn -> end-of-turn
    assert a[-1] == et.pred_ids.shape[0] - 1


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_offsets_properties(student, teacher, use_ext):
    es, et = _encode(student, TEXT), _encode(teacher, TEXT)
    a = align.align_offsets(es.pred_offsets, et.pred_offsets, use_ext=use_ext)
    check_alignment(es, et, a)
    # on mostly-Latin text most student positions find a teacher row
    assert (a >= 0).mean() > 0.5
    # a clean student token whose start is a clean teacher start must be aligned (no missed pairs)
    from profuser.engine.text._align_py import clean_mask

    cs, ct = clean_mask(es.pred_offsets), clean_mask(et.pred_offsets)
    t_clean_starts = set(et.pred_offsets[ct, 0].tolist())
    want = cs & np.isin(es.pred_offsets[:, 0], list(t_clean_starts))
    np.testing.assert_array_equal(a >= 0, want)


@pytest.mark.parametrize("student,teacher", PAIRS[:3])
def test_offsets_cpp_equals_python_real(student, teacher):
    if not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    es, et = _encode(student, TEXT), _encode(teacher, TEXT)
    np.testing.assert_array_equal(align.align_offsets(es.pred_offsets, et.pred_offsets, use_ext=True),
                                  align.align_offsets(es.pred_offsets, et.pred_offsets, use_ext=False))


@pytest.mark.parametrize("band", [None, 16])
def test_mined_properties_real(use_ext, band):
    s_tok, t_tok = real_tokenizers.load("smollm2"), real_tokenizers.load("gemma3")
    es, et = _encode("smollm2", TEXT), _encode("gemma3", TEXT)
    ss, ts = align.token_strings(s_tok, es.pred_ids), align.token_strings(t_tok, et.pred_ids)
    a = align.align_mined(ss, ts, band=band, use_ext=use_ext)
    hit = np.nonzero(a >= 0)[0]
    # aligned tokens are equal strings, rows increase, end-of-turn aligned by role
    assert all(ss[s] == ts[a[s]] for s in hit)
    assert (np.diff(a[hit]) > 0).all()
    assert a[-1] == len(ts) - 1
    # equal strings at the same place: mined agrees with offsets wherever both align
    o = align.align_offsets(es.pred_offsets, et.pred_offsets, use_ext=use_ext)
    both = (a >= 0) & (o >= 0)
    assert both.sum() > 0.5 * (o >= 0).sum()
    assert (a[both] == o[both]).mean() > 0.95


def test_mined_cpp_equals_python_real():
    if not align.HAVE_EXT:
        pytest.skip("profuser._C not built")
    s_tok, t_tok = real_tokenizers.load("smollm2"), real_tokenizers.load("gemma3")
    es, et = _encode("smollm2", TEXT), _encode("gemma3", TEXT)
    ss, ts = align.token_strings(s_tok, es.pred_ids), align.token_strings(t_tok, et.pred_ids)
    for band in (None, 0, 4, 32):
        np.testing.assert_array_equal(align.align_mined(ss, ts, band=band, use_ext=True),
                                      align.align_mined(ss, ts, band=band, use_ext=False))


def test_token_strings_bad_id():
    tok = real_tokenizers.load("smollm2")
    with pytest.raises(ValueError, match="token id 49152 is outside the vocabulary of size 49152"):
        align.token_strings(tok, [1, 49152])


def test_tokenizer_hash_stable_and_distinct():
    s1 = real_tokenizers.load("smollm2")
    from transformers import AutoTokenizer

    from profuser.engine.models import ALIASES

    gguf = ALIASES["smollm2-135m-instruct"].gguf()  # converted from the GGUF again, not the cached folder
    s2 = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert align.tokenizer_hash(s1) == align.tokenizer_hash(s2)
    assert len(align.tokenizer_hash(s1)) == 64
    assert align.tokenizer_hash(s1) != align.tokenizer_hash(real_tokenizers.load("gpt2"))
