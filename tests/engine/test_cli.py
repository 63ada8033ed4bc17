"""The `profuser` command line explains itself: --debug and --version anywhere, a description for every
subcommand, help (with its default) for every option, every training key listed, the resolved config shown,
and a missing extra named in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from profuser.engine import cli


def profuser(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "profuser.engine.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_has_a_description_and_every_option_help(name):
    module = cli.import_command(name)
    assert len(cli.description(module)) > 20, name
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    bare = [a.option_strings or a.dest for a in p._actions if not a.help and a.option_strings != ["-h", "--help"]]
    assert not bare, f"profuser {name}: options without help: {bare}"


def test_debug_and_version_before_or_after_the_subcommand(tmp_path):
    # `profuser --debug teach ...` was "unrecognized arguments": the subcommand's options were never added
    before = profuser("--debug", "teach", "--data-dir", str(tmp_path / "none"), "--source", "x")
    after = profuser("teach", "--data-dir", str(tmp_path / "none"), "--source", "x", "--debug")
    for p in (before, after):
        assert p.returncode != 0 and "unrecognized arguments" not in p.stderr and "Traceback" in p.stderr, p.stderr
    plain = profuser("teach", "--data-dir", str(tmp_path / "none"), "--source", "x")
    assert "Traceback" not in plain.stderr and plain.stderr.strip().startswith("profuser teach: error:"), plain.stderr
    for args in (["--version"], ["teach", "--version"], ["train", "--version"]):
        p = profuser(*args)
        assert p.returncode == 0 and p.stdout.strip() == f"profuser {cli.version()}", (args, p.stdout, p.stderr)


def test_help_shows_defaults_and_every_training_key():
    teach = profuser("teach", "--help").stdout
    # one default for the stored top-k and the trained one (teach --k == data.k)
    assert "top-k entries stored per teacher and token (training's data.k default) (default: 10; key: k)" in \
        " ".join(teach.split())
    train = " ".join(profuser("train", "--help").stdout.split())
    from profuser.engine.config import TrainConfig
    from profuser.engine.config_cli import leaves

    keys = [(key, default, doc) for key, _, default, doc in leaves(TrainConfig)]
    assert len(keys) > 50 and all(f"{key} = " in train for key, _, _ in keys)
    assert all(doc for _, _, doc in keys), "a training key without its comment in engine/config.py"
    assert "optim.lr = 2e-05 # peak learning rate (AdamW)" in train


def test_config_show_prints_the_resolved_config(tmp_path):
    import yaml

    p = profuser("config", "show", "--config", "demo", "optim.lr=1e-4", cwd=tmp_path)  # no checkout: shipped
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    assert cfg["optim"]["lr"] == 1e-4 and cfg["model"]["student"] == "gemma3-270m"
    bad = profuser("config", "show", "optim.lr=-1")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "profuser config: error: override optim.lr: must be in (0, inf), got -1.0"


def test_a_missing_extra_is_one_line_naming_it():
    # a loss-library-only install has no pyarrow: the subcommand names the extra instead of a traceback
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "from profuser.engine import cli\n"
            "sys.exit(cli.main(['teach', '--data-dir', 'd', '--source', 'x']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == (
        "profuser teach: error: needs the module 'pyarrow', which this installation lacks: "
        "pip install 'profuser[engine]'"), p.stderr


def test_training_flags_are_its_keys_as_overrides():
    from profuser.engine import train
    from profuser.engine.config import load_config
    from profuser.engine.config_cli import flag_overrides

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    args = p.parse_args(["--config", "demo", "--optim.lr", "3e-5", "--data.sources", "a", "b",
                         "--data.no-student-as-candidate", "seed=4"])
    by_flags = load_config(args.config, flag_overrides(args) + args.overrides)
    by_keys = load_config("demo", ["optim.lr=3e-5", "data.sources=[a, b]", "data.student_as_candidate=false",
                                   "seed=4"])
    assert by_flags == by_keys and by_flags.optim.lr == 3e-5 and by_flags.seed == 4


def test_config_show_resolves_any_command():
    import yaml

    p = profuser("config", "show", "teach", "--data-dir", "d", "--source", "a", "b", "--k", "4", "batch_tokens=64")
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    assert (cfg["data_dir"], cfg["sources"], cfg["k"], cfg["batch_tokens"]) == ("d", ["a", "b"], 4, 64)
    assert cfg["write"]["compression_level"] == 9  # nested sections resolved too
    bad = profuser("config", "show", "generate", "--data-dir", "d", "--source", "a", "max_new_tokens=0")
    assert bad.returncode == 2 and bad.stderr.strip() == "profuser config: error: max_new_tokens must be >= 1, got 0"


def test_one_resolution_path_for_training_and_every_other_command(tmp_path):
    """Training (config.load_config) and a pass (config_cli.config_from_args) resolve through the same
    config_tree.merge + build: the same messages for the same mistakes, flags named as the origin."""
    from profuser.engine import train
    from profuser.engine.config import ConfigError, load_config
    from profuser.engine.config_cli import load, resolved
    from profuser.engine.passes import teach
    from profuser.engine.passes.options import PassConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("data_dir: d\nsources: [a]\nwrite: {no_such_key: 1}\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: write.no_such_key: unknown key \(known: "):
        load(PassConfig, bad)
    bad.write_text("data: {no_such_key: 1}\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: data.no_such_key: unknown key \(known: "):
        load_config(bad)
    bad.write_text("data: {nan_policy: drop}\n")  # a renamed key is an error that names the new one
    with pytest.raises(ConfigError, match=rf"^{bad}: data.nan_policy: renamed to data.bad_row_policy"):
        load_config(bad)
    for add, argv, msg in ((train.add_arguments, ["--optim.lr", "-1"], r"^--optim.lr sets optim.lr: must be in "),
                           (teach.add_arguments, ["--data-dir", "d", "--source", "a", "--k", "x"],
                            r"^--k sets k: expected an int, got str 'x'")):
        p = argparse.ArgumentParser()
        add(p)
        with pytest.raises(ConfigError, match=msg):
            resolved(p.parse_args(argv))
    # the free-form deepspeed dict: a dotted override edits the default (or the YAML's JSON file), never
    # replaces it
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1}')
    ds = tmp_path / "ds.yaml"
    ds.write_text("deepspeed: ds.json\n")
    cfg = load_config(ds, ["deepspeed.zero_optimization.stage=1"])
    assert cfg.deepspeed == {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 1}
    assert load_config(None, ["deepspeed.zero_optimization.offload_param={device: cpu}"]).deepspeed == \
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
