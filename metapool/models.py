"""Backbones with enhancers in their spatial slots, registered with timm.

The backbones are timm's own models. timm's MobileNetV2 1.0 is torchvision's architecture
(3,504,872 parameters at 1000 classes) and its inverted-residual blocks have an ``se`` slot
exactly where METHOD.md puts the enhancer: after depthwise conv + BN + ReLU6, before the
1x1 projection. Other backbones get an enhancer after each spatial conv's activation.

After ``import metapool``::

    timm.create_model("metapool_mobilenetv2_100")                      # searchable
    timm.create_model("metapool_mobilenetv2_100", genotype="g.json")   # fixed (adapted)
    timm.create_model("metapool_mobilenetv2_100", attention="se")      # attention ablation
    timm.create_model("metapool_published_mobilenetv2_100")            # the authors' model
    timm.create_model("mobilenetv2_100")                               # the baseline

The authors' published ``mp_mobilenet_v2`` (METHOD.md section 4b) is two parts on top of
MobileNetV2, each a switch of ``build_model`` so that it can be ablated alone and combined with
any enhancer: ``output_gates`` (a coordinate-style gate - candidate ``strip_pool`` - on the
output of blocks 6-16, after the projection conv + BN, before the residual add) and
``head="published"`` (global pool -> 1x1 conv 1280 -> 1280 -> h-swish -> dropout 0.2 ->
linear). Every MobileNetV2 built here, the baseline included, gets torchvision's
initialisation, as the authors' model did.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import create_attn
from timm.models import register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import _gen_mobilenet_v2
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

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
HEADS = ("plain", "published")
# METHOD.md 4b: blocks 6-16 of MobileNetV2's 17 inverted-residual blocks (0-based) carry a gate
PUBLISHED_GATES_FROM = 6
# METHOD.md 4b: the authors' head hard-codes its dropout (their model swallows --drop)
PUBLISHED_HEAD_DROP_RATE = 0.2


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


def enhancer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every enhancer of ``model``, searchable or fixed, in network order, named by its block
    (the genotype's layer names)."""
    return [(n.rpartition(".")[0], m) for n, m in model.named_modules()
            if isinstance(m, (MetaPoolEnhancer, FixedEnhancer))]


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
    output_gates: bool = False,
    head: str = "plain",
    head_drop_rate: float | None = None,
    stem_stride: int = 2,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm backbone and fill its enhancer slots.

    enhancer: ``none`` (the plain backbone), ``search`` (MetaPoolEnhancer everywhere),
    ``fixed`` (FixedEnhancer from ``genotype``, or every slot ``fixed_op``), ``attention``
    (a ``timm.layers.create_attn`` module named by ``attention``). ``width`` is MobileNetV2's
    width multiplier (torchvision's ``width_mult``; same parameter counts at every width).
    ``output_gates`` and ``head="published"`` add the parts of the authors' published model
    (MobileNetV2 only; ``add_output_gates``, ``add_published_head``); ``head_drop_rate`` is
    that head's dropout (None: 0.2, as the authors' model ran whatever ``drop_rate`` said).
    ``stem_stride`` 1 (MobileNetV2 only) doubles every feature map: what a twice larger input
    gives the enhancers, from the same pixels.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: choose from {', '.join(BACKBONES)}")
    if enhancer not in ENHANCER_KINDS:
        raise ValueError(f"unknown enhancer {enhancer!r}: choose from {', '.join(ENHANCER_KINDS)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: choose from {', '.join(HEADS)}")
    if (output_gates or head != "plain") and backbone != "mobilenetv2_100":
        raise ValueError(f"the published model's gates and head exist for mobilenetv2_100 only, "
                         f"not {backbone}")
    if width != 1.0:
        if backbone != "mobilenetv2_100":
            raise ValueError(f"width={width} is only supported for mobilenetv2_100, not {backbone}")
        model = _gen_mobilenet_v2("mobilenetv2_100", width, **timm_kwargs)
    else:
        model = timm.create_model(backbone, **timm_kwargs)
    if stem_stride != 2:
        if backbone != "mobilenetv2_100" or stem_stride != 1:
            raise ValueError(f"stem_stride={stem_stride}: only 1 (and timm's 2) on "
                             f"mobilenetv2_100, not {backbone}")
        model.conv_stem.stride = (1, 1)
    if enhancer != "none":
        _fill_enhancers(model, backbone, enhancer, candidates, split_ratio, genotype, fixed_op,
                        attention)
    if output_gates:
        add_output_gates(model)
    if head == "published":
        add_published_head(model, PUBLISHED_HEAD_DROP_RATE if head_drop_rate is None
                           else head_drop_rate)
    if backbone == "mobilenetv2_100":
        torchvision_init(model)
    return model


def _fill_enhancers(model: nn.Module, backbone: str, enhancer: str, candidates, split_ratio: float,
                    genotype, fixed_op: str | None, attention: str | None) -> None:
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


def inverted_residual_blocks(model: nn.Module) -> list[nn.Module]:
    """MobileNetV2's 17 blocks in network order (the expand-ratio-1 block 0 included)."""
    return [block for stage in model.blocks for block in stage]


def add_output_gates(model: nn.Module, first_block: int = PUBLISHED_GATES_FROM) -> None:
    """The authors' ``x + gate(conv(x))``: a ``strip_pool`` gate (coordinate-style, biased
    convs, max(8, C // 32) middle channels) on the output of every block from ``first_block``,
    after the projection conv + BN and before the residual add, in place."""
    for block in inverted_residual_blocks(model)[first_block:]:
        if not isinstance(block, InvertedResidual):
            raise ValueError(f"block {type(block).__name__} has no projection to gate")
        # inside bn3's slot, so timm's forward adds the residual after the gate
        block.bn3 = nn.Sequential(block.bn3, build_op("strip_pool", block.conv_pwl.out_channels))


class PublishedHead(nn.Module):
    """The authors' head before the classifier: global average pool, a 1x1 conv C -> C with
    bias, h-swish, flattened (timm's ``forward_head`` applies the dropout, then the linear)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.pool(x))).flatten(1)


def add_published_head(model: nn.Module, drop_rate: float = PUBLISHED_HEAD_DROP_RATE) -> None:
    """Replace the global pool of a timm MobileNetV2 by ``PublishedHead`` and set the dropout
    before the classifier to ``drop_rate``, in place."""
    model.global_pool = PublishedHead(model.num_features)
    model.drop_rate = drop_rate


def torchvision_init(model: nn.Module) -> None:
    """torchvision's MobileNetV2 initialisation on every module, in place: convolutions
    kaiming-normal (fan out, as PyTorch counts it: a depthwise 3x3 at C channels has fan out
    9C, where timm's own init uses 9), biases 0, norms 1 and 0, linears N(0, 0.01). timm's
    uniform classifier init would also start 10 classes at a loss of 5-7."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


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


@register_model
def metapool_published_mobilenetv2_100(pretrained: bool = False, **kwargs) -> nn.Module:
    """The authors' ``mp_mobilenet_v2`` (METHOD.md 4b): MobileNetV2 1.0, 11 output gates and
    the published head (5,181,686 parameters at 1000 classes)."""
    if pretrained:
        raise ValueError("metapool models have no pretrained weights")
    return build_model("mobilenetv2_100", "none", output_gates=True, head="published", **kwargs)
