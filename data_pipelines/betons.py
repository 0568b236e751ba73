"""Records -> FFCV ``train.beton``, ``meta.beton`` and ``val.beton``.

Every image is decoded once, by the writer. Before writing, ``check_images`` screens each file
without decoding it (``screen_image``: its headers parse, and a JPEG ends with its end-of-image
marker, which a truncated download lacks); anything else - a PNG saved as .JPEG, a JPEG with no
end marker - gets a full decode there. FFCV's writer hangs when a worker raises (its main
process waits for a count that never comes), so the writer's dataset never raises: a file that
passed the screen and still fails to decode (corrupt compressed data, rare) becomes a
placeholder, is recorded, and ``write_beton`` discards that .beton and raises
``UnreadableImages``; ``prepare`` then writes again without those files. No .beton with a
placeholder is ever published. PNGs saved as .JPEG, CMYK, greyscale and palette images are
converted to RGB; unreadable, truncated or empty files are skipped (``prepare`` lists them in
``report.json``). Every .beton is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.config import WriterConfig
from data_pipelines.prepared import SPLITS, Record, beton_path, load_rgb
from metapool.io import atomic_path


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


JPEG_END = b"\xff\xd9"


def screen_image(path: str) -> str | None:
    """``check_image``'s verdict without decoding where the file allows it: a JPEG whose headers
    parse and which ends with its end-of-image marker passes undecoded (the writer decodes it,
    and catches what this cannot see); any other file is decoded in full here."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as img:
            if img.width == 0 or img.height == 0:
                return "zero-sized image"
            if img.format == "JPEG":
                with open(path, "rb") as fh:
                    fh.seek(max(0, size - 2))
                    if fh.read(2) == JPEG_END:
                        return None
    except Exception as exc:  # headers that do not parse: skip the file
        return f"{type(exc).__name__}: {exc}"
    return check_image(path)


class UnreadableImages(RuntimeError):
    """Files that passed ``screen_image`` and failed to decode while a .beton was written."""

    def __init__(self, failures: dict[str, str]) -> None:
        super().__init__(f"{len(failures)} images failed to decode while writing: "
                         + ", ".join(sorted(failures)[:3]))
        self.failures = failures


class _IndexedImages:
    """The indexable dataset FFCV's DatasetWriter reads: (RGB uint8 array, label). With
    ``failures`` (a folder), a file that fails to decode becomes a black placeholder and its
    reason is written there, so no writer worker ever raises."""

    PLACEHOLDER = np.zeros((8, 8, 3), np.uint8)

    def __init__(self, records: list[Record], failures: Path | None = None) -> None:
        self.records = records
        self.failures = failures

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        # 'proportion' mode draws np.random per image: seed it per index so the file is
        # the same whichever worker writes the image.
        np.random.seed(i)
        r = self.records[i]
        try:
            return np.asarray(load_rgb(r.path)), r.label
        except Exception as exc:  # any decoder failure: record it, never raise in the writer
            if self.failures is None:
                raise
            (self.failures / str(i)).write_text(f"{type(exc).__name__}: {exc}")
            return self.PLACEHOLDER, r.label


def _image_field(cfg: WriterConfig):
    from ffcv.fields import RGBImageField

    return RGBImageField(write_mode=cfg.write_mode, max_resolution=cfg.max_resolution,
                         compress_probability=cfg.compress_probability,
                         jpeg_quality=cfg.jpeg_quality)


def encode_cost(records: list[Record], cfg: WriterConfig) -> tuple[float, float]:
    """(seconds, bytes) per image of what ``write_beton`` does to each image - decode, resize
    to ``max_resolution``, JPEG or raw - by FFCV's own image field in this process, without
    the writer's pool start-up (paid once per .beton) and the first call's set-up."""
    field = _image_field(cfg)
    record = np.zeros(1, dtype=field.metadata_type)[0]
    stored: list[int] = []

    def malloc(n: int):
        stored.append(int(n))
        return 0, np.empty(n, np.uint8)

    images = _IndexedImages(records)
    field.encode(record, images[0][0], malloc)  # warm-up, untimed
    stored.clear()
    start = time.perf_counter()
    for i in range(len(images)):
        field.encode(record, images[i][0], malloc)
    return (time.perf_counter() - start) / len(records), sum(stored) / len(records)


def write_beton(records: list[Record], path: str | Path, cfg: WriterConfig) -> int:
    """Write one .beton atomically; returns the number of images written. Raises
    ``UnreadableImages`` (and leaves ``path`` as it was) when some image failed to decode."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    if not records:
        raise ValueError(f"no images to write to {path}: check the dataset and the subset sizes")
    fields = {"image": _image_field(cfg), "label": IntField()}
    with tempfile.TemporaryDirectory() as failed, atomic_path(path) as tmp:
        DatasetWriter(str(tmp), fields, num_workers=max(1, cfg.workers)).from_indexed_dataset(
            _IndexedImages(records, Path(failed)), chunksize=64)
        failures = {records[int(f.name)].path: f.read_text() for f in Path(failed).iterdir()}
        if failures:
            raise UnreadableImages(failures)
    return len(records)


def check_images(records: list[Record], workers: int) -> tuple[list[Record], list[dict]]:
    """Screen every image (``screen_image``: headers and end marker; a full decode only for
    files that need one): (the readable records, the skipped ones with their reason)."""
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        # one bar per phase (FFCV's writer draws its own for each .beton)
        problems = list(tqdm(pool.map(screen_image, [r.path for r in records], chunksize=256),
                             total=len(records), desc="checking headers", unit="img"))
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
                              beton_path(out_dir, name), cfg) for name in SPLITS}
