"""Fault injection, second round (test_faults.py has the first): what a run trusts.

    checkpoint files   a pickle planted under every name DeepSpeed loads is refused, never unpickled
    output folders     an empty / `.`-like output_dir, or a folder of the user's files, is refused: no file of
                       the user's is overwritten
    store identity     swapped source folders, a vote for a store that was since rebuilt: named errors,
                       and `profuser check` reports them
    resume inputs      a checkpoint resumed against rebuilt stores or vocabulary maps names what changed

Each case failed (silently) before its fix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from profuser.engine.config import ConfigError, load_config
from profuser.engine.trainer import output_dir as od

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------
# output folders


USER_CONFIG = "# my experiment: keep these comments\nseed: 3\noptim:\n  max_steps: 2\n"


@pytest.mark.parametrize("value", ["", " ", ".", "./", "..", "/"])
def test_an_empty_or_dot_like_output_dir_is_refused_and_nothing_is_written(tmp_path, value):
    (tmp_path / "config.yaml").write_text(USER_CONFIG)
    before = sorted(p.name for p in tmp_path.iterdir())
    p = subprocess.run([sys.executable, "-m", "profuser.engine.train", "--config", "config.yaml",
                        f"output_dir={value}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "output_dir" in lines[0], p.stderr
    assert (tmp_path / "config.yaml").read_text() == USER_CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_output_dir_rule_in_the_config_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^override output_dir: '' is empty"):
        load_config(None, ["output_dir="])
    with pytest.raises(ConfigError, match="is the current folder"):
        load_config(None, [f"output_dir={tmp_path}"])
    assert load_config(None, ["output_dir=run1"]).output_dir == "run1"


def test_a_folder_of_user_files_is_not_claimed(tmp_path):
    mine = tmp_path / "experiments"
    mine.mkdir()
    (mine / "config.yaml").write_text(USER_CONFIG)
    with pytest.raises(od.OutputDirError, match=f"output_dir={mine}: not empty and not a profuser run folder"):
        od.claim(mine)
    assert (mine / "config.yaml").read_text() == USER_CONFIG and not (mine / od.MARKER).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(od.OutputDirError, match="is a file"):
        od.claim(tmp_path / "file")


def test_new_empty_own_and_older_run_folders_are_claimed(tmp_path):
    new = od.claim(tmp_path / "a" / "b")  # created, marked
    assert (new / od.MARKER).is_file()
    (new / "config.yaml").write_text("old: 1\n")
    assert od.claim(new) == new  # a run's own folder is re-entered (resume)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (od.claim(empty) / od.MARKER).is_file()
    older = tmp_path / "older"  # written by a version before the marker: adopted
    (older / "checkpoints").mkdir(parents=True)
    (older / "checkpoints" / "latest").write_text("step00000002")
    assert (od.claim(older) / od.MARKER).is_file()


def test_a_link_in_the_run_folder_is_replaced_not_written_through(tmp_path):
    out = od.claim(tmp_path / "run")
    target = tmp_path / "precious.yaml"
    target.write_text(USER_CONFIG)
    (out / "config.yaml").symlink_to(target)
    od.write_owned(out, "config.yaml", "seed: 0\n")
    assert target.read_text() == USER_CONFIG and not (out / "config.yaml").is_symlink()
    assert (out / "config.yaml").read_text() == "seed: 0\n"


# ---------------------------------------------------------------------------------------------------------
# checkpoint folders: only what the record lists is loaded, and only as tensors and plain values

# every name DeepSpeed 0.19's load_checkpoint globs or builds in a tag folder (model states of every
# mp rank, ZeRO partitions fp32 / bf16, MoE experts old and new layout)
DEEPSPEED_NAMES = ["zero_pp_rank_0_mp_rank_0-_model_states.pt", "mp_rank_01_model_states.pt",
                   "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                   "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "expert_0_mp_rank_00_model_states.pt",
                   "layer_0_expert_0_mp_rank_00_model_states.pt"]


@pytest.mark.parametrize("name", DEEPSPEED_NAMES)
def test_a_pickle_planted_under_a_deepspeed_name_is_refused_not_run(tmp_path, name):
    import torch

    from helpers.checkpoints import Planted, fake_checkpoints
    from profuser.engine.trainer import checkpoint as ckpt

    d = fake_checkpoints(tmp_path)
    marker, planted = tmp_path / "pwned", d / "step00000004" / name
    listed = planted.exists()
    torch.save({"module": Planted(str(marker))}, planted)
    if listed:  # in place of a file the record lists: its sha256 differs, the older checkpoint is used
        with pytest.warns(UserWarning, match=f"is damaged \\({planted} has .* bytes"):
            got = ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="digest")
        assert got == d / "step00000002"
    else:
        with pytest.raises(ckpt.ResumeError, match=f"{planted}: not listed in"):
            ckpt.resume_point(ckpt.candidates(d), rank=0, world_size=1, config_digest="digest")
    assert not marker.exists()
    # and had it been listed (a record rewritten by whoever planted it), it is still never unpickled
    with pytest.raises(ckpt.ResumeError, match=f"{name}: holds objects other than tensors"):
        ckpt.torch_load_safe(d / "step00000004" / name)
    assert not marker.exists()


def test_deepspeed_state_classes_load_weights_only(tmp_path):
    """The allow-list is what DeepSpeed's optimizer states hold: a real ZeRO-2 optimizer state loads."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from profuser.engine.trainer import checkpoint as ckpt

    f = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                         "base_optimizer_state": {"exp_avg": torch.ones(3)}}}, f)
    got = ckpt.torch_load_safe(f)["optimizer_state_dict"]
    assert got["zero_stage"] == ZeroStageEnum.gradients and torch.equal(got["base_optimizer_state"]["exp_avg"],
                                                                         torch.ones(3))


# ---------------------------------------------------------------------------------------------------------
# store identity: the folder, the vote


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers import training_data

    return training_data(tmp_path_factory.mktemp("trust"), n=16, shard_size=8)


def copy_data(data, tmp_path) -> Path:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data["data"], root)
    return root


def infer_loader(root, sources=("self", "gpt2")):
    from helpers import fusion_loader, tokenizer

    # teacher tokenizers from the manifests, as training does
    return fusion_loader(root, tokenizer("smollm2"), sources=sources, student="x", mode="infer", k=4,
                         micro_batch_size=4, shuffle_buffer=1)


def run_check(data, tmp_path, root) -> subprocess.CompletedProcess:
    from helpers import overrides

    return subprocess.run([sys.executable, "-m", "profuser.engine.cli", "check",
                           *overrides(data, tmp_path / "out", **{"data.data_dir": str(root)})],
                          capture_output=True, text=True, timeout=300)


def test_swapped_source_folders_are_named_by_the_loader_and_by_check(data, tmp_path):
    from profuser.engine import store

    root = copy_data(data, tmp_path)
    a, b = store.teacher_dir(root, "self", "infer"), store.teacher_dir(root, "gpt2", "infer")
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    with pytest.raises(store.StoreError, match=f"{a / 'manifest.json'}: holds the infer-mode store of source 'gpt2'"):
        infer_loader(root)
    p = run_check(data, tmp_path, root)
    assert p.returncode == 1 and "sits in the folder of source 'self'" in p.stderr.strip().splitlines()[-1], p.stderr


def test_a_store_rebuilt_after_the_vote_is_named_by_the_loader_and_by_check(data, tmp_path):
    from helpers import tokenizer
    from profuser.engine import store
    from profuser.engine.tools import synthetic as fx

    root = copy_data(data, tmp_path)
    infer_loader(root)  # as scored: fine
    ex = fx.corpus(16, extra_every=0, system_every=5)
    pm = store.PreparedManifest.load(root)
    import shutil

    shutil.rmtree(store.teacher_dir(root, "gpt2", "infer"))  # generated again, by another model
    fx.write_teacher(root, "gpt2", "infer", tokenizer("gpt2"), data["data"] + "/other-model", ex, pm, k=4, seed=99,
                     responses=[fx.infer_response("gpt2", e) + " again" for e in ex])
    votes = store.scores_dir(root) / "votes.json"
    with pytest.raises(store.StoreError, match=f"{votes}: the vote scored source 'gpt2'.*content differ"):
        infer_loader(root)
    p = run_check(data, tmp_path, root)
    assert p.returncode == 1 and "run `profuser score` again" in p.stderr.strip().splitlines()[-1], p.stderr


# ---------------------------------------------------------------------------------------------------------
# resume inputs: a checkpoint continues only on the data it trained on


def test_resume_against_a_rebuilt_store_names_what_changed(data, tmp_path):
    import json
    import shutil

    from helpers import overrides, tokenizer
    from profuser.engine import store
    from profuser.engine.tools import synthetic as fx

    root, out = copy_data(data, tmp_path), tmp_path / "run"

    def train(steps, *extra):
        cmd = [sys.executable, "-m", "profuser.engine.train", *extra,
               *overrides(data, out, **{"data.data_dir": str(root), "optim.max_steps": steps, "checkpoint.every": 0,
                                        "checkpoint.export": False})]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)

    first = train(2)
    assert first.returncode == 0, first.stderr[-3000:]
    info = json.loads((out / "checkpoints" / "step00000002" / "profuser_checkpoint.json").read_text())
    assert {"train: teachers/gpt2/train", "infer: scores/votes", "vocabulary map of gpt2"} <= set(info["inputs"])
    # the same data_dir, the gpt2 store taught again by another model
    ex = fx.corpus(16, extra_every=0, system_every=5)
    shutil.rmtree(store.teacher_dir(root, "gpt2", "train"))
    other = shutil.copytree(Path(data["root"]) / "gpt2-tok", tmp_path / "another-model")
    fx.write_teacher(root, "gpt2", "train", tokenizer("gpt2"), str(other), ex, store.PreparedManifest.load(root), k=4,
                     seed=77)
    refused = train(3)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "trained on other data than this run reads: train: teachers/gpt2/train" \
        in lines[-1] and "--allow-changed-data" in lines[-1], refused.stderr[-3000:]
    resumed = train(3, "--allow-changed-data")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["start_step"] == 2
