"""Benchmark: one PMPL training step versus one baseline step, same model and batch.

    python -m experiments.benchmarks.step --img-size 64 --batch 64 --repeats 10

"Baseline step" is forward + backward + SGD step on the searchable model (alpha fixed);
"PMPL step" is ``ProgressiveMetaPooling.step`` (support + query passes, alpha update) + the same
SGD step. Both are timed alternately in one process so machine noise hits them alike; the
median ratio is the figure to read (METHOD.md: first order should cost about 2x).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import metapool  # noqa: F401
from metapool.pmpl import PMPLConfig, ProgressiveMetaPooling


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench(model_name: str, img_size: int, batch: int, repeats: int, inner_lr: float,
          order: str, threads: int, channels_last: bool = True) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model(model_name, num_classes=10).to(memory_format=fmt)
    search = ProgressiveMetaPooling(model, PMPLConfig(inner_lr=inner_lr, order=order,
                                                      alpha_lr=1e-6), F.cross_entropy)
    opt = torch.optim.SGD(search.weight_parameters(), lr=1e-4, momentum=0.9)
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    xq, yq = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    x, xq = x.contiguous(memory_format=fmt), xq.contiguous(memory_format=fmt)

    def baseline_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def pmpl_step():
        search.step((x, y), (xq, yq), epoch=0)
        opt.step()

    for _ in range(2):  # warm-up
        baseline_step()
        pmpl_step()
    base, pmpl = [], []
    for _ in range(repeats):  # interleaved, so drift affects both
        base += _time(baseline_step, 1)
        pmpl += _time(pmpl_step, 1)
    b, p = statistics.median(base), statistics.median(pmpl)
    return {"model": model_name, "img_size": img_size, "batch": batch, "threads": threads,
            "order": order, "inner_lr": inner_lr, "channels_last": channels_last,
            "baseline_step_s": round(b, 4),
            "pmpl_step_s": round(p, 4), "ratio": round(p / b, 3),
            "baseline_images_per_s": round(batch / b, 1), "pmpl_images_per_s": round(batch / p, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="metapool_mobilenetv2_100")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nchw", action="store_true", help="NCHW activations (default channels_last)")
    ap.add_argument("--configs", default="0:first,0.01:first,0.01:second",
                    help="comma list of inner_lr:order")
    args = ap.parse_args()
    for item in args.configs.split(","):
        inner, order = item.split(":")
        print(json.dumps(bench(args.model, args.img_size, args.batch, args.repeats,
                               float(inner), order, args.threads, not args.nchw)), flush=True)


if __name__ == "__main__":
    main()
