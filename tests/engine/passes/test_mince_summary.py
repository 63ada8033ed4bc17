"""One MinCE rule: `profuser score`'s training-mode summary reports exactly the winners the loader trains on,
ties included (the student's own source first, then config order), with real tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

import helpers
from profuser.engine.passes import score as S
from profuser.engine.tools import synthetic as fx

STUDENT = "smollm2-135m-instruct"
SOURCES = ["twin", "self", "gpt2"]  # twin: the student's records under another model name (exact NLL ties)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mince")
    smol, gpt2 = helpers.tokenizer("smollm2"), helpers.tokenizer("gpt2")
    ex = fx.corpus(24, system_every=5)
    pm = fx.write_prepared(root, ex, 8)
    fx.write_teacher(root, "twin", "train", smol, "twin-model", ex, pm, k=4, seed=7)
    fx.write_teacher(root, "self", "train", smol, STUDENT, ex, pm, k=4, seed=7)
    fx.write_teacher(root, "gpt2", "train", gpt2, "gpt2-model", ex, pm, k=4, seed=8)
    return root, smol


def loader_shares(root, tok, metric: str) -> dict:
    ld = helpers.fusion_loader(root, tok, sources=SOURCES, student=STUDENT, k=4, ce_metric=metric, shuffle_buffer=1,
                          micro_batch_size=5)
    wins = np.zeros(len(SOURCES))
    for batch in ld:
        w = batch["teacher_weights"].sum(2).numpy()  # [T, B]: one-hot per example (over its aligned tokens)
        wins += np.bincount(w.argmax(0)[w.sum(0) > 0], minlength=len(SOURCES))
    return dict(zip(SOURCES, (wins / wins.sum()).tolist()))


@pytest.mark.parametrize("metric", ["per_byte", "per_token"])
def test_summary_share_is_the_loader_share(data, metric):
    root, tok = data
    summary = S.mince_share(root, SOURCES, student=STUDENT)[metric]
    assert summary == pytest.approx(loader_shares(root, tok, metric), abs=1e-12)
    assert summary["twin"] == 0.0 and summary["self"] > 0  # every tie went to the student's own source
    # without knowing the student, the same ties go to config order: the summary says which rule it used
    assert S.mince_share(root, SOURCES)[metric]["self"] == 0.0
