"""Bad arguments to the public alignment API: one named ValueError, the same from the C++ and the Python
implementation (the message is compared across both, not only matched)."""

import numpy as np
import pytest

import helpers
from profuser.engine.text import align

OK = np.array([[0, 1], [1, 2]], np.int32)


def _offsets(arg, ext):
    return align.align_offsets(arg, OK, seq_index=4, use_ext=ext)


CASES = {
    # name: (call(ext), message regex)
    "offsets None": (lambda e: _offsets(None, e),
                     r"^sequence 4: student offsets must be an integer array \[n, 2\], got None$"),
    "offsets str": (lambda e: _offsets("0,1", e), r"student offsets must be an integer array \[n, 2\], got str$"),
    "offsets float": (lambda e: _offsets(OK.astype(np.float64), e), r"student offsets must be integers, got float64$"),
    "offsets bool": (lambda e: _offsets(OK.astype(bool), e), r"student offsets must be integers, got bool$"),
    "offsets 1-D": (lambda e: _offsets(np.array([0, 1]), e), r"must have shape \[n, 2\], got \(2,\)$"),
    "offsets 3-D": (lambda e: _offsets(OK[None], e), r"must have shape \[n, 2\], got \(1, 2, 2\)$"),
    "offsets past 2^31": (lambda e: _offsets(np.array([[0, 2**31]], np.int64), e),
                          r"must fit in int32 \(texts under 2\^31 characters\), got 2147483648$"),
    "offsets uint32 past 2^31": (lambda e: _offsets(np.array([[0, 2**31 + 5]], np.uint32), e),
                                 r"must fit in int32 .*got 2147483653$"),
    "offsets negative": (lambda e: _offsets(np.array([[-1, 2]]), e),
                         r"student offsets row 0 is not a span: \[-1, 2\]$"),
    "offsets empty": (lambda e: _offsets(np.zeros((0, 2), np.int64), e), r"student offsets are empty$"),
    "teacher offsets float": (lambda e: align.align_offsets(OK, [[0.0, 1.0]], use_ext=e),
                              r"^sequence 0: teacher offsets must be integers, got float64$"),
    "batch None": (lambda e: align.align_offsets_batch(None, [OK], use_ext=e),
                   r"^student_offsets must be a list of int arrays \[n, 2\], got NoneType$"),
    "batch bad entry": (lambda e: align.align_offsets_batch([OK, OK], [OK, "x"], use_ext=e),
                        r"^sequence 1: teacher offsets must be an integer array"),
    "mined None": (lambda e: align.align_mined(None, ["a"], use_ext=e),
                   r"^sequence 0: student tokens must be a list of str \(one per token\), got None$"),
    "mined str": (lambda e: align.align_mined("hello", ["he", "llo"], use_ext=e),
                  r"student tokens must be a list of str \(one per token\), got str$"),
    "mined int token": (lambda e: align.align_mined(["a"], ["a", 5], seq_index=3, use_ext=e),
                        r"^sequence 3: teacher token 1 is not a str \(int\)$"),
    "mined lone surrogate": (lambda e: align.align_mined(["ok", "a\ud800"], ["a"], use_ext=e),
                             r"student token 1 holds a lone surrogate \('a\\ud800'\): not valid Unicode$"),
    "mined empty": (lambda e: align.align_mined([], ["a"], seq_index=3, use_ext=e),
                    r"^sequence 3: student tokens are empty$"),
    "mined band": (lambda e: align.align_mined(["a"], ["a"], band=-1, use_ext=e),
                   r"^band must be a non-negative int or None, got -1$"),
    "mined band float": (lambda e: align.align_mined(["a"], ["a"], band=2.5, use_ext=e),
                         r"^band must be a non-negative int or None, got 2.5$"),
}


def _message(call, ext):
    with pytest.raises(ValueError) as info:
        call(ext)
    return str(info.value)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_same_named_error_from_both(name):
    call, pattern = CASES[name]
    msgs = [_message(call, False)]
    if align.HAVE_EXT:
        msgs.append(_message(call, True))
    for m in msgs:
        assert __import__("re").search(pattern, m), m
    assert len(set(msgs)) == 1, msgs


@pytest.fixture(scope="module")
def smol():
    return helpers.load("smollm2")


@pytest.mark.parametrize("ids, pattern", [
    (None, r"^ids must be an integer array \[n\], got None$"),
    ("hello", r"^ids must be an integer array \[n\], got str$"),
    (np.array([1.5, 2.0]), r"^ids must be integers, got float64$"),
    (np.array([[1, 2]]), r"^ids must be one-dimensional \[n\], got shape \(1, 2\)$"),
    ([1, 10**9], r"^token id 1000000000 is outside the vocabulary of size 49152$"),
])
def test_token_strings_bad_ids(smol, ids, pattern):
    with pytest.raises(ValueError, match=pattern):
        align.token_strings(smol, ids)
    assert align.token_strings(smol, []) == []  # an empty list is fine (numpy makes it float64)


@pytest.mark.parametrize("kw, pattern", [
    (dict(student_size=-1), r"^student_size must be a positive int or None, got -1$"),
    (dict(student_size=2.5), r"^student_size must be a positive int or None, got 2.5$"),
    (dict(teacher_size=0), r"^teacher_size must be a positive int or None, got 0$"),
    (dict(max_distance_ratio=float("nan")), r"^max_distance_ratio must be a finite number >= 0, got nan$"),
    (dict(max_distance_ratio=-0.5), r"^max_distance_ratio must be a finite number >= 0, got -0.5$"),
    (dict(max_distance_ratio="0.3"), r"^max_distance_ratio must be a finite number >= 0, got '0.3'$"),
])
def test_build_vocab_map_bad_arguments(smol, kw, pattern):
    for ext in ([False, True] if align.HAVE_EXT else [False]):
        with pytest.raises(ValueError, match=pattern):
            align.build_vocab_map(smol, smol, method="exact+mined", cache_dir=False, use_ext=ext, **kw)


def test_build_vocab_map_not_a_tokenizer(smol):
    with pytest.raises(ValueError, match=r"^teacher_tok must be a Hugging Face tokenizer, got NoneType$"):
        align.build_vocab_map(None, smol, cache_dir=False)
    with pytest.raises(ValueError, match=r"^student_tok must be a Hugging Face tokenizer, got str$"):
        align.build_vocab_map(smol, "smollm2", cache_dir=False)


def test_coalign_counts_bad_arguments():
    with pytest.raises(ValueError, match=r"^sequence 0: teacher ids must be integers, got float64$"):
        align.coalign_counts([np.array([1.5])], [np.array([1])], [np.array([0])])
    with pytest.raises(ValueError,
                       match=r"^alignments must be a list of int arrays \(one per sequence\), got NoneType$"):
        align.coalign_counts([np.array([1])], [np.array([1])], None)
    with pytest.raises(ValueError, match=r"^lists differ in length"):
        align.coalign_counts([np.array([1])], [], [])
