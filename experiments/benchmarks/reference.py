"""The machine's reference rate: plain-torch MobileNetV2 training on synthetic tensors.

    python -m experiments.benchmarks.reference            # 48 px, batch 64, 2 threads

Machines differ about 3x in speed, so every wall time this project reports comes with this rate
measured beside it: timm's ``mobilenetv2_100`` (10 classes), channels_last, AdamW, forward +
backward + step on one fixed random batch, no data loading, median of the timed steps. It takes
a few seconds. ``make repro`` prints it before ``dvc repro``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F


def reference_rate(img_size: int = 48, batch: int = 64, threads: int = 2, steps: int = 20,
                   warmup: int = 3) -> dict:
    """Images/s of plain MobileNetV2 training steps (median step), with the settings used."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = timm.create_model("mobilenetv2_100", num_classes=10).to(
            memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 3, img_size, img_size, generator=gen).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=gen)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {"reference_images_per_s": round(batch / statistics.median(times), 1),
            "model": "mobilenetv2_100", "img_size": img_size, "batch": batch,
            "threads": threads, "steps": steps}


def describe(rate: dict) -> str:
    """One line: the rate and what it measured."""
    return (f"reference rate: {rate['reference_images_per_s']:.0f} images/s (plain MobileNetV2 "
            f"training, {rate['img_size']} px, batch {rate['batch']}, channels_last, "
            f"{rate['threads']} threads, synthetic tensors)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rate = reference_rate(args.img_size, args.batch, args.threads, args.steps)
    print(json.dumps(rate) if args.json else describe(rate), flush=True)


if __name__ == "__main__":
    main()
