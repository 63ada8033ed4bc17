"""trainer/evaluate.py: greedy samples in left-padded batches are the one-at-a-time answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_the_nll_of_each_part_of_an_answer_adds_up_to_the_whole(tmp_path):
    """Diagnostics (issue #26): first word, content, final punctuation and end of turn, with the real SmolLM2
    and Gemma-3 tokenizers; the parts' NLL sums to the answer's."""
    import numpy as np

    import helpers
    from profuser.engine.text.chat import encode_example
    from profuser.engine.trainer.evaluate import PARTS, nll_rows, position_parts

    response = "An elongated fish with a small head, e.g. the eel."
    for name in ("smollm2", "gemma3"):
        tok = helpers.tokenizer(name)
        x = encode_example(tok, "Define the noun 'eel'.", response)
        parts = position_parts(response, x.pred_offsets)
        assert parts[-1] == PARTS.index("end_of_turn") and (parts == PARTS.index("end_of_turn")).sum() == 1
        assert parts[0] == PARTS.index("first_word") and parts[-2] == PARTS.index("final_punct")
        assert response[slice(*x.pred_offsets[-2])].endswith(".")
        words = {response[slice(*x.pred_offsets[r])].strip() for r in np.nonzero(parts == 0)[0]}
        assert words == {"An"}, (name, words)
        assert (parts == PARTS.index("content")).sum() >= 8
    assert (position_parts("Dog", [[0, 3], [3, 3]]) == [0, 3]).all()  # no punctuation: no final_punct part

    rows = [json.loads(x) for x in CORPUS.read_text().splitlines()[-5:]]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_model_dir("smollm2-135m-instruct", out_dir=tmp_path / "m")
    lm, tok = load_model(model).eval(), load_tokenizer(model)
    with torch.no_grad():
        got = nll_rows(lm, tok, load_eval_examples(tmp_path / "h.jsonl", None), max_length=None, batch_size=2,
                       device=torch.device("cpu"), parts=True)
    for nll, _, _, by in got:
        assert len(by) == len(PARTS) and all(v > 0 for v in by) and sum(by) == pytest.approx(nll, rel=1e-9)


def test_held_out_conversations_are_scored_in_their_context(tmp_path):
    """A prepared multi-turn set as eval data: each row's NLL is that of its turn after the earlier ones (the
    full forward of the conversation), not of the turn alone; a malformed history is named."""
    import numpy as np

    from profuser.engine.passes import prepare as P
    from profuser.engine.text.chat import encode_example
    from profuser.engine.trainer.evaluate import nll_rows

    msgs = [{"role": "user", "content": "Define 'eel'."}, {"role": "assistant", "content": "A long fish."},
            {"role": "user", "content": "And 'emu'?"}, {"role": "assistant", "content": "A big bird."}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    P.prepare(P.PrepareConfig(inputs=[str(tmp_path / "c.jsonl")], data_dir=str(tmp_path / "d")), log=lambda s: None)
    ex = load_eval_examples(tmp_path / "d" / "prepared")
    assert [len(e["history"] or []) for e in ex] == [0, 2]
    model = tiny_model_dir("smollm2-135m-instruct", out_dir=tmp_path / "m")
    lm, tok = load_model(model).eval(), load_tokenizer(model)
    cpu = torch.device("cpu")
    with torch.no_grad():
        got = nll_rows(lm, tok, ex, max_length=None, batch_size=2, device=cpu)
        alone = nll_rows(lm, tok, [{**ex[1], "history": None}], max_length=None, batch_size=1, device=cpu)
        enc = encode_example(tok, "And 'emu'?", "A big bird.", history=msgs[:2])
        lp = torch.log_softmax(lm(torch.from_numpy(enc.input_ids[None].astype(np.int64))).logits[0].float(), -1)
    assert got[1][0] == pytest.approx(-lp[enc.pred_pos, enc.pred_ids].double().sum().item(), rel=1e-4)
    assert got[1][1:] == alone[0][1:] and got[1][0] != pytest.approx(alone[0][0], rel=1e-6)
    # a JSONL of chat records gives the same rows (one per assistant turn, in context) as its prepared set
    from_jsonl = load_eval_examples(tmp_path / "c.jsonl")
    assert [(e["prompt"], e["response"], e["history"]) for e in from_jsonl] == \
        [(e["prompt"], e["response"], e["history"]) for e in ex]
    assert [e["example_id"] for e in from_jsonl] == ["0#1", "0#2"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a", "response": "b", "history": [msgs[1]]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: row 0: field 'history': history turn 0: expected a user"):
        load_eval_examples(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text(json.dumps({"messages": msgs[:3]}) + "\n")
    with pytest.raises(ValueError, match=r"bad2.jsonl: row 0: field 'messages': messages must end with a user"):
        load_eval_examples(tmp_path / "bad2.jsonl")
