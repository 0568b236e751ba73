"""``metapool data prepare``: (generated default or ImageNet subset) -> manifest -> .beton files."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from data_pipelines.betons import (
    UnreadableImages,
    check_images,
    encode_cost,
    screen_image,
    write_betons,
)
from data_pipelines.config import DataConfig
from data_pipelines.manifest import build_subset, split_meta
from data_pipelines.prepared import MANIFEST, REPORT, write_manifest
from data_pipelines.synthetic import generate
from metapool.io import atomic_write_text


def _source(out: Path, cfg: DataConfig) -> Path:
    if cfg.imagenet_root:
        return Path(cfg.imagenet_root).expanduser()
    d = cfg.default
    return generate(out / "generated", classes=d.classes, train_per_class=d.train_per_class,
                    val_per_class=d.val_per_class, size=d.size, seed=cfg.seed,
                    workers=cfg.writer.workers)


def estimate(out: str | Path, cfg: DataConfig, sample: int = 64) -> dict:
    """What ``prepare`` would cost, before it writes anything: the image count from a scan of
    the folder, and from a seeded sample screened (``screen_image``) and decoded and encoded as
    the writer would (``betons.encode_cost``) in one process, the seconds and bytes per image,
    extrapolated to the whole set on ``cfg.writer.workers`` processes."""
    records = build_subset(_source(Path(out), cfg), cfg.classes, cfg.train_per_class,
                           cfg.val_per_class, cfg.seed, cfg.class_list or None)
    rng = np.random.default_rng(cfg.seed)
    picked = [records[i] for i in sorted(rng.choice(len(records), min(sample, len(records)),
                                                    replace=False))]
    start = time.perf_counter()
    readable = [r for r in picked if screen_image(r.path) is None]
    check_s = (time.perf_counter() - start) / len(picked)
    result = {"images": len(records), "sample": len(picked),
              "sample_unreadable": len(picked) - len(readable), "workers": cfg.writer.workers,
              "screen_s_per_image": check_s,
              "screen_hours": len(records) * check_s / cfg.writer.workers / 3600}
    if importlib.util.find_spec("ffcv") is not None and readable:
        write_s, per_image = encode_cost(readable, cfg.writer)
        result.update(write_s_per_image=write_s, bytes_per_image=per_image,
                      write_hours=len(records) * write_s / cfg.writer.workers / 3600,
                      disk_gb=len(records) * per_image / 1e9)
    return result


def _duration(hours: float) -> str:
    seconds = hours * 3600
    return f"{hours:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" \
        if seconds >= 60 else f"{seconds:.0f} s"


def format_estimate(e: dict) -> str:
    """The estimate as the lines ``metapool data prepare --estimate`` prints."""
    lines = [f"images: {e['images']:,} ({e['sample']} sampled, {e['sample_unreadable']} of them "
             "unreadable)",
             f"checking headers: {e['screen_s_per_image'] * 1000:.2f} ms per image "
             f"per process -> {_duration(e['screen_hours'])} on {e['workers']} workers"]
    if "write_hours" in e:
        lines += [f"writing the .beton files (decode once, resize, encode): "
                  f"{e['write_s_per_image'] * 1000:.1f} ms per image "
                  f"per process -> {_duration(e['write_hours'])} on {e['workers']} workers",
                  f"disk: {e['bytes_per_image'] / 1024:.1f} KB per image -> "
                  f"{e['disk_gb']:.2f} GB for train + meta + val"]
    else:
        lines.append("writing: FFCV is not installed, no .beton estimate")
    return "\n".join(lines)


def data_id(records: list, cfg: DataConfig) -> str:
    """Identity of a prepared dataset: which files, in which split and class, prepared with
    which settings (a training checkpoint records it, and resumes only on the same data; the
    code that wrote it is in the checkpoint's own fingerprint). Files rewritten in place under
    the same names are not seen."""
    what = {"records": [(r.path, r.split, r.label) for r in records],
            "config": cfg.model_dump(mode="json", exclude={"loader", "out_dir"})}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def prepare(out: str | Path, cfg: DataConfig) -> dict:
    """Write ``manifest.csv``, ``train/meta/val.beton`` and ``report.json`` into ``out``.

    Unreadable files are dropped (screened before writing, or caught while the writer decodes
    each image once: then the .beton files are written again without them), the meta split is
    drawn from the readable train images, and the manifest records the split of every image
    written.
    """
    out = Path(out)
    root = _source(out, cfg)
    records = build_subset(root, cfg.classes, cfg.train_per_class, cfg.val_per_class, cfg.seed,
                           cfg.class_list or None)
    good, skipped = check_images(records, cfg.writer.workers)
    if importlib.util.find_spec("ffcv") is None:  # e.g. the GPU check's machine
        print("FFCV is not installed: wrote the manifest only; train with "
              "data.loader.backend=torchvision (or install FFCV for the .beton files)", flush=True)
        good = split_meta(good, cfg.meta_split, cfg.seed)
        counts = {split: sum(r.split == split for r in good) for split in ("train", "meta", "val")}
    else:
        while True:
            split = split_meta(good, cfg.meta_split, cfg.seed)
            try:
                counts = write_betons(split, out, cfg.writer)
                break
            except UnreadableImages as exc:
                print(f"{exc}; writing the .beton files again without them", flush=True)
                skipped += [{"path": r.path, "split": r.split, "reason": exc.failures[r.path]}
                            for r in good if r.path in exc.failures]
                good = [r for r in good if r.path not in exc.failures]
        good = split
    write_manifest(good, out / MANIFEST)
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
        "data_id": data_id(good, cfg),
    }
    atomic_write_text(out / REPORT, json.dumps(report, indent=2) + "\n")
    return report
