"""The Python API (engine/api.py): the pipeline in-process through `import profuser`, with a tiny random model
that has the real SmolLM2 tokenizer: prepare (gold pairs and a prompts-only pool) -> teach -> generate ->
score -> train, and a wrong key named as the commands name it."""

from __future__ import annotations

import json

import pytest

import profuser
from helpers import isolated_process_group
from profuser.engine.config import ConfigError
from profuser.engine.models import tiny_model_dir
from profuser.engine.tools import synthetic as fx


@pytest.fixture(scope="module", autouse=True)
def _isolate_process_group():
    yield from isolated_process_group()


def test_the_pipeline_through_the_python_api(tmp_path):
    rows = fx.corpus(12)
    gold, pool = tmp_path / "gold.jsonl", tmp_path / "pool.jsonl"
    gold.write_text("".join(json.dumps({"id": r["example_id"], "prompt": r["prompt"], "response": r["response"]})
                            + "\n" for r in rows[:8]))
    pool.write_text("".join(json.dumps({"id": r["example_id"], "prompt": r["prompt"]}) + "\n" for r in rows[8:]))
    model = str(tiny_model_dir("smollm2-135m-instruct", out_dir=tmp_path / "tiny"))
    data, infer = str(tmp_path / "data"), str(tmp_path / "infer")

    assert profuser.prepare(data_dir=data, inputs=[str(gold)]).n_examples == 8
    assert profuser.prepare(data_dir=infer, inputs=[str(pool)], prompts_only=True).prompts_only
    taught = profuser.teach(data_dir=data, sources=[model], k=4, progress=False)
    assert taught["tiny"]["shards"] == 1 and taught["tiny"]["tokens"] > 0
    got = profuser.generate(data_dir=infer, sources=[model], k=4, max_new_tokens=4, progress=False)
    assert got["tiny"]["shards"] == 1
    voted = profuser.score(data_dir=infer, sources=["tiny"], scorers=[f"judge:{model}"])
    assert voted["infer_win_share"] == {"tiny": 1.0}
    summary = profuser.train(None, **{"output_dir": str(tmp_path / "run"), "model.student": model,
                                      "data.data_dir": data, "data.infer_data_dir": infer, "data.sources": ["tiny"],
                                      "data.k": 4, "data.micro_batch_size": 2, "optim.max_steps": 2,
                                      "log.progress": False, "log.report_to": [],
                                      "deepspeed.zero_optimization.stage": 0})
    assert summary["exit_code"] == 0 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]

    with pytest.raises(ConfigError, match="argument optim.lrr= sets optim.lrr: unknown key"):
        profuser.train(None, **{"optim.lrr": 1e-4})
    with pytest.raises(ConfigError, match="k: expected an int"):
        profuser.teach(data_dir=data, sources=[model], k="many")
    with pytest.raises(AttributeError, match="no attribute 'tech'"):
        profuser.tech  # noqa: B018
