"""Run by tests/test_distributed.py, under torchrun (gloo) or as a single process.

Trains TinySearchNet for a few steps with PMPL (or plain SGD for the baseline check) on a fixed
global batch split across ranks, and saves alpha, the genotype and the weights of this rank.
BatchNorm runs on frozen statistics (SyncBatchNorm is GPU-only), so a per-rank half batch
gives exactly half of the full batch's mean gradient.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from metapool.pmpl import PMPLConfig, ProgressiveMetaPooling
from tests.helpers import TinySearchNet


def main(mode: str, out: str) -> None:
    distributed = "RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    net = TinySearchNet().double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # frozen statistics
    model = DDP(net, find_unused_parameters=True) if distributed else net
    g = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(6):
        x = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        xq = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
        yq = torch.randint(0, 3, (8,), generator=g)
        shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
        steps.append(((x[shard], y[shard]), (xq[shard], yq[shard])))
    if mode == "pmpl":
        search = ProgressiveMetaPooling(model, PMPLConfig(alpha_lr=0.2, inner_lr=0.05,
                                                          threshold=0.3), F.cross_entropy)
        opt = torch.optim.SGD(search.weight_parameters(), lr=0.05)
        for epoch, (support, query) in enumerate(steps):
            if search.active:
                search.step(support, query, epoch)
            else:
                opt.zero_grad()
                F.cross_entropy(model(support[0]), support[1]).backward()
            opt.step()
            search.after_step(epoch)
        search.finalize(len(steps))
        result = {"alpha": [a.tolist() for a in search.alphas],
                  "genotype": search.genotype().to_dict()}
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for support, _ in steps:
            opt.zero_grad()
            F.cross_entropy(model(support[0]), support[1]).backward()
            opt.step()
        result = {}
    result["weights"] = {k: v.tolist() for k, v in net.state_dict().items()
                         if v.is_floating_point()}
    with open(f"{out}.rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
