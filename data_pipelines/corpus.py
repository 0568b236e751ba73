"""An ImageNet-like JPEG corpus for benchmarks and tests (seeded; NOT ImageNet, no classes).

The embedded default's 48 px images say nothing about the cost of preparing and loading
ImageNet, whose JPEGs are about 400 x 350 on average (mostly 500 x 375 or 375 x 500, about
110 KB at the quality they were saved with). This writes JPEGs in the ILSVRC2012 layout
(``data_pipelines.synthetic.ilsvrc_files``) whose sizes follow that distribution and whose
content is noise at several scales (texture down to single pixels, so file sizes and decode
times are those of photographs, not of flat colour). Labels are arbitrary: it measures time and
bytes, never accuracy.

    python -m data_pipelines.corpus /tmp/corpus --classes 10 --train-per-class 250
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_pipelines.synthetic import ilsvrc_files, write_val_solution
from metapool.io import atomic_write_text

# (width, height) -> share of ImageNet's train images, roughly; the rest is drawn below
COMMON_SIZES = {(500, 375): 0.55, (375, 500): 0.15, (500, 333): 0.08, (333, 500): 0.04}
LARGE_SHARE = 0.02  # a few large photographs (ImageNet has some of several megapixels)
# noise octaves: (cell size in pixels, amplitude in grey levels); calibrated so that a
# 500 x 375 image is about 110 KB at quality 90
OCTAVES = ((64, 60), (16, 40), (4, 25), (1, 20))


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """A (width, height) drawn from ImageNet-like proportions."""
    u = rng.random()
    for size, share in COMMON_SIZES.items():
        if u < share:
            return size
        u -= share
    if u < LARGE_SHARE:
        side = int(rng.integers(1000, 2001))
        return (side, int(side * rng.uniform(0.6, 0.8)))
    width = int(rng.integers(200, 501))
    return (width, int(np.clip(width * rng.uniform(0.5, 1.5), 120, 500)))


def render(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Colour noise at several scales around a random mean colour."""
    img = np.zeros((height, width, 3), np.float32)
    for cell, amplitude in OCTAVES:
        grid = rng.normal(0, 1, (max(1, height // cell), max(1, width // cell), 3))
        channels = [Image.fromarray(grid[..., c].astype(np.float32)).resize(
            (width, height), Image.BICUBIC) for c in range(3)]
        img += amplitude * np.stack([np.asarray(c) for c in channels], axis=-1)
    img += rng.uniform(60, 190, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write_one(job: tuple[int, int, int, str, int]) -> tuple[str, int, int]:
    seed, label, index, path, quality = job
    rng = np.random.default_rng([seed, label, index])
    width, height = image_size(rng)
    render(rng, width, height).save(path, format="JPEG", quality=quality)
    return path, width, height


def generate_corpus(root: str | Path, classes: int = 10, train_per_class: int = 250,
                    val_per_class: int = 50, seed: int = 0, quality: int = 90,
                    workers: int = 2) -> Path:
    """Write the corpus under ``root`` (idempotent: a finished corpus is left as is)."""
    root = Path(root)
    done = root / "corpus.json"
    spec = {"classes": classes, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "seed": seed, "quality": quality}
    if done.is_file() and json.loads(done.read_text()).get("spec") == spec:
        return root
    files = ilsvrc_files(root, classes, train_per_class, val_per_class, seed)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [(seed, label, index, path, quality) for label, index, path in files]
        sizes = {path: (w, h) for path, w, h in tqdm(
            pool.map(_write_one, jobs, chunksize=16), total=len(jobs),
            desc="generating the corpus", unit="img")}
    write_val_solution(root, files, sizes.__getitem__)
    total = sum(Path(p).stat().st_size for p in sizes)
    atomic_write_text(done, json.dumps({
        "spec": spec, "images": len(sizes), "bytes": total,
        "note": "ImageNet-like sizes and file sizes; generated noise, NOT ImageNet"}, indent=2) + "\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=250)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = generate_corpus(args.root, args.classes, args.train_per_class, args.val_per_class,
                           args.seed, args.quality, args.workers)
    info = json.loads((root / "corpus.json").read_text())
    print(f"wrote {root}: {info['images']} images, {info['bytes'] / info['images'] / 1024:.0f} KB "
          "per image on average")


if __name__ == "__main__":
    main()
