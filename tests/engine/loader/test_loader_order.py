"""profuser.engine.data: deterministic order, exact mid-epoch resume, sharding across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers as rt
from profuser.engine.loader.loader import buffer_shuffle
from profuser.engine.tools import synthetic as fx

SOURCES = ["smollm2", "gpt2"]
N, SHARD = 45, 8  # 6 shards, the last one partial


@pytest.fixture(scope="module")
def toks():
    return {"smollm2": rt.load("smollm2"), "gpt2": rt.load("gpt2")}


@pytest.fixture(scope="module")
def data(tmp_path_factory, toks):
    root = tmp_path_factory.mktemp("order")
    ex = fx.corpus(N)
    pm = fx.write_prepared(root, ex, SHARD)
    fx.write_teacher(root, "smollm2", "train", toks["smollm2"], "smollm2-135m-instruct", ex, pm, seed=1)
    fx.write_teacher(root, "gpt2", "train", toks["gpt2"], "gpt2-local", ex, pm, seed=2)
    return root, [e["example_id"] for e in ex]


def make(root, toks, rank=0, world=1, **kw):
    kw.setdefault("micro_batch_size", 4)
    kw.setdefault("shuffle_buffer", 10)
    return rt.fusion_loader(root, toks["smollm2"], sources=SOURCES, student="smollm2-135m-instruct", rank=rank,
                            world_size=world, teacher_tokenizers={"gpt2": toks["gpt2"]}, **kw)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def ids(batches):
    return [e for b in batches for e in b["example_ids"]]


def test_epoch_once_each_deterministic_and_reshuffled(data, toks):
    root, all_ids = data
    a = make(root, toks)
    e0 = list(a)
    e1 = list(a)
    assert sorted(ids(e0)) == sorted(all_ids) and len(ids(e0)) == N
    assert sorted(ids(e1)) == sorted(all_ids)
    assert ids(e0) != ids(e1) and ids(e0) != all_ids  # shuffled, and differently per epoch
    b = make(root, toks)
    assert all(same(x, y) for x, y in zip(e0, list(b)))
    c = make(root, toks, seed=1)
    assert ids(list(c)) != ids(e0)
    assert len(a) == len(e0) == 12
    assert a.epoch == 2


def test_no_shuffle_keeps_prepared_order(data, toks):
    root, all_ids = data
    assert ids(list(make(root, toks, shuffle_buffer=1))) == all_ids


@pytest.mark.parametrize("stop_after", [1, 5, 11, 12, 15])
def test_resume_mid_epoch_gives_the_same_batches(data, toks, stop_after):
    root, _ = data
    ref_loader = make(root, toks)
    ref = list(ref_loader) + list(ref_loader)  # two epochs: 24 batches
    a = make(root, toks)
    got, it = [], iter(a)
    for _ in range(stop_after):
        try:
            got.append(next(it))
        except StopIteration:  # crossed the epoch end: continue with the next epoch
            it = iter(a)
            got.append(next(it))
    sd = a.state_dict()
    b = make(root, toks)  # a fresh process
    b.load_state_dict(sd)
    rest = list(b)
    if b.epoch == 1 and sd["epoch"] == 0:
        rest += list(b)
    full = got + rest
    assert len(full) == len(ref)  # nothing lost or repeated across the resume
    for x, y in zip(full, ref):
        assert same(x, y)


def test_resume_rejects_another_setup(data, toks):
    root, _ = data
    sd = make(root, toks).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        make(root, toks, rank=0, world=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed"):
        make(root, toks, seed=5).load_state_dict(sd)


@pytest.mark.parametrize("world", [2, 3, 4, 8])  # 6 shards: shard-level for 2 and 3, row-level for 4, 8
def test_ranks_cover_every_example_exactly_once(data, toks, world):
    root, all_ids = data
    per_rank = [ids(list(make(root, toks, rank=r, world=world))) for r in range(world)]
    flat = [e for r in per_rank for e in r]
    assert sorted(flat) == sorted(all_ids) and len(flat) == N
    if 6 % world == 0:  # shard-level: rank r holds whole shards j % world == r
        for r, got in enumerate(per_rank):
            shards = {all_ids.index(e) // SHARD for e in got}
            assert shards == {j for j in range(6) if j % world == r}
    else:  # row-level: global row k goes to rank k % world
        for r, got in enumerate(per_rank):
            assert {all_ids.index(e) % world for e in got} == {r}
    with pytest.raises(ValueError, match="rank"):
        make(root, toks, rank=world, world=world)


def test_drop_last_and_padding(data, toks):
    root, _ = data
    full = list(make(root, toks, micro_batch_size=7, pad_to_multiple_of=16))
    assert [len(b["example_ids"]) for b in full] == [7] * 6 + [3]
    assert all(b["input_ids"].shape[1] % 16 == 0 for b in full)
    dropped = list(make(root, toks, micro_batch_size=7, drop_last=True))
    assert [len(b["example_ids"]) for b in dropped] == [7] * 6


def test_buffer_shuffle_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    p = buffer_shuffle(1000, 50, rng)
    assert sorted(p.tolist()) == list(range(1000))
    # an item is emitted at most `size` places before its arrival
    assert (p - np.arange(1000) <= 50).all()
    assert (buffer_shuffle(10, 1, rng) == np.arange(10)).all()


def test_smaller_k_takes_the_first_entries(data, toks):
    root, _ = data
    full, small = list(make(root, toks)), list(make(root, toks, k=3))
    assert full[0]["teacher_ids"].shape[-1] == 8 and small[0]["teacher_ids"].shape[-1] == 3
    for a, b in zip(full, small):
        assert torch.equal(a["teacher_ids"][..., :3], b["teacher_ids"])
        assert torch.equal(a["teacher_logprobs"][..., :3], b["teacher_logprobs"])
        assert torch.equal(a["teacher_weights"], b["teacher_weights"])


def test_buffer_and_batch_larger_than_the_data(data, toks):
    root, all_ids = data
    got = list(make(root, toks, shuffle_buffer=10_000, micro_batch_size=1000))
    assert len(got) == 1 and sorted(got[0]["example_ids"]) == sorted(all_ids)
