"""Candidate operations of the spatial enhancer (METHOD.md section 1).

Every candidate is stride 1 and shape preserving. The registry order is the reference code's
order; it matters because the reference-code stop rule always picks candidate #1.
Adding a candidate is one entry in ``CANDIDATES``.

The pooling candidates are PyTorch's own ``max_pool2d`` / ``avg_pool2d`` (stride 1, same
padding; the average counts the zero padding), computed faster but to the same numbers
(tests/test_ops.py; figures in reports/benchmarks/README.md, "The enhancers' cost"):
large windows as two 1-D passes, the average's backward as the same average of the gradient
(a zero-padded box filter is its own adjoint), and ``candidate_outputs`` reusing a smaller max
pool's output for a larger one. They are memory-bound: keep the activations channels_last.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.coord_attn import CoordAttn
from torch import nn

# Measured (experiments.benchmarks.enhancers, channels_last, 2-core CPU): two 1-D passes beat one k x k pass
# from k = 7 for max and from k = 5 for the average.
SEPARABLE_MAX_FROM = 7
SEPARABLE_MEAN_FROM = 5


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


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(x, k, 1, k // 2)``: a k x k max, stride 1, -inf padding. From
    ``SEPARABLE_MAX_FROM`` it is a k x 1 max followed by a 1 x k max (the same maximum)."""
    if k < SEPARABLE_MAX_FROM:
        return F.max_pool2d(x, k, 1, k // 2)
    return F.max_pool2d(F.max_pool2d(x, (k, 1), 1, (k // 2, 0)), (1, k), 1, (0, k // 2))


def _box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    if k < SEPARABLE_MEAN_FROM:
        return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=True)
    # (1/k) sum over k rows of the zero-padded map, then (1/k) over k columns: the same mean
    return F.avg_pool2d(F.avg_pool2d(x, (k, 1), 1, (k // 2, 0)), (1, k), 1, (0, k // 2))


class _BoxMean(torch.autograd.Function):
    # y_i = 1/k^2 sum_{j in W(i)} x_j with x = 0 outside the map, so dL/dx_j is
    # 1/k^2 sum_{i in W(j), i inside} g_i: the same box mean of the gradient. PyTorch's own
    # avg_pool2d_backward is 1.5-2x slower than its forward on channels_last maps.
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:  # noqa: D102
        ctx.k = k
        return _box_mean(x, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return _box_mean(grad, ctx.k), None


def box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.avg_pool2d(x, k, 1, k // 2, count_include_pad=True)``, forward and backward."""
    return _BoxMean.apply(x, k)


class _StrideOnePool(nn.Module):
    """A stride-1 k x k pooling op with same padding; ``pool`` says which."""

    pool: Callable[[torch.Tensor, int], torch.Tensor]

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self).pool(x, self.kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


class MaxPool(_StrideOnePool):
    """Stride-1 k x k max pooling with -inf padding (``nn.MaxPool2d(k, 1, k // 2)``)."""

    pool = staticmethod(max_pool)


class BoxMean(_StrideOnePool):
    """Stride-1 k x k average pooling that counts the zero padding
    (``nn.AvgPool2d(k, 1, k // 2, count_include_pad=True)``)."""

    pool = staticmethod(box_mean)


def candidate_outputs(x: torch.Tensor, ops: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``[op(x) for op in ops]``, sharing work: a larger max pool is computed from the largest
    smaller one (max over k = max over k - j + 1 of the max over j; exact, -inf padding never
    wins since every window holds its centre). Ties route a max's gradient to one of the tied
    inputs, which may not be the one a direct k x k pool picks."""
    outs: list[torch.Tensor | None] = [None] * len(ops)
    smaller: tuple[int, torch.Tensor] | None = None
    order = sorted(range(len(ops)), key=lambda i: getattr(ops[i], "kernel", 0))
    for i in order:
        op = ops[i]
        if isinstance(op, MaxPool) and smaller is not None:
            outs[i] = max_pool(smaller[1], op.kernel - smaller[0] + 1)
        else:
            outs[i] = op(x)
        if isinstance(op, MaxPool):
            smaller = (op.kernel, outs[i])
    return outs  # type: ignore[return-value]


def _max_pool(k: int) -> Candidate:
    return Candidate(lambda channels: MaxPool(k), k)


def _avg_pool(k: int) -> Candidate:
    # The zero padding counts in the mean (PyTorch's default), as in the reference code:
    # border activations shrink, which changes the op on small maps.
    return Candidate(lambda channels: BoxMean(k), k)


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
