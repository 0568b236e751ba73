"""Shared fixtures: tiny models and data so every test runs in seconds on a CPU (the helpers
themselves live in tests/helpers.py, which tests import; never this file)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TinySearchNet

# The suite is a CPU suite: on a CI machine with a GPU, CUDA stays hidden from the tests and
# every process they start (their numbers, bit-identical resumes and the nproc=2 tests assume
# the CPU; the GPU has its own check, `make gpu-check`). Set before torch touches CUDA.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Two cores: keep every test single-threaded so parallel BLAS threads never oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def tiny_net() -> TinySearchNet:
    torch.manual_seed(0)
    return TinySearchNet()


@pytest.fixture
def tiny_batches():
    g = torch.Generator().manual_seed(1)
    support = (torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g))
    query = (torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g))
    return support, query
