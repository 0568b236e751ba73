"""Benchmark: images/s of the FFCV and torchvision train loaders on the same images.

    python -m data_pipelines.bench_loaders --data data/prepared --img-size 64 --workers 2

Same images (the prepared train split), same output resolution, same worker count, same batch
size, same augmentation (random resized crop + flip + normalise). Each loader runs ``--epochs``
epochs after one warm-up epoch (FFCV compiles its pipeline with numba there; torchvision starts
its workers), alternating, and the best epoch of each is reported with the ratio.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data_pipelines.loaders import LoaderConfig, ffcv_stream, torchvision_stream
from data_pipelines.manifest import read_manifest


def _epoch(stream) -> float:
    start = time.perf_counter()
    n = sum(x.shape[0] for x, _ in stream)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    data = Path(args.data)
    train = [r for r in read_manifest(data / "manifest.csv") if r.split == "train"]
    torch.set_num_threads(1)
    cfg = LoaderConfig(img_size=args.img_size, batch_size=args.batch, workers=args.workers,
                       seed=0)
    ffcv = ffcv_stream(str(data / "train.beton"), True, cfg, drop_last=False)
    tv = torchvision_stream(train, True, cfg, drop_last=False)
    assert ffcv.num_samples == tv.num_samples, "the two loaders must read the same images"
    _epoch(ffcv), _epoch(tv)  # warm-up
    rates = {"ffcv": [], "torchvision": []}
    for _ in range(args.epochs):
        rates["ffcv"].append(_epoch(ffcv))
        rates["torchvision"].append(_epoch(tv))
    result = {"images": int(ffcv.num_samples), "img_size": args.img_size, "batch": args.batch,
              "workers": args.workers,
              "ffcv_images_per_s": round(max(rates["ffcv"]), 1),
              "torchvision_images_per_s": round(max(rates["torchvision"]), 1)}
    result["ratio"] = round(result["ffcv_images_per_s"] / result["torchvision_images_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
