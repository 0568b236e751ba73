"""Shared fixtures: tiny models and data so every test runs in seconds on a CPU."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from metapool.enhancer import MetaPoolEnhancer

# Two cores: keep every test single-threaded so parallel BLAS threads never oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


class TinySearchNet(nn.Module):
    """conv -> BN -> ReLU -> two enhancers -> pool -> linear: small enough for exact checks."""

    def __init__(self, candidates=("skip", "max_pool_3x3", "avg_pool_3x3", "strip_pool"),
                 channels: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.enh1 = MetaPoolEnhancer(channels, candidates)
        self.mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.enh2 = MetaPoolEnhancer(channels, candidates)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enh2(self.mid(self.enh1(self.stem(x))))
        return self.head(x.mean((2, 3)))


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
