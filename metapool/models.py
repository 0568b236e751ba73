"""Backbones with enhancers in their spatial slots, registered with timm.

The backbones are timm's own models. timm's MobileNetV2 1.0 is torchvision's architecture
(3,504,872 parameters at 1000 classes) and its inverted-residual blocks have an ``se`` slot
exactly where METHOD.md puts the enhancer: after depthwise conv + BN + ReLU6, before the
1x1 projection. Other backbones get an enhancer after each spatial conv's activation.

After ``import metapool``::

    timm.create_model("metapool_mobilenetv2_100")                      # searchable
    timm.create_model("metapool_mobilenetv2_100", genotype="g.json")   # fixed (adapted)
    timm.create_model("metapool_mobilenetv2_100", attention="se")      # attention ablation
    timm.create_model("mobilenetv2_100")                               # the baseline
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import create_attn
from timm.models import register_model
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet, _gen_mobilenet_v2
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer
from metapool.genotype import Genotype
from metapool.ops import DEFAULT_CANDIDATES, build_op

# timm backbone name -> whether only expanded (inverted-residual) blocks get an enhancer.
BACKBONES: dict[str, bool] = {
    "mobilenetv2_100": True,  # METHOD.md: the expand-ratio-1 first block has none -> 16 slots
    "mobilenetv3_large_100": False,
    "efficientnet_b0": False,
    "resnet18": False,
    "resnet50": False,
}
ATTENTIONS = ("se", "eca", "cbam", "coord")
ENHANCER_KINDS = ("none", "search", "fixed", "attention")


@dataclass
class Slot:
    """Where an enhancer goes: ``parent.attr`` of a block, at ``channels`` channels."""

    name: str
    parent: nn.Module
    attr: str
    channels: int


def find_slots(model: nn.Module, expanded_only: bool = False) -> list[Slot]:
    """The enhancer positions of a timm EfficientNet/MobileNet-family model or a timm ResNet."""
    slots: list[Slot] = []
    for name, block in model.named_modules():
        if isinstance(block, InvertedResidual):
            slots.append(Slot(name, block, "se", block.conv_dw.out_channels))
        elif isinstance(block, DepthwiseSeparableConv) and not expanded_only:
            slots.append(Slot(name, block, "se", block.conv_dw.out_channels))
        elif isinstance(block, BasicBlock):
            slots.append(Slot(name, block, "aa", block.conv1.out_channels))
        elif isinstance(block, Bottleneck):
            slots.append(Slot(name, block, "aa", block.conv2.out_channels))
    if not slots:
        raise ValueError(f"{type(model).__name__} has no block this suite can place enhancers in")
    return slots


def _fill(slot: Slot, module: nn.Module) -> None:
    existing = getattr(slot.parent, slot.attr)
    if not isinstance(existing, nn.Identity):
        # MobileNetV3/EfficientNet blocks already carry SE there: enhance, then squeeze-excite.
        module = nn.Sequential(module, existing)
    setattr(slot.parent, slot.attr, module)


def enhancers(model: nn.Module) -> list[tuple[str, MetaPoolEnhancer]]:
    """The searchable enhancers of ``model`` in network order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MetaPoolEnhancer)]


def slot_names(backbone: str) -> list[str]:
    """Names of the enhancer positions of a backbone (the genotype's layer names)."""
    model = timm.create_model(backbone, num_classes=10)
    return [s.name for s in find_slots(model, BACKBONES[backbone])]


def build_model(
    backbone: str = "mobilenetv2_100",
    enhancer: str = "search",
    *,
    candidates: tuple[str, ...] | list[str] = DEFAULT_CANDIDATES,
    split_ratio: float = 1.0,
    genotype: Genotype | str | Path | dict | None = None,
    fixed_op: str | None = None,
    attention: str | None = None,
    width: float = 1.0,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm backbone and fill its enhancer slots.

    enhancer: ``none`` (the plain backbone), ``search`` (MetaPoolEnhancer everywhere),
    ``fixed`` (FixedEnhancer from ``genotype``, or every slot ``fixed_op``), ``attention``
    (a ``timm.layers.create_attn`` module named by ``attention``). ``width`` is MobileNetV2's
    width multiplier (torchvision's ``width_mult``; same parameter counts at every width).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: choose from {', '.join(BACKBONES)}")
    if enhancer not in ENHANCER_KINDS:
        raise ValueError(f"unknown enhancer {enhancer!r}: choose from {', '.join(ENHANCER_KINDS)}")
    if width != 1.0:
        if backbone != "mobilenetv2_100":
            raise ValueError(f"width={width} is only supported for mobilenetv2_100, not {backbone}")
        model = _gen_mobilenet_v2("mobilenetv2_100", width, **timm_kwargs)
    else:
        model = timm.create_model(backbone, **timm_kwargs)
    if backbone == "mobilenetv2_100":
        _torchvision_classifier_init(model)
    if enhancer == "none":
        return model
    slots = find_slots(model, BACKBONES[backbone])
    factory: Callable[[Slot], nn.Module]
    if enhancer == "search":
        def factory(s: Slot) -> nn.Module:
            enh = MetaPoolEnhancer(s.channels, candidates, split_ratio)
            enh.layer = s.name  # the genotype names layers by their block
            return enh
    elif enhancer == "fixed":
        geno = _as_genotype(genotype, [s.name for s in slots], fixed_op, split_ratio)
        ops = geno.ops_by_layer()
        missing = [s.name for s in slots if s.name not in ops]
        if missing:
            raise ValueError(f"genotype has no entry for layers {missing} of {backbone}")

        def factory(s: Slot) -> nn.Module:
            return FixedEnhancer(s.channels, ops[s.name], geno.split_ratio)
    else:
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}: choose from {', '.join(ATTENTIONS)}")

        def factory(s: Slot) -> nn.Module:
            if attention == "coord":
                # Hou et al.'s coordinate attention (reduction 32, >= 8 channels, biased convs),
                # the paper's 3.95M-parameter model: the module candidate strip_pool already is.
                # timm's create_attn("coord") defaults differ (reduction 16, no conv bias).
                return build_op("strip_pool", s.channels)
            return create_attn(attention, s.channels)
    for slot in slots:
        _fill(slot, factory(slot))
    return model


def _torchvision_classifier_init(model: nn.Module) -> None:
    # timm initialises the classifier uniform(+-1/sqrt(num_classes)): with few classes the
    # initial logits are huge (loss 5-7 at 10 classes). torchvision's MobileNetV2 - the
    # architecture reproduced here - uses N(0, 0.01) and zero bias, which is also timm's
    # convolution init (kaiming normal, fan out), so the whole model now matches torchvision.
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, 0, 0.01)
        nn.init.zeros_(head.bias)


def _as_genotype(genotype, layers: list[str], fixed_op: str | None, split_ratio: float) -> Genotype:
    if genotype is None:
        if fixed_op is None:
            raise ValueError("a fixed model needs a genotype or a fixed_op")
        return Genotype.uniform(layers, fixed_op, split_ratio)
    if isinstance(genotype, Genotype):
        return genotype
    if isinstance(genotype, dict):
        return Genotype.from_dict(genotype)
    return Genotype.load(genotype)


def export_fixed(model: nn.Module) -> nn.Module:
    """Replace every (frozen) MetaPoolEnhancer of ``model`` by its FixedEnhancer, in place."""
    for name, module in enhancers(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.to_fixed())
    return model


# Modules whose children run in the order they are registered (timm's blocks and stems), so a
# Conv2d registered right before a BatchNorm2d feeds it. tests/test_ops.py checks every backbone.
_SEQUENTIAL_CHILDREN = (InvertedResidual, DepthwiseSeparableConv, ConvBnAct, BasicBlock,
                        Bottleneck, EfficientNet, MobileNetV3, ResNet, nn.Sequential)


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as the per-channel ``x * scale + shift`` it computes."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        scale = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        shift = bn.bias.detach() - bn.running_mean * scale
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, in place (eval mode
    only: the folded model computes what the eval-mode model computes, to float rounding).

    timm's ``BatchNormAct2d`` keeps its activation (and dropout) as a module of its own. An
    enhancer's BatchNorm cannot be folded into a convolution (it follows a pooling op, and a
    ReLU6 separates it from the depthwise convolution before): it becomes a ``ChannelAffine``
    (one pass instead of BatchNorm's two) and its h-swish runs in place on that fresh output.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: call model.eval() first")
    for module in model.modules():
        if isinstance(module, (MetaPoolEnhancer, FixedEnhancer)) and \
                isinstance(module.bn, nn.BatchNorm2d):
            module.bn = ChannelAffine(module.bn)
            module.act = nn.Hardswish(inplace=True)
    for parent in model.modules():
        if not isinstance(parent, _SEQUENTIAL_CHILDREN):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                    if m is not None and not isinstance(m, nn.Identity)]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    return model


def unused_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Alpha and the dropped candidates of every frozen enhancer of ``model``."""
    return [p for _, module in enhancers(model) for p in module.unused_parameters()]


def release_unused_parameters(model: nn.Module) -> None:
    """Take alpha and the dropped candidates of every frozen enhancer out of autograd, in place
    (the module keeps them, so checkpoints and ``export_fixed`` are unchanged)."""
    for p in unused_parameters(model):
        p.requires_grad_(False)


def copy_freezes(source: nn.Module, target: nn.Module) -> None:
    """Freeze ``target``'s enhancers as ``source``'s are (an EMA copy follows the search)."""
    for (_, src), (_, dst) in zip(enhancers(source), enhancers(target), strict=True):
        if src.frozen and src.chosen != dst.chosen:
            dst.freeze(src.chosen)


def _register(backbone: str) -> None:
    def create(pretrained: bool = False, genotype=None, attention: str | None = None,
               fixed_op: str | None = None, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError("metapool models have no pretrained weights")
        kind = ("fixed" if genotype is not None or fixed_op is not None
                else "attention" if attention else "search")
        return build_model(backbone, kind, genotype=genotype, attention=attention,
                           fixed_op=fixed_op, **kwargs)

    create.__name__ = f"metapool_{backbone}"
    create.__doc__ = f"timm {backbone} with Meta-Pooling enhancers (see metapool.models)."
    create.__module__ = __name__
    register_model(create)


for _backbone in BACKBONES:
    _register(_backbone)
