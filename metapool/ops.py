"""Candidate operations of the spatial enhancer (METHOD.md section 1).

Every candidate is stride 1 and shape preserving. The registry order is the reference code's
order; it matters because the reference-code stop rule always picks candidate #1.
Adding a candidate is one entry in ``CANDIDATES``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from timm.layers.coord_attn import CoordAttn
from torch import nn


@dataclass(frozen=True)
class Candidate:
    """One candidate op: how to build it, and the extra receptive field it adds (in pixels of
    the enhancer's feature map; None: global, as strip_pool sees a whole row and column)."""

    build: Callable[[int], nn.Module]
    extent: int | None


def _strip_pool(channels: int) -> nn.Module:
    # Coordinate-style pooling gate: timm's CoordAttn is exactly this op when the bottleneck
    # is max(8, C/32) channels with biased 1x1 convs, as in Hou et al.'s reference code.
    return CoordAttn(channels, rd_channels=max(8, channels // 32), bias=True)


def _max_pool(k: int) -> Candidate:
    return Candidate(lambda channels: nn.MaxPool2d(k, stride=1, padding=k // 2), k)


def _avg_pool(k: int) -> Candidate:
    # The zero padding counts in the mean (PyTorch's default), as in the reference code:
    # border activations shrink, which changes the op on small maps.
    return Candidate(
        lambda channels: nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=True), k)


CANDIDATES: dict[str, Candidate] = {
    "skip": Candidate(lambda channels: nn.Identity(), 1),
    "strip_pool": Candidate(_strip_pool, None),
    "max_pool_3x3": _max_pool(3),
    "max_pool_5x5": _max_pool(5),
    "max_pool_7x7": _max_pool(7),
    "avg_pool_3x3": _avg_pool(3),
    "avg_pool_5x5": _avg_pool(5),
    "avg_pool_7x7": _avg_pool(7),
}

DEFAULT_CANDIDATES: tuple[str, ...] = tuple(CANDIDATES)


def check_candidates(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate candidate names, raising a one-line error naming the bad one and the choices."""
    names = tuple(names)
    if not names:
        raise ValueError("pmpl.candidates is empty: list at least one of " + ", ".join(CANDIDATES))
    for name in names:
        if name not in CANDIDATES:
            raise ValueError(
                f"unknown candidate op {name!r}: choose from {', '.join(CANDIDATES)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"pmpl.candidates has duplicates: {list(names)}")
    return names


def build_op(name: str, channels: int) -> nn.Module:
    """Instantiate candidate ``name`` for a feature map with ``channels`` channels."""
    check_candidates([name])
    return CANDIDATES[name].build(channels)
