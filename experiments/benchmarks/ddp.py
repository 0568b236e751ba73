"""DDP cost of PMPL's changing graph: ``find_unused_parameters=True`` against the static rebuild.

    torchrun --nproc_per_node=2 -m experiments.benchmarks.ddp                      # CPU, gloo
    torchrun --nproc_per_node=8 -m experiments.benchmarks.ddp --img-size 224 --batch 256   # a GPU node

While PMPL searches, a frozen enhancer stops using alpha and its dropped candidates, so DDP runs
with ``find_unused_parameters=True`` (one extra traversal of the autograd graph per step). Once
every layer is frozen the trainer drops those parameters from autograd and rebuilds DDP without
it. This script measures both on the same post-search MobileNetV2 (every enhancer frozen to its
top two candidates, the deadline policy), in alternating blocks in one run, and prints step time
per configuration and their ratio (rank 0).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from experiments.distributed import cleanup, init_distributed
from metapool.models import build_model, enhancers, release_unused_parameters


def _frozen_search_net(device: torch.device, static: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("mobilenetv2_100", "search").to(device)
    for _, module in enhancers(net):
        module.freeze([1, 3])  # strip_pool + max_pool_5x5: any two candidates cost alike here
    if static:
        release_unused_parameters(net)  # what the trainer does when the search ends
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="per process")
    ap.add_argument("--steps", type=int, default=10, help="per block")
    ap.add_argument("--blocks", type=int, default=3, help="alternating blocks per configuration")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = init_distributed()
    if not d.enabled:
        raise SystemExit("run under torchrun with --nproc_per_node >= 2: DDP needs several processes")
    models = {
        "find_unused_parameters=True": d.ddp(_frozen_search_net(d.device, False),
                                             find_unused_parameters=True),
        "static rebuild (find_unused_parameters=False)": d.ddp(_frozen_search_net(d.device, True)),
    }
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3,
                               momentum=0.9) for k, m in models.items()}
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=d.device)
    y = torch.randint(0, 1000, (args.batch,), device=d.device)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda")

    def step(name: str) -> None:
        opts[name].zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(models[name](x), y)
        loss.backward()
        opts[name].step()

    def sync() -> None:
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    seconds = {k: 0.0 for k in models}
    for name in models:  # warm-up (and the first-iteration bucket rebuild)
        for _ in range(3):
            step(name)
    for _ in range(args.blocks):
        for name in models:
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync()
            seconds[name] += time.perf_counter() - start
    if d.is_main:
        n = args.steps * args.blocks
        rows = {k: round(1000 * s / n, 2) for k, s in seconds.items()}
        unused, static = rows.values()
        print(json.dumps({"device": str(d.device.type), "world_size": d.world_size,
                          "img_size": args.img_size, "batch_per_process": args.batch,
                          "step_ms": rows, "find_unused_over_static": round(unused / static, 3)}))
    cleanup()


if __name__ == "__main__":
    main()
