"""log.report_to: metrics rows reach TensorBoard, W&B (offline mode: its run files) and MLflow (a file store) through
each library's own API, read back through that library; a resumed run continues the same tracker run; a bad
tracker name or the old `log.tensorboard` key is one line naming the key."""

from __future__ import annotations

import json

import pytest

from profuser.engine.config import ConfigError, load_config
from profuser.engine.trainer.metrics_log import MetricsLogger

ROWS = [{"step": 1, "kind": "train", "loss": 2.5, "lr": 1e-4, "mode": "x"},
        {"step": 2, "kind": "train", "loss": 2.0, "lr": 1e-4},
        {"step": 2, "kind": "eval", "bits_per_byte": 1.25}]
CONFIG = {"optim": {"lr": 1e-4, "max_steps": 4}, "model": {"student": "tiny"}}


def logged(out, report_to, rows, start_step=0):
    log = MetricsLogger(out, rank=0, total_steps=4, start_step=start_step, report_to=report_to, config=CONFIG,
                        project="fusion-tests", run_name="run-a", progress=False)
    for r in rows:
        log.log(dict(r))
    log.close()


def test_mlflow_and_tensorboard_get_every_row_and_a_resumed_run_continues(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # a file store: no server
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    logged(out, ["tensorboard", "mlflow"], ROWS[:2])
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    logged(out, ["tensorboard", "mlflow"], ROWS[2:], start_step=2)  # resumed after step 2
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == run_id

    client = MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 2.5), (2, 2.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/bits_per_byte")] == [(2, 1.25)]
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.0001" and run.info.run_name == "run-a"
    assert mlflow.get_experiment(run.info.experiment_id).name == "fusion-tests"

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/bits_per_byte")] == [(2, 1.25)]


def wandb_history(run_file):
    """(step, {key: value}) of every history record of an offline W&B run file: W&B's record log (a 7-byte
    file header, then LevelDB-style 32 KiB blocks of records with 7-byte headers: crc, length, type) of
    wandb_internal_pb2.Record messages, read with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-padded tail
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                out.append((rec.history.step.num, items))
    return out


def test_wandb_offline_writes_its_run_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    logged(out, ["wandb"], ROWS[:2])
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    (first,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history = wandb_history(first)
    assert [(step, h["train/loss"]) for step, h in history if "train/loss" in h] == [(1, 2.5), (2, 2.0)]
    logged(out, ["wandb"], ROWS[2:], start_step=2)
    assert json.loads((out / "trackers.json").read_text())["wandb"] == run_id
    # the same run id, continued (`wandb sync` uploads every file of it into one run)
    resumed = [h for f in (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
               for _, h in wandb_history(f)]
    assert any(h.get("eval/bits_per_byte") == 1.25 for h in resumed)


def test_bad_tracker_names_and_the_old_key_are_named():
    with pytest.raises(ConfigError, match=r"log.report_to: 'tensorbord' is not one of tensorboard, wandb, mlflow"):
        load_config("demo", ["log.report_to=[tensorbord]"])
    with pytest.raises(ConfigError, match=r"log.tensorboard: renamed to log.report_to"):
        load_config("demo", ["log.tensorboard=false"])
    assert load_config("demo", ["log.report_to=[]"]).log.report_to == []
