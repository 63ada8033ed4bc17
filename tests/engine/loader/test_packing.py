"""Sequence packing (issue #25): rows of whole examples, positions restarting per example, attention kept
inside each example by the masks transformers builds from position_ids (the pinned version), the same
targets, logits and gradients as the padded batch."""

from __future__ import annotations

import pytest
import torch

import helpers as rt
from profuser.engine.loader.collate import IGNORE_INDEX, collate
from profuser.engine.loader.packing import collate_packed, first_fit, layout
from profuser.engine.models import load_model, tiny_model_dir
from profuser.engine.tools import synthetic as fx

STUDENT = "smollm2-135m-instruct"


def test_first_fit_keeps_whole_examples_in_order():
    assert first_fit([5, 3, 4, 2, 9, 1], 8) == [[0, 1], [2, 3, 5], [4]]  # 9 > 8: a row of its own
    assert first_fit([], 8) == []
    rows = first_fit([3] * 7, 10)
    assert rows == [[0, 1, 2], [3, 4, 5], [6]]


def test_layout_never_lays_out_more_positions_than_padding():
    """Rows of row_tokens, or of the longest example when that is fewer positions: never more than the padded
    batch (n rows of the longest), and fuller rows where they pay."""
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n, m = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        lengths = torch.randint(1, 130, (n,), generator=g).tolist()
        rows = layout(lengths, 128, m)
        width = -(-max(sum(lengths[i] for i in r) for r in rows) // m) * m
        assert sorted(i for r in rows for i in r) == list(range(n))
        assert len(rows) * width <= n * (-(-max(lengths) // m) * m), lengths
    # rows of 128: [40 40 30 | 70] = 2 x 110 = 220 positions; rows of the longest (70): [40 30 | 40 | 70] =
    # 3 x 70 = 210; padded: 4 x 70 = 280
    assert layout([40, 40, 70, 30], 128) == [[0, 3], [1], [2]]
    assert layout([60, 60, 61, 30], 128) == [[0, 1], [2, 3]]  # 2 x 120 = 240 < 4 x 61 = 244
    assert layout([20] * 12, 128) == first_fit([20] * 12, 128)  # a budget's many short examples: full rows


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """One processed shard of 12 examples of very unequal length (the corpus' tricky responses included)."""
    root = tmp_path_factory.mktemp("pack")
    tok = rt.tokenizer("smollm2")
    ex = fx.corpus(12, extra_every=3)
    pm = fx.write_prepared(root, ex, 12)
    fx.write_teacher(root, "self", "train", tok, STUDENT, ex, pm, k=4, seed=1)
    ld = rt.fusion_loader(root, tok, sources=["self"], student=STUDENT, k=4, shuffle_buffer=1)
    sh = ld._process(0)
    return tok, sh, [(sh, i) for i in range(len(sh.example_ids))]


def per_example(batch: dict) -> dict:
    """{example id: (input ids, labels, teacher ids, logprobs, weights)} of the example's own positions."""
    out = {}
    packed = batch.get("packed", False)
    at: dict = {}
    for j, eid in enumerate(batch["example_ids"]):
        b = int(batch["example_row"][j]) if packed else j
        start = at.get(b, 0)
        if packed:  # the example's tokens: from `start` to where its positions restart
            pos = batch["position_ids"][b]
            n = int(torch.nonzero(pos[start + 1:] == 0)[0, 0]) + 1 if (pos[start + 1:] == 0).any() else \
                pos.numel() - start
            n = min(n, int(batch["attention_mask"][b, start:].sum()))
        else:
            n = int(batch["attention_mask"][b].sum())
        sl = slice(start, start + n)
        out[eid] = (batch["input_ids"][b, sl], batch["labels"][b, sl], batch["teacher_ids"][:, b, sl],
                    batch["teacher_logprobs"][:, b, sl], batch["teacher_weights"][:, b, sl], (b, start, n))
        at[b] = start + n
    return out


def test_packed_rows_hold_the_same_examples_and_targets(shard):
    tok, sh, items = shard
    padded = collate(items, n_teachers=1, k=4, pad_id=0)
    packed = collate_packed(items, n_teachers=1, k=4, pad_id=0, row_tokens=256)
    assert packed["n_tokens"] == padded["n_tokens"]
    assert sorted(packed["example_ids"]) == sorted(padded["example_ids"])
    pad_frac = lambda b: 1 - b["attention_mask"].sum().item() / b["attention_mask"].numel()  # noqa: E731
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0] and pad_frac(packed) < pad_frac(padded)
    a, b = per_example(padded), per_example(packed)
    for eid in a:
        for x, y in zip(a[eid][:5], b[eid][:5]):
            assert torch.equal(x, y), eid
        _, start, n = b[eid][5]
        assert b[eid][5] and torch.equal(packed["position_ids"][b[eid][5][0], start:start + n], torch.arange(n))
    assert (packed["labels"][packed["attention_mask"] == 0] == IGNORE_INDEX).all()


def models():
    yield "tiny", lambda tmp: load_model(tiny_model_dir(STUDENT, hidden=64, layers=2, heads=4, out_dir=tmp / "m"))
    yield "smollm2-135m", lambda tmp: load_model(rt.need(STUDENT))


@pytest.mark.parametrize("name,make", list(models()), ids=[n for n, _ in models()])
def test_packed_forward_equals_padded_and_never_crosses_examples(shard, tmp_path, name, make):
    tok, sh, items = shard
    lm = make(tmp_path).float().eval()
    padded = collate(items, n_teachers=1, k=4, pad_id=0)
    packed = collate_packed(items, n_teachers=1, k=4, pad_id=0, row_tokens=192)

    def logits(batch, ids=None):
        kw = {"position_ids": batch["position_ids"]} if batch.get("packed") else {}
        with torch.no_grad():  # no attention mask: packed rows get the block-diagonal mask from position_ids
            return lm(input_ids=batch["input_ids"] if ids is None else ids, use_cache=False, **kw).logits

    lp, lk = logits(padded), logits(packed)
    a, b = per_example(padded), per_example(packed)
    for j, eid in enumerate(padded["example_ids"]):
        n = a[eid][5][2]
        row, start, _ = b[eid][5]
        torch.testing.assert_close(lk[row, start:start + n], lp[j, :n], rtol=1e-4, atol=1e-4)
    # an edited example leaves every other example of its row unchanged
    row0 = [eid for eid in packed["example_ids"] if b[eid][5][0] == 0]
    assert len(row0) >= 2
    victim = b[row0[0]][5]
    ids = packed["input_ids"].clone()
    ids[0, victim[1]:victim[1] + victim[2]] = torch.randint(10, 1000, (victim[2],))
    edited = logits(packed, ids)
    assert not torch.allclose(edited[0, victim[1]:victim[1] + victim[2]], lk[0, victim[1]:victim[1] + victim[2]])
    for eid in row0[1:]:
        _, start, n = b[eid][5]
        torch.testing.assert_close(edited[0, start:start + n], lk[0, start:start + n], rtol=0, atol=1e-5)


def test_packed_gradients_equal_padded(shard, tmp_path):
    tok, sh, items = shard
    lm = load_model(tiny_model_dir(STUDENT, hidden=64, layers=2, heads=4, out_dir=tmp_path / "m")).float()

    def grads(batch):
        lm.zero_grad()
        kw = {"position_ids": batch["position_ids"]} if batch.get("packed") else {}
        logits = lm(input_ids=batch["input_ids"], use_cache=False, **kw).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), batch["labels"].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in lm.named_parameters()}

    l1, g1 = grads(collate(items, n_teachers=1, k=4, pad_id=0))
    l2, g2 = grads(collate_packed(items, n_teachers=1, k=4, pad_id=0, row_tokens=192))
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_loader_packs_under_a_token_budget_and_resumes_the_same_rows(tmp_path):
    """FusionLoader with data.packing and data.micro_batch_tokens: every batch within the budget (an example
    alone may exceed it), every example once per epoch, and a loader resumed from state_dict yields the very
    same packed rows."""
    tok = rt.tokenizer("smollm2")
    ex = fx.corpus(40, extra_every=3)
    pm = fx.write_prepared(tmp_path, ex, 16)
    fx.write_teacher(tmp_path, "self", "train", tok, STUDENT, ex, pm, k=4, seed=1)

    def make():
        return rt.fusion_loader(tmp_path, tok, sources=["self"], student=STUDENT, k=4, shuffle_buffer=8,
                                max_length=96, packing=True, micro_batch_tokens=200, max_tokens_per_row=100)

    ld = make()
    batches = list(ld)
    assert all(b["packed"] and b["input_ids"].shape[1] <= 104 for b in batches)  # rows of <= 100, padded to 8
    for b in batches:
        n = int(b["attention_mask"].sum())
        assert n <= 200 or len(b["example_ids"]) == 1
    assert sorted(e for b in batches for e in b["example_ids"]) == sorted(e["example_id"] for e in ex)
    assert max(len(b["example_ids"]) for b in batches) > 2  # the budget holds more than a few examples

    a = make()
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    rest_a, rest_b = list(it), list(b)
    assert [x["example_ids"] for x in rest_a] == [x["example_ids"] for x in rest_b] != []
    for x, y in zip(rest_a, rest_b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["position_ids"], y["position_ids"])
    assert [x["example_ids"] for x in first + rest_a] == [x["example_ids"] for x in batches]


def test_merged_modes_carry_the_varlen_bounds_of_the_merged_rows(shard):
    """merge_modes (one forward for both modes) pads packed rows to the longest and recomputes the bounds:
    every example is one sequence of its own length, each appended pad token one of length 1."""
    from collections import Counter

    from profuser.engine.loader.packing import varlen_bounds
    from profuser.engine.trainer.step import merge_modes

    tok, sh, items = shard
    a = collate_packed(items[:5], n_teachers=1, k=4, pad_id=0, row_tokens=192)
    b = collate_packed(items[5:], n_teachers=1, k=4, pad_id=0, row_tokens=192)
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]  # one of them gets padded
    m = merge_modes([a, b], pad_id=0)
    cu, longest = varlen_bounds(m["position_ids"])
    assert torch.equal(m["cu_seq_lens"], cu) and m["max_seq_len"] == longest
    lengths = (cu[1:] - cu[:-1]).tolist()
    real = [int(sh.enc.ids_off[i + 1] - sh.enc.ids_off[i]) for _, i in items]
    pads = Counter(lengths) - Counter(real)  # what is left: the rows' padding, every example being a sequence
    assert not Counter(real) - Counter(lengths)
    assert sum(n * c for n, c in pads.items()) == int((m["attention_mask"] == 0).sum())
    assert sum(lengths) == m["input_ids"].numel()
