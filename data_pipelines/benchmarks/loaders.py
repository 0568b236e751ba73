"""Benchmark: loader images/s per core on ImageNet-like JPEGs - FFCV, torchvision, the limit.

    python -m data_pipelines.benchmarks.loaders                    # the corpus under data/bench/
    python -m data_pipelines.benchmarks.loaders --data DIR         # a prepared dataset instead

By default it generates the ImageNet-like corpus (``data_pipelines.corpus``: 3,000 JPEGs, mostly
500 x 375) under ``data/bench/corpus`` and prepares it (``metapool data prepare``'s code, with
``--max-resolution`` R and ``--compress`` C) under ``data/bench/prepared-R-C``, once: both are
reused.

For each ``--sizes`` (training: random resized crop + flip) and ``--eval-size`` (evaluation:
centre crop of 224/256 of the shorter side, resized), four ways to produce the same images:

- ``ffcv``: the suite's FFCV loader over the .beton (stored JPEGs and raw pixels, at most
  ``max_resolution``): its uint8 batches as they leave the loader (training normalises them on
  the GPU, after the copy: not loader work);
- ``torchvision``: timm's transforms on the original files in DataLoader workers;
- ``limit_beton``: the .beton's stored images decoded by libjpeg-turbo (PIL; ``draft()``, its
  scaled decode, where the crop is at least twice the output) and cropped and resized by PIL
  (same filter) and flipped, in a plain loop with no framework: the bound for ``ffcv``;
- ``limit_files``: the same on the original files: the bound for ``torchvision``;
- ``decode_only_beton`` (training): the .beton's stored JPEGs decoded by a plain turbojpeg call
  (FFCV's own binding of ``tjDecompress2``, full size) and its raw images copied, nothing else:
  the floor under any crop, resize or framework.

Both loaders run with ``--workers`` workers (FFCV threads, torchvision processes; default 1)
and the limits in this one process. Per core means per CPU-second: every epoch's images are
divided by the CPU time this process (all its threads: FFCV decodes in one thread while the
main thread normalises the previous batch) and its live children (the DataLoader workers)
spent in it, read from ``/proc``; images/s of wall time are printed too. Each way runs one
warm-up epoch (FFCV compiles its pipeline there), then ``--epochs`` epochs, taking turns; the
best epoch counts. One JSON line per phase and size.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipelines.loaders import (
    RATIO,
    VAL_RATIO,
    LoaderConfig,
    ffcv_stream,
    torchvision_stream,
)
from data_pipelines.prepared import read_manifest

FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def cpu_seconds() -> float:
    """CPU seconds spent so far by this process (all threads) and its live child processes."""
    total = time.process_time()
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:  # parent pid; then utime and stime in clock ticks
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _rates(stream: Iterable) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one pass over ``stream``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    n = 0
    for item in stream:
        n += item[0].shape[0] if isinstance(item, tuple) else 1
    return n / (time.perf_counter() - wall), n / (cpu_seconds() - cpu)


def crop_resize(img: Image.Image, box: tuple[float, float, float, float], size: int,
                resample: int) -> Image.Image:
    """``box`` of ``img`` resized to ``size`` x ``size``; a JPEG not yet loaded is decoded at
    the smallest DCT scale (1/2, 1/4, 1/8) that keeps the crop at least ``size`` pixels."""
    x0, y0, x1, y1 = box
    shrink = min(x1 - x0, y1 - y0) / size
    if img.format == "JPEG" and shrink >= 2:
        width, height = img.size
        img.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
        fx, fy = img.width / width, img.height / height
        box = (x0 * fx, y0 * fy, min(x1 * fx, img.width), min(y1 * fy, img.height))
    return img.convert("RGB").resize((size, size), resample, box=box)


def _train_box(img: Image.Image, cfg: LoaderConfig) -> tuple[int, int, int, int]:
    from torchvision.transforms import RandomResizedCrop

    top, left, h, w = RandomResizedCrop.get_params(img, list(cfg.scale), list(RATIO))
    return left, top, left + w, top + h


def _centre_box(img: Image.Image, cfg: LoaderConfig) -> tuple[float, float, float, float]:
    side = min(img.width, img.height) * VAL_RATIO
    x0, y0 = (img.width - side) / 2, (img.height - side) / 2
    return x0, y0, x0 + side, y0 + side


def _limit(images: Callable[[], Iterable[Image.Image]], train: bool, cfg: LoaderConfig):
    """The decode + crop + resize (+ flip) loop with no framework, over ``images()``."""
    resample = FILTERS[cfg.interpolation]
    box = _train_box if train else _centre_box

    def run():
        for img in images():
            out = crop_resize(img, box(img, cfg), cfg.img_size, resample)
            if train and np.random.rand() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
            yield np.asarray(out)
    return run


def _stored(path: str | Path) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
    """A .beton's image metadata (mode, height, width, data_ptr) and a reader of sample i's
    stored bytes, from the memory-mapped file and its allocation table."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    data = np.memmap(str(path), np.uint8, mode="r")
    size_at = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist(),
                       strict=True))
    meta = reader.metadata["f0"]  # the image field

    def read(i: int) -> np.ndarray:
        ptr = int(meta[i]["data_ptr"])
        return np.asarray(data[ptr: ptr + size_at[ptr]])
    return meta, read


def beton_images(path: str | Path) -> Callable[[], Iterable[Image.Image]]:
    """The images a .beton stores, as FFCV's decoder reads them: JPEG bytes (opened lazily, so
    ``crop_resize`` may draft them) or raw pixels, in a random order."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    meta, read = _stored(path)

    def images():
        for i in np.random.permutation(len(meta)):
            m, raw = meta[i], read(i)
            if m["mode"] == IMAGE_MODES["jpg"]:
                yield Image.open(io.BytesIO(raw.tobytes()))
            else:
                h, w = int(m["height"]), int(m["width"])
                yield Image.fromarray(raw[: h * w * 3].reshape(h, w, 3))
    return images


def decode_only(path: str | Path) -> Callable[[], Iterable[np.ndarray]]:
    """Each stored image of a .beton decoded by libjpeg-turbo into a buffer (a raw one copied),
    in a random order: no crop, no resize, no Python imaging object."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode

    meta, read = _stored(path)
    buffer = np.empty(int((meta["height"].astype(np.int64) * meta["width"]).max()) * 3, np.uint8)

    def images():
        for i in np.random.permutation(len(meta)):
            m, raw = meta[i], read(i)
            h, w = int(m["height"]), int(m["width"])
            if m["mode"] == IMAGE_MODES["jpg"]:
                imdecode(raw, buffer, h, w, h, w, 0, 0, 1, 1, False, False)
            else:
                buffer[: raw.size] = raw
            yield buffer
    return images


def file_images(paths: list[str]) -> Callable[[], Iterable[Image.Image]]:
    """The original files, opened lazily, in a random order."""
    def images():
        for i in np.random.permutation(len(paths)):
            yield Image.open(paths[i])
    return images


def prepared_corpus(root: Path, classes: int, train_per_class: int, val_per_class: int,
                    max_resolution: int, compress: float) -> Path:
    """The ImageNet-like corpus under ``root/corpus`` prepared with these writer settings under
    ``root/prepared-{max_resolution}-{compress}`` (each made once; again if its spec changes)."""
    from data_pipelines.config import DataConfig
    from data_pipelines.corpus import generate_corpus
    from data_pipelines.prepare import prepare

    corpus = generate_corpus(root / "corpus", classes, train_per_class, val_per_class)
    out = root / f"prepared-{max_resolution}-{compress:g}"
    cfg = DataConfig(imagenet_root=str(corpus), out_dir=str(out),
                     writer={"max_resolution": max_resolution, "compress_probability": compress})
    report = out / "report.json"
    done = json.loads(report.read_text()) if report.is_file() else {}
    if (done.get("writer"), done.get("root")) != (cfg.writer.model_dump(), str(corpus)):
        prepare(out, cfg)
    return out


def measure(data: Path, train: bool, cfg: LoaderConfig, epochs: int,
            randaugment: str = "") -> dict:
    """One JSON row: images/s per core of each way, for the train or the val split."""
    split = "train" if train else "val"
    records = [r for r in read_manifest(data / "manifest.csv") if r.split == split]
    beton = data / f"{split}.beton"
    tv_cfg = replace(cfg, randaugment=randaugment if train else "")
    ways: dict[str, Callable[[], Iterable]] = {
        "ffcv": ffcv_stream(str(beton), train, cfg, drop_last=False).loader.__iter__,
        "torchvision": torchvision_stream(records, train, tv_cfg, drop_last=False).__iter__,
        "limit_beton": _limit(beton_images(beton), train, cfg),
        "limit_files": _limit(file_images([r.path for r in records]), train, cfg),
    }
    if train:
        ways["decode_only_beton"] = decode_only(beton)
    if train and randaugment:
        ra_cfg = replace(cfg, randaugment=randaugment)
        # the batched RandAugment and the normalisation, here on the CPU (the batch's device)
        ways["ffcv_randaugment"] = ffcv_stream(str(beton), True, ra_cfg, drop_last=False).__iter__
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for epoch in range(epochs + 1):
        for name, way in ways.items():
            rate = _rates(way())
            if epoch:  # epoch 0 warms up
                rates[name].append(rate)
    wall = {name: max(w for w, _ in r) for name, r in rates.items()}
    per_core = {name: max(c for _, c in r) for name, r in rates.items()}
    row = {"phase": split, "img_size": cfg.img_size, "images": len(records),
           "workers": cfg.workers, "batch": cfg.batch_size, "interpolation": cfg.interpolation,
           "randaugment": (randaugment or None) if train else None}
    row.update({f"{name}_img_per_cpu_s": round(v, 1) for name, v in per_core.items()})
    row.update({f"{name}_img_s": round(v, 1) for name, v in wall.items()})
    row["ffcv_over_torchvision"] = round(per_core["ffcv"] / per_core["torchvision"], 2)
    row["limit_beton_over_ffcv"] = round(per_core["limit_beton"] / per_core["ffcv"], 2)
    if "decode_only_beton" in per_core:
        row["decode_only_over_ffcv"] = round(per_core["decode_only_beton"] / per_core["ffcv"], 2)
    row["limit_files_over_torchvision"] = round(
        per_core["limit_files"] / per_core["torchvision"], 2)
    if "ffcv_randaugment" in per_core:
        row["randaugment_cost"] = round(per_core["ffcv"] / per_core["ffcv_randaugment"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help="a prepared dataset (default: the corpus)")
    ap.add_argument("--bench-dir", default="data/bench", help="where the corpus is made")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=250)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--max-resolution", type=int, default=256)
    ap.add_argument("--compress", type=float, default=0.5)
    ap.add_argument("--sizes", default="160,192,224", help="training output sizes")
    ap.add_argument("--eval-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--interpolation", default="bicubic", choices=sorted(FILTERS))
    ap.add_argument("--randaugment", default="", help="e.g. rand-m9-mstd0.5 (training only)")
    args = ap.parse_args()
    data = Path(args.data) if args.data else prepared_corpus(
        Path(args.bench_dir).resolve(), args.classes, args.train_per_class, args.val_per_class,
        args.max_resolution, args.compress)
    torch.set_num_threads(1)
    np.random.seed(0)
    torch.manual_seed(0)
    base = dict(batch_size=args.batch, workers=args.workers, scale=(0.08, 1.0), seed=0,
                distributed=False, channels_last=False, device="cpu",
                interpolation=args.interpolation, randaugment="")
    for size in (int(s) for s in args.sizes.split(",") if s):
        print(json.dumps(measure(data, True, LoaderConfig(img_size=size, **base), args.epochs,
                                 args.randaugment)), flush=True)
    if args.eval_size:
        print(json.dumps(measure(data, False, LoaderConfig(img_size=args.eval_size, **base),
                                 args.epochs)), flush=True)


if __name__ == "__main__":
    main()
