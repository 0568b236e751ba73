"""Model cost in parameters and MACs (torch.utils.flop_counter); latency lives with the
deployment code (``metapool.deploy``), where it is measured on the runtimes that deploy a model.

MACs do not count pooling or elementwise work; latency does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer


@dataclass
class Profile:
    model: str
    img_size: int
    params: int
    macs: int
    enhancers: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (convs and linears; pools add none)."""
    model.eval()
    x = torch.zeros(1, in_chans, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2  # the counter reports FLOPs = 2 x MACs


def profile_model(model: nn.Module, name: str, img_size: int = 224) -> Profile:
    """Parameters, MACs at ``img_size`` and the number of enhancers of ``model``."""
    n_enh = sum(isinstance(m, (MetaPoolEnhancer, FixedEnhancer)) for m in model.modules())
    return Profile(model=name, img_size=img_size,
                   params=sum(p.numel() for p in model.parameters()),
                   macs=count_macs(model, img_size), enhancers=n_enh)
