"""``metapool data prepare``: (generated default or ImageNet subset) -> manifest -> .beton files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.betons import WriterConfig, write_betons
from data_pipelines.manifest import build_subset, write_manifest
from data_pipelines.synthetic import generate
from metapool.io import atomic_write_text


@dataclass
class PrepareConfig:
    imagenet_root: str | None = None
    classes: int | None = None
    train_per_class: int | None = None
    val_per_class: int | None = None
    class_list: str | None = None
    seed: int = 0
    # the generated default dataset (used when imagenet_root is empty)
    default_classes: int = 10
    default_train_per_class: int = 110
    default_val_per_class: int = 40
    default_size: int = 40


def prepare(out: str | Path, cfg: PrepareConfig, writer: WriterConfig) -> dict:
    """Write ``manifest.csv``, ``train/meta/val.beton`` and ``report.json`` into ``out``."""
    out = Path(out)
    if cfg.imagenet_root:
        root = Path(cfg.imagenet_root).expanduser()
        dataset = "imagenet" if cfg.classes is None and cfg.train_per_class is None else "imagenet-subset"
    else:
        root = generate(out / "generated", classes=cfg.default_classes,
                        train_per_class=cfg.default_train_per_class,
                        val_per_class=cfg.default_val_per_class, size=cfg.default_size,
                        seed=cfg.seed, workers=writer.workers)
        dataset = "embedded-default"
    records = build_subset(root, cfg.classes, cfg.train_per_class, cfg.val_per_class, cfg.seed,
                           cfg.class_list)
    write_manifest(records, out / "manifest.csv")
    report = write_betons(records, out, writer)
    report["dataset"] = dataset
    report["root"] = str(root)

    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report
