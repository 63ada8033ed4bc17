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


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
