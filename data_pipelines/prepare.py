"""``metapool data prepare``: (generated default or ImageNet subset) -> manifest -> .beton files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from data_pipelines.betons import check_images, write_betons
from data_pipelines.config import DataConfig
from data_pipelines.manifest import build_subset, split_meta, write_manifest
from data_pipelines.synthetic import generate
from metapool.io import atomic_write_text


def prepare(out: str | Path, cfg: DataConfig) -> dict:
    """Write ``manifest.csv``, ``train/meta/val.beton`` and ``report.json`` into ``out``.

    The images are decoded once to drop unreadable files, the meta split is drawn from the
    readable train images, and the manifest records the split of every image written.
    """
    out = Path(out)
    if cfg.imagenet_root:
        root = Path(cfg.imagenet_root).expanduser()
    else:
        d = cfg.default
        root = generate(out / "generated", classes=d.classes, train_per_class=d.train_per_class,
                        val_per_class=d.val_per_class, size=d.size, seed=cfg.seed,
                        workers=cfg.writer.workers)
    records = build_subset(root, cfg.classes, cfg.train_per_class, cfg.val_per_class, cfg.seed,
                           cfg.class_list or None)
    good, skipped = check_images(records, cfg.writer.workers)
    good = split_meta(good, cfg.meta_split, cfg.seed)
    write_manifest(good, out / "manifest.csv")
    if importlib.util.find_spec("ffcv") is None:  # e.g. the GPU check's machine
        print("FFCV is not installed: wrote the manifest only; train with "
              "data.loader.backend=torchvision (or install FFCV for the .beton files)", flush=True)
        counts = {split: sum(r.split == split for r in good) for split in ("train", "meta", "val")}
    else:
        counts = write_betons(good, out, cfg.writer)
    classes = sorted({(r.label, r.wnid) for r in good})
    report = {
        "images": counts,
        "classes": len(classes),
        "wnids": [w for _, w in classes],
        "skipped": len(skipped),
        "skipped_files": skipped,
        "writer": cfg.writer.model_dump(),
        "meta_split": cfg.meta_split,
        "seed": cfg.seed,
        "dataset": cfg.dataset_name,
        "root": str(root),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def read_report(data_dir: str | Path) -> dict:
    """``report.json`` of a prepared dataset, or a one-line error saying how to make one."""
    path = Path(data_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"prepared dataset {data_dir} not found: run `dvc repro data` "
                                f"or `metapool data prepare --out {data_dir}` first")
    return json.loads(path.read_text())
