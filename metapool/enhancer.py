"""The parameterised spatial enhancer ("Meta-Pooling") and its fixed, deployable form.

Searchable: ``h_swish(BN(sum_k softmax(alpha)_k * op_k(x)))`` with one ``alpha`` per enhancer.
Frozen: the same module reduced to its chosen op(s), summed unweighted, other candidates no
longer computed. Fixed: a separate module holding only the chosen ops (no alpha, no unused
parameters), which is what a deployed model costs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metapool.ops import DEFAULT_CANDIDATES, build_op, candidate_outputs, check_candidates


def _split_channels(channels: int, split_ratio: float) -> int:
    if not 0.0 < split_ratio <= 1.0:
        raise ValueError(f"split_ratio={split_ratio} must lie in (0, 1]")
    return channels if split_ratio >= 1.0 else max(1, int(round(channels * split_ratio)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over all elements: one pass and no temporary when both share a dense layout."""
    for fmt, perm in ((torch.contiguous_format, None), (torch.channels_last, (0, 2, 3, 1))):
        if a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt):
            if perm is not None:
                a, b = a.permute(perm), b.permute(perm)
            return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


class _WeightedSum(torch.autograd.Function):
    # sum_k w_k y_k in one output buffer; backward: dL/dy_k = w_k g, dL/dw_k = <g, y_k>.
    # Autograd's chain of mul/add does the same with about twice the passes over memory.
    @staticmethod
    def forward(ctx, weights: torch.Tensor, *ys: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = ys[0] * weights[0]
        for w, y in zip(weights[1:], ys[1:], strict=True):
            out.addcmul_(y, w)
        ctx.save_for_backward(weights, *ys)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        weights, *ys = ctx.saved_tensors
        grad_w = torch.stack([_dot(grad, y) for y in ys]) if ctx.needs_input_grad[0] else None
        grad_ys = [grad * w if need else None
                   for w, need in zip(weights, ctx.needs_input_grad[1:], strict=True)]
        return (grad_w, *grad_ys)


def weighted_sum(weights: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    """``sum_k weights[k] * ys[k]`` (same numbers as the Python sum, to float rounding)."""
    return _WeightedSum.apply(weights, *ys)


def _unweighted_sum(ys: list[torch.Tensor]) -> torch.Tensor:
    if len(ys) == 1:
        return ys[0]
    out = ys[0] + ys[1]  # a new buffer: the rest accumulate into it in place
    for y in ys[2:]:
        out.add_(y)
    return out


class _EnhancerBase(nn.Module):
    """Shared tail: optional channel split, BN and h-swish around a combination of ops."""

    def __init__(self, channels: int, split_ratio: float) -> None:
        super().__init__()
        self.channels = channels
        self.split_ratio = split_ratio
        self.enhanced = _split_channels(channels, split_ratio)
        self.bn = nn.BatchNorm2d(self.enhanced)
        self.act = nn.Hardswish()

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enhanced == self.channels:
            return self.act(self.bn(self._combine(x)))
        xe, rest = x[:, : self.enhanced], x[:, self.enhanced :]
        return torch.cat([self.act(self.bn(self._combine(xe))), rest], dim=1)


class MetaPoolEnhancer(_EnhancerBase):
    """Searchable enhancer: a softmax(alpha)-weighted mixture of candidate ops."""

    def __init__(
        self,
        channels: int,
        candidates: tuple[str, ...] | list[str] = DEFAULT_CANDIDATES,
        split_ratio: float = 1.0,
        alpha_init_std: float = 1e-3,
    ) -> None:
        super().__init__(channels, split_ratio)
        self.candidates = check_candidates(candidates)
        self.ops = nn.ModuleList(build_op(n, self.enhanced) for n in self.candidates)
        self.alpha = nn.Parameter(torch.randn(len(self.candidates)) * alpha_init_std)
        # Persistent so that a checkpoint carries which ops a frozen layer kept.
        self.register_buffer("chosen_mask", torch.zeros(len(self.candidates), dtype=torch.bool))
        self._chosen: list[int] = []
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_chosen())

    def _sync_chosen(self) -> None:
        self._chosen = [i for i, c in enumerate(self.chosen_mask.tolist()) if c]

    @property
    def frozen(self) -> bool:
        return bool(self._chosen)

    @property
    def chosen(self) -> list[int]:
        return list(self._chosen)

    def probabilities(self) -> torch.Tensor:
        """softmax(alpha), detached."""
        return F.softmax(self.alpha.detach().float(), dim=0)

    def freeze(self, indices: list[int]) -> None:
        """Reduce this enhancer to ``indices`` (summed unweighted); alpha stops being used."""
        if not indices or any(not 0 <= i < len(self.candidates) for i in indices):
            raise ValueError(f"invalid op indices {indices} for {len(self.candidates)} candidates")
        mask = torch.zeros_like(self.chosen_mask)
        mask[list(indices)] = True
        self.chosen_mask.copy_(mask)
        self._sync_chosen()

    def unused_parameters(self) -> list[nn.Parameter]:
        """What a frozen enhancer no longer computes with: alpha and the dropped candidates."""
        if not self._chosen:
            return []
        dropped = [op for i, op in enumerate(self.ops) if i not in self._chosen]
        return [self.alpha, *(p for op in dropped for p in op.parameters())]

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        if self._chosen:
            return _unweighted_sum(candidate_outputs(x, [self.ops[i] for i in self._chosen]))
        weights = F.softmax(self.alpha, dim=0).to(x.dtype)
        return weighted_sum(weights, candidate_outputs(x, self.ops))

    def to_fixed(self) -> FixedEnhancer:
        """The deployable module: chosen ops with their trained weights, BN, no alpha."""
        if not self._chosen:
            raise RuntimeError("enhancer is not frozen yet: freeze it before exporting")
        fixed = FixedEnhancer(
            self.channels, [self.candidates[i] for i in self._chosen], self.split_ratio
        )
        for j, i in enumerate(self._chosen):
            fixed.ops[j].load_state_dict(self.ops[i].state_dict())
        fixed.bn.load_state_dict(self.bn.state_dict())
        return fixed.to(self.alpha.device).train(self.training)

    def extra_repr(self) -> str:
        chosen = [self.candidates[i] for i in self._chosen]
        return f"channels={self.channels}, enhanced={self.enhanced}, frozen_to={chosen or None}"


class FixedEnhancer(_EnhancerBase):
    """An adapted enhancer: only the chosen op(s), summed, then BN and h-swish."""

    def __init__(self, channels: int, ops: list[str], split_ratio: float = 1.0) -> None:
        super().__init__(channels, split_ratio)
        self.op_names = check_candidates(ops)
        self.ops = nn.ModuleList(build_op(n, self.enhanced) for n in self.op_names)

    def _combine(self, x: torch.Tensor) -> torch.Tensor:
        return _unweighted_sum(candidate_outputs(x, self.ops))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, enhanced={self.enhanced}, ops={list(self.op_names)}"
