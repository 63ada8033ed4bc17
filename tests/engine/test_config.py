"""Config: defaults <- YAML <- key=value overrides; unknown keys and wrong types name the key."""

import json
from pathlib import Path

import pytest

from profuser.engine.config import ConfigError, TrainConfig, dump_yaml, from_dict, load_config


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_valid_and_roundtrip():
    cfg = load_config()
    assert cfg.schedule.kind == "two_stage" and cfg.schedule.switch_fraction == 0.5
    assert cfg.loss.lam == 0.9 and cfg.deepspeed["zero_optimization"]["stage"] == 3
    # the saved YAML reloads to an equal config
    import yaml

    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 1.0e-4\n  max_steps: 7\nschedule:\n  kind: simul\n")
    cfg = load_config(p, ["optim.lr=3e-5", "data.sources=[a, b, c]", "loss.softcap=30",
                          "deepspeed.zero_optimization.stage=2", "eval.data=null"])
    assert cfg.optim.lr == 3e-5 and cfg.optim.max_steps == 7 and cfg.schedule.kind == "simul"
    assert cfg.data.sources == ["a", "b", "c"]
    assert cfg.loss.softcap == 30.0 and isinstance(cfg.loss.softcap, float)  # int accepted for a float
    assert cfg.deepspeed["zero_optimization"]["stage"] == 2
    assert cfg.eval.data is None


@pytest.mark.parametrize("text, key", [
    ("optim:\n  lrr: 1\n", "optim.lrr"),
    ("bogus: 1\n", "bogus"),
    ("optim:\n  max_steps: ten\n", "optim.max_steps"),
    ("optim:\n  max_steps: 1.5\n", "optim.max_steps"),
    ("model:\n  activation_checkpointing: 1\n", "model.activation_checkpointing"),
    ("data:\n  sources: abc\n", "data.sources"),
    ("data:\n  sources: [1, 2]\n", "data.sources[0]"),
    ("optim: 3\n", "optim"),
])
def test_yaml_errors_name_key_and_file(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("nothing.here=1", "nothing"),
    ("optim.grad_accum=two", "optim.grad_accum"),
    ("schedule.kind=zigzag", "schedule.kind"),
    ("optim.max_steps=0", "optim.max_steps"),
    ("loss.lam=1.5", "loss.lam"),
    ("schedule.stage2=[1]", "schedule.stage2"),
    ("deepspeed.zero_optimization.stage=4", "deepspeed.zero_optimization.stage"),
    ("optim.lr", "optim.lr"),
    ("data.vocab_map=mined", "data.vocab_map"),
])
def test_override_errors_name_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_deepspeed_json_beside_yaml(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "wall_clock_breakdown": False}))
    cfg = load_config(write(tmp_path, "deepspeed: ds.json\n"))
    assert cfg.deepspeed == {"zero_optimization": {"stage": 1}, "wall_clock_breakdown": False}
    with pytest.raises(ConfigError, match="missing.json"):
        load_config(write(tmp_path, "deepspeed: missing.json\n", "b.yaml"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [\n"))


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    # every shipped YAML is a training config except the study files (tests/engine/tools/test_study.py loads them)
    for p in sorted(set(root.glob("*.yaml")) - set(root.glob("study*.yaml"))):
        assert isinstance(load_config(p), TrainConfig), p


def test_choice_lists_have_one_home():
    """config.py owns the engine's choice lists; the loader, the passes and the kernels use the same tuples."""
    import torch

    from profuser.engine import config
    from profuser.engine.loader import advantage
    from profuser.engine.models import resolve_dtype
    from profuser.engine.passes.options import PassConfig
    from profuser.kernels import params

    assert advantage.ADVANTAGES is config.ADVANTAGES and advantage.CE_METRICS is config.CE_METRICS
    assert config._CHOICES["loss.backend"] is params.BACKENDS
    assert config._CHOICES["loss.missing_mass"] is params.MISSING_MASS_MODES
    for key, bad in (("advantage", "maxCE"), ("align_method", "dtw"), ("bad_row_policy", "skip"),
                     ("vocab_map", "mined")):  # the loader's own check of a DataConfig handed to it directly
        with pytest.raises(ConfigError, match=f"^data.{key}: {bad!r} is not one of"):
            config.check_section(config.DataConfig(**{key: bad}), "data")
    with pytest.raises(ValueError, match="nan_policy"):
        PassConfig(data_dir="x", sources=["a"], nan_policy="skip")
    for name, want in (("float32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert resolve_dtype(name) is want
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype("auto", "cuda") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        resolve_dtype("float64")
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(None, ["model.dtype=float64"])
    assert config.MODES == ("infer", "train") and set(config.MODE_ID) == set(config.MODES)
    # the vocabulary map the loader builds: projection by default, the config's choice passed through
    assert config.DataConfig().vocab_map == config.VOCAB_MAPS[0] == "projection"


def test_a_shipped_config_loads_by_name_from_any_folder(tmp_path, monkeypatch):
    from profuser.engine import config, config_tree

    monkeypatch.chdir(tmp_path)  # no checkout here: `--config demo` is the installed profuser.configs/demo.yaml
    assert {"demo", "study"} <= set(config_tree.shipped_configs())
    cfg = config.load_config("demo", ["optim.max_steps=3"])
    repo_demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    assert cfg.optim.max_steps == 3 and cfg.model.student == config.load_config(repo_demo).model.student
    with pytest.raises(config.ConfigError, match=r"config file nope does not exist, and no shipped config is named"):
        config.load_config("nope")
