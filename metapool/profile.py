"""Model cost: parameters, MACs (torch.utils.flop_counter), enhancer count, CPU latency.

Latency is measured on the model as it would be deployed on a CPU: a copy with BatchNorm folded
into the convolutions (``fold_batchnorm``) and channels_last activations, for every variant
alike. MACs do not count pooling or elementwise work; latency does.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer
from metapool.models import fold_batchnorm


@dataclass
class Profile:
    model: str
    img_size: int
    params: int
    macs: int
    enhancers: int
    latency_ms: float | None

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


def deployed(model: nn.Module) -> nn.Module:
    """A CPU inference copy of ``model``: eval mode, BatchNorm folded, channels_last."""
    net = fold_batchnorm(copy.deepcopy(model).cpu().float().eval())
    return net.to(memory_format=torch.channels_last)


def cpu_latency_ms(model: nn.Module, img_size: int, repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of a batch-1 forward pass of ``deployed(model)``, in milliseconds."""
    model = deployed(model)
    x = torch.randn(1, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile_model(model: nn.Module, name: str, img_size: int = 224,
                  latency: bool = True) -> Profile:
    """Measure ``model``; latency is skipped when ``latency`` is False."""
    n_enh = sum(isinstance(m, (MetaPoolEnhancer, FixedEnhancer)) for m in model.modules())
    return Profile(
        model=name,
        img_size=img_size,
        params=sum(p.numel() for p in model.parameters()),
        macs=count_macs(model, img_size),
        enhancers=n_enh,
        latency_ms=cpu_latency_ms(model, img_size) if latency else None,
    )


def format_table(p: Profile) -> str:
    rows = [
        ("model", p.model),
        ("image size", f"{p.img_size}x{p.img_size}"),
        ("parameters", f"{p.params:,} ({p.params / 1e6:.3f} M)"),
        ("MACs", f"{p.macs:,} ({p.macs / 1e6:.1f} M)"),
        ("enhancers", str(p.enhancers)),
        ("CPU latency, batch 1 (BN folded, channels_last)",
         "-" if p.latency_ms is None else f"{p.latency_ms:.2f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
