"""Records -> FFCV ``train.beton``, ``meta.beton`` and ``val.beton``.

Images are validated first (``check_images``, a full decode): FFCV's writer hangs when a worker
raises (its main process waits for a count that never comes), so no file that could raise
reaches it. PNGs saved as .JPEG, CMYK, greyscale and palette images are converted to RGB;
unreadable, truncated or empty files are skipped (``prepare`` lists them in ``report.json``).
Every .beton is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.config import WriterConfig
from data_pipelines.manifest import Record
from metapool.io import atomic_path

SPLITS = ("train", "meta", "val")


def load_rgb(path: str) -> Image.Image:
    """Decode any image PIL understands (whatever its extension says) as RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def check_image(path: str) -> str | None:
    """None when ``path`` decodes to a non-empty RGB image, else the reason it does not."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        img = load_rgb(path)
        if img.width == 0 or img.height == 0:
            return "zero-sized image"
    except Exception as exc:  # any decoder failure means: skip this file
        return f"{type(exc).__name__}: {exc}"
    return None


class _IndexedImages:
    """The indexable dataset FFCV's DatasetWriter reads: (RGB uint8 array, label)."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        # 'proportion' mode draws np.random per image: seed it per index so the file is
        # the same whichever worker writes the image.
        np.random.seed(i)
        r = self.records[i]
        return np.asarray(load_rgb(r.path)), r.label


def _image_field(cfg: WriterConfig):
    from ffcv.fields import RGBImageField

    return RGBImageField(write_mode=cfg.write_mode, max_resolution=cfg.max_resolution,
                         compress_probability=cfg.compress_probability,
                         jpeg_quality=cfg.jpeg_quality)


def encode_cost(records: list[Record], cfg: WriterConfig) -> tuple[float, float]:
    """(seconds, bytes) per image of what ``write_beton`` does to each image - decode, resize
    to ``max_resolution``, JPEG or raw - by FFCV's own image field in this process, without
    the writer's pool start-up (paid once per .beton)."""
    field = _image_field(cfg)
    record = np.zeros(1, dtype=field.metadata_type)[0]
    stored: list[int] = []

    def malloc(n: int):
        stored.append(int(n))
        return 0, np.empty(n, np.uint8)

    images = _IndexedImages(records)
    start = time.perf_counter()
    for i in range(len(images)):
        field.encode(record, images[i][0], malloc)
    return (time.perf_counter() - start) / len(records), sum(stored) / len(records)


def write_beton(records: list[Record], path: str | Path, cfg: WriterConfig) -> int:
    """Write one .beton atomically; returns the number of images written."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    if not records:
        raise ValueError(f"no images to write to {path}: check the dataset and the subset sizes")
    fields = {"image": _image_field(cfg), "label": IntField()}
    with atomic_path(path) as tmp:
        DatasetWriter(str(tmp), fields, num_workers=max(1, cfg.workers)).from_indexed_dataset(
            _IndexedImages(records), chunksize=64)
    return len(records)


def check_images(records: list[Record], workers: int) -> tuple[list[Record], list[dict]]:
    """Decode every image once: (the readable records, the skipped ones with their reason)."""
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        # one bar per phase (FFCV's writer draws its own for each .beton)
        problems = list(tqdm(pool.map(check_image, [r.path for r in records], chunksize=256),
                             total=len(records), desc="validating (decode once)", unit="img"))
    skipped = [{"path": r.path, "split": r.split, "reason": p}
               for r, p in zip(records, problems, strict=True) if p is not None]
    good = [r for r, p in zip(records, problems, strict=True) if p is None]
    return good, skipped


def write_betons(records: list[Record], out_dir: str | Path, cfg: WriterConfig) -> dict[str, int]:
    """Write ``train``, ``meta`` and ``val.beton`` from readable records (``check_images``)
    of those splits; returns the image count of each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: write_beton([r for r in records if r.split == name],
                              out_dir / f"{name}.beton", cfg) for name in SPLITS}
