"""Test-session setup.

TRITON_INTERPRET must be set before any module defining a @triton.jit kernel is imported: on a machine
without a GPU driver, Triton kernels only run under the interpreter, and the decorator reads the flag
at definition time. DS_ACCELERATOR=cpu stops DeepSpeed from guessing (it accepts "cuda" silently).
"""

import os

if not os.environ.get("PROFUSER_TEST_REAL_TRITON"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker gets one intra-op thread: with `-n 2` on a 2-core machine, two workers
# with 2 threads each oversubscribe the cores and a model forward gets ~8x slower (measured 13.9 s vs
# 1.6 s for one SmolLM2 forward). Subprocesses launched by tests (deepspeed, torchrun) choose their own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed_when_the_module_passes(request, tmp_path_factory):
    """Module-scoped fixtures' folders (tiny models, stores, runs) otherwise stay until the session ends and
    add up to gigabytes (CI's disk ran out, stop 30); a module with a failure keeps its folders to debug."""
    import shutil

    made = []
    mktemp = tmp_path_factory.mktemp

    def recording(basename, numbered=True):
        made.append(mktemp(basename, numbered))
        return made[-1]

    tmp_path_factory.mktemp = recording
    failed_before = request.session.testsfailed
    yield
    del tmp_path_factory.mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
