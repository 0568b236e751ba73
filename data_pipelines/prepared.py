"""The on-disk format of a prepared dataset, the one module its writer (``prepare``) and its
readers (``loaders``, the report) share: the folder holds ``report.json`` (counts, skipped
files, ``data_id``), ``manifest.csv`` (every image written: path, label, wnid, split) and one
FFCV file per split, ``SPLIT.beton``.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from metapool.io import atomic_path

# train | meta (held out of train for PMPL's alpha) | val
SPLITS = ("train", "meta", "val")
REPORT, MANIFEST = "report.json", "manifest.csv"


@dataclass(frozen=True)
class Record:
    """One image of a prepared dataset."""

    path: str
    label: int
    wnid: str
    split: str  # one of SPLITS


def beton_path(data_dir: str | Path, split: str) -> Path:
    """The FFCV file of ``split`` in a prepared dataset's folder."""
    return Path(data_dir) / f"{split}.beton"


def write_manifest(records: list[Record], path: str | Path) -> None:
    """CSV with columns path,label,wnid,split (written atomically)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "wnid", "split"])
        for r in records:
            writer.writerow([r.path, r.label, r.wnid, r.split])


def read_manifest(path: str | Path) -> list[Record]:
    """The records of a manifest written by ``write_manifest``."""
    with Path(path).open() as fh:
        return [Record(r["path"], int(r["label"]), r["wnid"], r["split"])
                for r in csv.DictReader(fh)]


def read_report(data_dir: str | Path) -> dict:
    """``report.json`` of a prepared dataset, or a one-line error saying how to make one."""
    path = Path(data_dir) / REPORT
    if not path.is_file():
        raise FileNotFoundError(f"prepared dataset {data_dir} not found: run `dvc repro data` "
                                f"or `metapool data prepare --out {data_dir}` first")
    return json.loads(path.read_text())


def load_rgb(path: str) -> Image.Image:
    """Decode any image PIL understands (whatever its extension says) as RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")
