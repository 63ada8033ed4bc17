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
