"""Receptive fields: theoretical (per block, from kernels and strides) and effective (Luo et al.
2016: the gradient of a centre output unit with respect to the input, averaged over images).

The paper's thesis is that Meta-Pooling enlarges the receptive field; these functions measure it.
"""
from __future__ import annotations

import math

import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn

from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer
from metapool.ops import CANDIDATES


def _enhancer_extent(module: nn.Module) -> int | None:
    """Largest spatial extent among the ops an enhancer computes (None: global)."""
    if isinstance(module, nn.Sequential):  # enhancer wrapped before an existing SE
        module = module[0]
    if isinstance(module, FixedEnhancer):
        names = list(module.op_names)
    elif isinstance(module, MetaPoolEnhancer):
        idx = module.chosen or range(len(module.candidates))
        names = [module.candidates[i] for i in idx]
    else:
        return 1
    extents = [CANDIDATES[n].extent for n in names]
    return None if any(e is None for e in extents) else max(extents)


def _conv(m: nn.Conv2d) -> tuple[int, int, int]:
    return m.kernel_size[0], m.stride[0], m.dilation[0]


def theoretical_rf(model: nn.Module, img_size: int) -> list[dict]:
    """Receptive field (input pixels, capped at ``img_size``) after the stem and every block.

    Works on timm's EfficientNet-family models (MobileNetV2/V3, EfficientNet). Residual paths
    never enlarge the field beyond the main path, so only the main path is followed.
    """
    rf, jump = 1.0, 1.0
    rows = []

    def step(kernel: int | None, stride: int, dilation: int = 1) -> None:
        nonlocal rf, jump
        rf = math.inf if kernel is None else rf + (kernel - 1) * dilation * jump
        jump *= stride

    step(*_conv(model.conv_stem))
    rows.append({"layer": "conv_stem", "rf": min(rf, img_size), "stride": int(jump)})
    for name, block in model.blocks.named_modules():
        if isinstance(block, InvertedResidual):
            step(*_conv(block.conv_pw))
            step(*_conv(block.conv_dw))
        elif isinstance(block, DepthwiseSeparableConv):
            step(*_conv(block.conv_dw))
        else:
            continue
        extent = _enhancer_extent(block.se)
        if extent != 1:
            step(extent, 1)
        rows.append({"layer": f"blocks.{name}", "rf": min(rf, img_size), "stride": int(jump)})
    return rows


def effective_rf(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """Mean |d centre unit of ``layer``'s output / d input| over ``images``: an H x W map.

    The centre unit is the sum over channels at the spatial centre of the layer's output.
    """
    model.eval()
    target = model.get_submodule(layer)
    captured = {}
    handle = target.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out))
    x = images.clone().requires_grad_(True)
    try:
        model(x)
    finally:
        handle.remove()
    out = captured["out"]
    h, w = out.shape[-2] // 2, out.shape[-1] // 2
    out[:, :, h, w].sum().backward()
    return x.grad.abs().sum(dim=1).mean(dim=0).detach()


def erf_extent(erf: torch.Tensor, mass: float = 0.95) -> float:
    """Side (pixels) of the smallest centred square holding ``mass`` of the ERF's total."""
    total = float(erf.sum())
    if total == 0:
        return 0.0
    h, w = erf.shape
    cy, cx = h // 2, w // 2
    for r in range(max(h, w)):
        window = erf[max(0, cy - r): cy + r + 1, max(0, cx - r): cx + r + 1]
        if float(window.sum()) >= mass * total * (1 - 1e-6):  # float sums differ by rounding
            return float(2 * r + 1)
    return float(max(h, w))


def support_side(erf: torch.Tensor, tol: float = 0.0) -> tuple[int, int]:
    """Height and width of the bounding box of the ERF's non-zero (> tol) support."""
    nz = torch.nonzero(erf > tol)
    if nz.numel() == 0:
        return 0, 0
    return int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1)



def enhancer_map_sizes(backbone: str, img_size: int, stem_stride: int = 2) -> list[dict]:
    """The feature map every enhancer slot of ``backbone`` works on at ``img_size`` px: one row
    per slot (``layer``, ``height``, ``width``, ``channels``), from a forward pass."""
    from metapool.models import build_model, enhancer_modules

    model = build_model(backbone, "fixed", fixed_op="skip", num_classes=10,
                        stem_stride=stem_stride).eval()
    rows: list[dict] = []
    handles = [module.register_forward_pre_hook(
        lambda m, args, name=name: rows.append({
            "layer": name, "height": args[0].shape[-2], "width": args[0].shape[-1],
            "channels": args[0].shape[1]})) for name, module in enhancer_modules(model)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    finally:
        for h in handles:
            h.remove()
    return rows
