"""ImageNet (ILSVRC2012 layout) scanning, seeded subsets and manifests.

Layout: ``ROOT/train/<wnid>/*.JPEG``; ``ROOT/val/`` either in class folders
(``val/<wnid>/*.JPEG``) or flat (``val/ILSVRC2012_val_00000001.JPEG``) with a ground-truth
file: ``LOC_val_solution.csv`` (ImageId,PredictionString), ``val_labels.txt`` (``file wnid``
per line), or the devkit's ``ILSVRC2012_validation_ground_truth.txt`` with its ``meta.mat``.
The manifest (``data_pipelines.prepared``) lists the readable images (path, label, wnid, split:
train, meta or val) that ``metapool data prepare`` wrote to the .beton files; no image is
copied. It is the one record of the meta split: everything that needs the splits reads them
back from it.
"""
from __future__ import annotations

import csv
import random
from dataclasses import replace
from pathlib import Path

from data_pipelines.prepared import Record

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
GROUND_TRUTH_FILES = ("LOC_val_solution.csv", "val_labels.txt",
                      "ILSVRC2012_validation_ground_truth.txt")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} does not exist: point data.imagenet_root at an "
                                "ILSVRC2012 folder with train/ and val/")


def scan_train(root: Path) -> dict[str, list[Path]]:
    """wnid -> sorted image paths under ``root/train``."""
    train = root / "train"
    _require_dir(root, "ImageNet root")
    _require_dir(train, "train folder")
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {train}: expected train/<wnid>/*.JPEG")
    out = {}
    for folder in classes:
        images = _images(folder)
        if not images:
            raise FileNotFoundError(f"class folder {folder} has no images (*.JPEG): remove it or "
                                    "restore its images")
        out[folder.name] = images
    return out


def _read_ground_truth(val: Path, root: Path) -> dict[str, str]:
    """Flat val folder: file stem -> wnid, from whichever ground-truth file is present."""
    for base in (val, root):
        for name in GROUND_TRUTH_FILES:
            path = base / name
            if not path.is_file():
                continue
            if name.endswith(".csv"):
                with path.open() as fh:
                    return {row["ImageId"]: row["PredictionString"].split()[0]
                            for row in csv.DictReader(fh)}
            if name == "val_labels.txt":
                pairs = (line.split() for line in path.read_text().splitlines() if line.strip())
                return {Path(f).stem: w for f, w in pairs}
            return _devkit_ground_truth(path)
    raise FileNotFoundError(f"flat val folder {val} has no ground-truth file: add one of "
                            f"{', '.join(GROUND_TRUTH_FILES)} or sort val/ into class folders")


def _devkit_ground_truth(path: Path) -> dict[str, str]:
    from scipy.io import loadmat

    meta = path.with_name("meta.mat")
    if not meta.is_file():
        raise FileNotFoundError(f"{path} needs the devkit's {meta} to map ILSVRC2012 ids to wnids")
    synsets = loadmat(meta, squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    ids = [int(line) for line in path.read_text().split()]
    return {f"ILSVRC2012_val_{i:08d}": id_to_wnid[v] for i, v in enumerate(ids, start=1)}


def scan_val(root: Path) -> dict[str, list[Path]]:
    """wnid -> sorted image paths under ``root/val`` (class folders or flat + ground truth)."""
    val = root / "val"
    _require_dir(val, "val folder")
    folders = sorted(p for p in val.iterdir() if p.is_dir())
    if folders:
        return {f.name: _images(f) for f in folders}
    images = _images(val)
    if not images:
        raise FileNotFoundError(f"val folder {val} has no images")
    truth = _read_ground_truth(val, root)
    out: dict[str, list[Path]] = {}
    for image in images:
        if image.stem not in truth:
            raise ValueError(f"{image} has no entry in the val ground truth")
        out.setdefault(truth[image.stem], []).append(image)
    return out


def read_class_list(path: str | Path) -> list[str]:
    """One wnid per line (e.g. the common ImageNet-100 list); '#' starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} does not exist")
    return [line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip()]


def build_subset(root: str | Path, classes: int | None = None, train_per_class: int | None = None,
                 val_per_class: int | None = None, seed: int = 0,
                 class_list: str | Path | None = None) -> list[Record]:
    """Select classes and images deterministically from ``seed``; ``None`` means no limit."""
    root = Path(root)
    train, val = scan_train(root), scan_val(root)
    wnids = sorted(train)
    rng = random.Random(seed)
    if class_list:
        chosen = read_class_list(class_list)
        unknown = [w for w in chosen if w not in train]
        if unknown:
            raise ValueError(f"class list names wnids not in {root / 'train'}: {unknown[:5]}")
    elif classes is not None and classes < len(wnids):
        chosen = rng.sample(wnids, classes)
    else:
        chosen = wnids
    chosen = sorted(chosen)
    records = []
    for label, wnid in enumerate(chosen):
        for split, pool, limit in (("train", train[wnid], train_per_class),
                                   ("val", val.get(wnid, []), val_per_class)):
            picked = sorted(rng.sample(pool, limit)) if limit is not None and limit < len(pool) else pool
            records += [Record(str(p), label, wnid, split) for p in picked]
    return records


def split_meta(records: list[Record], fraction: float, seed: int) -> list[Record]:
    """Hold out ``fraction`` of every class's train images as the meta split (split ``meta``),
    in place in the list's order; disjoint from train and fixed by ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.meta_split={fraction} must lie in (0, 1)")
    rng = random.Random(seed + 1)
    by_class: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        if r.split == "train":
            by_class.setdefault(r.label, []).append(i)
    held: set[int] = set()
    for label in sorted(by_class):
        positions = by_class[label]
        n_meta = max(1, round(len(positions) * fraction)) if len(positions) > 1 else 0
        held |= {positions[k] for k in rng.sample(range(len(positions)), n_meta)}
    return [replace(r, split="meta") if i in held else r for i, r in enumerate(records)]
