"""Benchmark: images/s of the FFCV and torchvision train loaders on the same images.

    python -m data_pipelines.bench_loaders --data data/prepared --img-size 224 --workers 2 \\
        --randaugment rand-m9-mstd0.5 --interpolation bicubic

Same images (the prepared train split), same output resolution, same worker count, same batch
size, same augmentation (random resized crop + flip, the interpolation, normalise). With
``--randaugment`` the FFCV path is measured twice - without and with the batched RandAugment
applied after the loader (on the CPU here: its device is the batch's) - and the torchvision
path with timm's per-image RandAugment in its workers. Each loader runs ``--epochs`` epochs
after one warm-up epoch (FFCV compiles its pipeline with numba there; torchvision starts its
workers), alternating, and the best epoch of each is reported with the ratios.
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
    ap.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic"])
    ap.add_argument("--randaugment", default="", help="e.g. rand-m9-mstd0.5")
    args = ap.parse_args()
    data = Path(args.data)
    train = [r for r in read_manifest(data / "manifest.csv") if r.split == "train"]
    torch.set_num_threads(1)
    cfg = LoaderConfig(img_size=args.img_size, batch_size=args.batch, workers=args.workers,
                       seed=0, interpolation=args.interpolation)
    ra_cfg = LoaderConfig(**{**vars(cfg), "randaugment": args.randaugment})
    streams = {"ffcv": ffcv_stream(str(data / "train.beton"), True, cfg, drop_last=False),
               "torchvision": torchvision_stream(train, True, ra_cfg, drop_last=False)}
    if args.randaugment:
        streams["ffcv_randaugment"] = ffcv_stream(str(data / "train.beton"), True, ra_cfg,
                                                  drop_last=False)
    sizes = {s.num_samples for s in streams.values()}
    assert len(sizes) == 1, "the loaders must read the same images"
    for stream in streams.values():  # warm-up
        _epoch(stream)
    rates = {name: [] for name in streams}
    for _ in range(args.epochs):
        for name, stream in streams.items():
            rates[name].append(_epoch(stream))
    result = {"images": int(sizes.pop()), "img_size": args.img_size, "batch": args.batch,
              "workers": args.workers, "interpolation": args.interpolation,
              "randaugment": args.randaugment or None}
    result.update({f"{name}_images_per_s": round(max(r), 1) for name, r in rates.items()})
    best = result.get("ffcv_randaugment_images_per_s", result["ffcv_images_per_s"])
    result["ratio_ffcv_over_torchvision"] = round(best / result["torchvision_images_per_s"], 2)
    if args.randaugment:
        result["randaugment_cost"] = round(
            result["ffcv_images_per_s"] / result["ffcv_randaugment_images_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
