"""Benchmark: what the enhancers cost in time, before and after the fast ops, side by side.

    python -m experiments.benchmarks.enhancers                       # the table
    python -m experiments.benchmarks.enhancers --profile searchable  # + torch.profiler per op

For each model (the baseline, the searchable model, adapted models with a uniform or a top-2
genotype) it measures, in one process, alternating the two implementations so that machine
noise hits them alike:

- CPU batch-1 latency at 224 px (median of ``--repeats``);
- CPU training images/s (forward + backward + SGD step, ``--train-size`` px, ``--batch``).

"plain" is the implementation this suite had before (commit bb45dea): torch's ``nn.MaxPool2d``
and ``nn.AvgPool2d`` per candidate, a Python weighted sum, NCHW activations, BatchNorm unfolded.
"fast" is the current one: ``metapool.ops`` (separable and shared pools, the box mean's
self-adjoint backward), ``weighted_sum``, channels_last, BatchNorm folded for inference
(``metapool.deploy.deployable``). Outputs are the same numbers (tests/test_ops.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from metapool.deploy import deployable as deployed
from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer
from metapool.models import build_model, slot_names
from metapool.ops import CANDIDATES, DEFAULT_CANDIDATES
from metapool.profile import count_macs

POOLS = tuple(n for n in DEFAULT_CANDIDATES if "pool_" in n)


def _plain_combine(self, x: torch.Tensor) -> torch.Tensor:
    if isinstance(self, MetaPoolEnhancer) and not self.frozen:
        w = F.softmax(self.alpha, dim=0).to(x.dtype)
        out = w[0] * self.plain_ops[0](x)
        for wi, op in zip(w[1:], self.plain_ops[1:], strict=True):
            out = out + wi * op(x)
        return out
    idx = self.chosen if isinstance(self, MetaPoolEnhancer) else range(len(self.ops))
    out = self.plain_ops[idx[0]](x)
    for i in idx[1:]:
        out = out + self.plain_ops[i](x)
    return out


def plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing its enhancers the way the suite did before the fast ops."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, (MetaPoolEnhancer, FixedEnhancer)):
            names = m.candidates if isinstance(m, MetaPoolEnhancer) else m.op_names
            ops = []
            for name, op in zip(names, m.ops, strict=True):
                k = CANDIDATES[name].extent
                ops.append(nn.MaxPool2d(k, 1, k // 2) if name.startswith("max_pool") else
                           nn.AvgPool2d(k, 1, k // 2, count_include_pad=True)
                           if name.startswith("avg_pool") else op)
            object.__setattr__(m, "plain_ops", ops)  # not submodules: the state dict is unchanged
            m._combine = types.MethodType(_plain_combine, m)
    return model


def genotypes(seed: int = 0) -> dict[str, dict]:
    """The models of the table: builder arguments by row name."""
    layers = slot_names("mobilenetv2_100")
    rng = random.Random(seed)

    def top2(pool: tuple[str, ...]) -> dict:
        return {"layers": [{"layer": n, "ops": rng.sample(pool, 2)} for n in layers],
                "candidates": list(pool), "split_ratio": 1.0}

    return {
        "mobilenetv2_100 (baseline)": {"enhancer": "none"},
        "searchable, 8 candidates": {"enhancer": "search"},
        "all strip_pool (the reference code's genotype)": {"enhancer": "fixed",
                                                            "fixed_op": "strip_pool"},
        "all max_pool_3x3": {"enhancer": "fixed", "fixed_op": "max_pool_3x3"},
        "top-2, pooling only (seeded draw)": {"enhancer": "fixed", "genotype": top2(POOLS)},
        "top-2, any candidate (seeded draw)": {"enhancer": "fixed",
                                               "genotype": top2(DEFAULT_CANDIDATES)},
    }


def _latency(model: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        return (time.perf_counter() - start) * 1000


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def measure(name: str, args: dict, opts: argparse.Namespace) -> dict:
    """Latency and training throughput of one model, plain and fast, interleaved."""
    torch.manual_seed(0)
    model = build_model("mobilenetv2_100", num_classes=1000, **args).eval()
    cl = torch.channels_last
    infer = {"plain": plain(model).eval(), "fast": deployed(model)}
    x224 = {"plain": torch.randn(1, 3, 224, 224)}
    x224["fast"] = x224["plain"].contiguous(memory_format=cl)
    lat: dict[str, list[float]] = {"plain": [], "fast": []}
    for i in range(opts.repeats + 3):
        for impl in ("plain", "fast"):
            t = _latency(infer[impl], x224[impl])
            if i >= 3:
                lat[impl].append(t)

    net = build_model("mobilenetv2_100", num_classes=10, **args).train()
    train = {"plain": plain(net), "fast": copy.deepcopy(net).to(memory_format=cl)}
    optims = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in train.items()}
    xt = torch.randn(opts.batch, 3, opts.train_size, opts.train_size)
    xs = {"plain": xt, "fast": xt.contiguous(memory_format=cl)}
    y = torch.randint(0, 10, (opts.batch,))
    step: dict[str, list[float]] = {"plain": [], "fast": []}
    for i in range(opts.train_steps + 2):
        for impl in ("plain", "fast"):
            t = _train_step(train[impl], optims[impl], xs[impl], y)
            if i >= 2:
                step[impl].append(t)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
           "macs_224": count_macs(model, 224)}
    for impl in ("plain", "fast"):
        row[f"latency_ms_{impl}"] = round(statistics.median(lat[impl]), 2)
        row[f"train_img_s_{impl}"] = round(opts.batch / statistics.median(step[impl]), 1)
    return row


def profile_ops(args: dict, opts: argparse.Namespace, impl: str) -> str:
    """torch.profiler's per-op table of training steps of one model."""
    from torch.profiler import profile

    net = build_model("mobilenetv2_100", num_classes=10, **args).train()
    net = plain(net) if impl == "plain" else net.to(memory_format=torch.channels_last)
    fmt = torch.contiguous_format if impl == "plain" else torch.channels_last
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    x = torch.randn(opts.batch, 3, opts.train_size, opts.train_size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (opts.batch,))
    for _ in range(2):
        _train_step(net, opt, x, y)
    with profile() as prof:
        for _ in range(3):
            _train_step(net, opt, x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="latency repeats per model")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--train-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", default="", help="comma list of row-name prefixes (default all)")
    ap.add_argument("--profile", default="", help="row-name prefix: print torch.profiler tables")
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    table = genotypes()
    if opts.profile:
        name = next(n for n in table if n.startswith(opts.profile))
        for impl in ("plain", "fast"):
            print(f"## {name}: {impl}, training step, batch {opts.batch}, {opts.train_size} px")
            print(profile_ops(table[name], opts, impl), flush=True)
        return
    wanted = [p for p in opts.models.split(",") if p]
    for name, args in table.items():
        if wanted and not any(name.startswith(p) for p in wanted):
            continue
        print(json.dumps(measure(name, args, opts)), flush=True)


if __name__ == "__main__":
    main()
