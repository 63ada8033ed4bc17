"""trainer/evaluate.py: greedy samples in left-padded batches are the one-at-a-time answers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from profuser.engine.models import load_model, load_tokenizer, tiny_model_dir
from profuser.engine.trainer.evaluate import generate_samples, load_eval_examples

CORPUS = Path(__file__).resolve().parents[3] / "data" / "wordnet_instruct.jsonl"


def test_batched_greedy_answers_equal_one_at_a_time(tmp_path):
    rows = [json.loads(x) for x in CORPUS.read_text().splitlines()[-6:]]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_eval_examples(tmp_path / "h.jsonl", None)
    model = tiny_model_dir("smollm2-135m-instruct", out_dir=tmp_path / "m")
    lm, tok = load_model(model).eval(), load_tokenizer(model)
    with torch.no_grad():  # a tiny random model repeats its last input token ("\n"): sharpen its layers
        for p in lm.model.layers.parameters():
            p.mul_(8)
    cpu = torch.device("cpu")
    one = generate_samples(lm, tok, examples, max_new_tokens=12, device=cpu)
    batched = generate_samples(lm, tok, examples, max_new_tokens=12, device=cpu, batch_size=4)
    lengths = {len(tok(e["prompt"])["input_ids"]) for e in examples}
    assert len(lengths) > 1  # prompts of different lengths: the batches are padded
    assert [s["generated"] for s in batched] == [s["generated"] for s in one]
    assert [s["example_id"] for s in batched] == [e["example_id"] for e in examples]
    assert all(len(s["generated"]) > 10 for s in one) and len({s["generated"] for s in one}) > 1
