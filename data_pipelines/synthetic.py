"""The embedded default dataset: generated images in the exact ILSVRC2012 folder layout.

THIS IS NOT IMAGENET. It is a small, deterministic stand-in so that the whole pipeline runs on a
CPU in minutes and in CI. Each class is a spatial *arrangement* of small marks (discs and
squares of random colours on a random, noisy background): a single mark looks the same in every
class, so telling classes apart needs context over several marks - the kind of information a
larger receptive field captures. Colour carries no class information.

Layout written (as ImageNet's): ``train/<wnid>/<wnid>_<k>.JPEG``; a flat
``val/ILSVRC2012_val_<n>.JPEG`` with ``LOC_val_solution.csv`` as its ground truth; plus
``README.txt`` and ``classes.json`` describing the classes. The wnids (``n9000000x``) are fake.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from metapool.io import atomic_write_text

Offsets = list[tuple[float, float]]


def _line(angle: float) -> Callable[[np.random.Generator], Offsets]:
    def offsets(rng: np.random.Generator) -> Offsets:
        a = angle + rng.uniform(-0.12, 0.12)
        return [(k * math.cos(a), k * math.sin(a)) for k in (-1, 0, 1)]
    return offsets


# class name -> layout of mark centres in units of the spacing (before jitter)
ARRANGEMENTS: dict[str, Callable[[np.random.Generator], Offsets]] = {
    "single_mark": lambda rng: [(0.0, 0.0)],
    "pair_horizontal": lambda rng: [(-0.5, 0.0), (0.5, 0.0)],
    "pair_vertical": lambda rng: [(0.0, -0.5), (0.0, 0.5)],
    "line_horizontal": _line(0.0),
    "line_vertical": _line(math.pi / 2),
    "line_diagonal": lambda rng: _line(math.pi / 4 if rng.random() < 0.5 else -math.pi / 4)(rng),
    "grid_2x2": lambda rng: [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)],
    "plus": lambda rng: [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)],
    "triangle": lambda rng: [(0.0, -0.6), (-0.6, 0.45), (0.6, 0.45)],
    "ring": lambda rng: [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 7)[:-1]],
}
CLASS_NAMES = list(ARRANGEMENTS)


def wnid(label: int) -> str:
    return f"n9{label:07d}"


def render(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One image of class ``label``: marks arranged as the class says, random everything else."""
    # Background: a random smooth gradient plus pixel noise.
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else \
        np.linspace(0, 1, size)[:, None, None]
    bg = c0 * (1 - t) + c1 * t + rng.normal(0, 8, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    spacing = rng.uniform(0.2, 0.28) * size
    radius = rng.uniform(0.06, 0.085) * size
    offsets = ARRANGEMENTS[CLASS_NAMES[label]](rng)
    extent = spacing * max(max(abs(x), abs(y)) for x, y in offsets) + radius
    # an inner border of 10% stays free of marks: random-resized crops (scale >= 0.7) and the
    # evaluation's centre crop then rarely cut a mark, which would change the class
    margin = min(extent + 1 + 0.1 * size, size / 2 - 1)
    cx, cy = rng.uniform(margin, size - margin, 2)
    for dx, dy in offsets:
        x = cx + dx * spacing + rng.normal(0, 0.04 * spacing)
        y = cy + dy * spacing + rng.normal(0, 0.04 * spacing)
        # marks contrast with the local background: pick the opposite end of the colour range
        local = bg[int(np.clip(y, 0, size - 1)), int(np.clip(x, 0, size - 1))]
        colour = tuple(int(v) for v in np.where(local > 127, rng.uniform(0, 70, 3),
                                                rng.uniform(185, 255, 3)))
        box = (x - radius, y - radius, x + radius, y + radius)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def _write_one(job: tuple[int, int, int, str, int, int]) -> None:
    seed, label, index, path, size, quality = job
    rng = np.random.default_rng([seed, label, index])
    render(label, rng, size).save(path, format="JPEG", quality=quality)


def ilsvrc_files(root: Path, classes: int, train_per_class: int, val_per_class: int,
                 seed: int) -> list[tuple[int, int, str]]:
    """(label, index, path) of every image of an ILSVRC2012-layout folder: ``train/<wnid>/``,
    then a flat ``val/`` in a seeded order of labels (indices >= 10**6). Creates the folders."""
    files = []
    for label in range(classes):
        folder = root / "train" / wnid(label)
        folder.mkdir(parents=True, exist_ok=True)
        files += [(label, k, str(folder / f"{wnid(label)}_{k}.JPEG"))
                  for k in range(train_per_class)]
    (root / "val").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 10**6])
    val_labels = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    files += [(int(label), 10**6 + n, str(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG"))
              for n, label in enumerate(val_labels, start=1)]
    return files


def write_val_solution(root: Path, files: list[tuple[int, int, str]],
                       size_of: Callable[[str], tuple[int, int]]) -> None:
    """ImageNet's ``LOC_val_solution.csv`` for the val images of ``files`` (one whole-image box;
    ``size_of(path)`` gives (width, height))."""
    rows = []
    for label, _, path in files:
        if Path(path).parent.name == "val":
            w, h = size_of(path)
            rows.append(f"{Path(path).stem},{wnid(label)} 0 0 {w - 1} {h - 1}")
    atomic_write_text(root / "val" / "LOC_val_solution.csv",
                      "ImageId,PredictionString\n" + "\n".join(rows) + "\n")


def generate(root: str | Path, classes: int = 10, train_per_class: int = 260,
             val_per_class: int = 50, size: int = 72, seed: int = 0, quality: int = 92,
             workers: int = 2) -> Path:
    """Write the dataset under ``root`` (idempotent: a finished dataset is left as is)."""
    if not 1 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"data.default.classes={classes} must lie in [1, {len(CLASS_NAMES)}]")
    root = Path(root)
    done = root / "classes.json"
    spec = {"classes": classes, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "size": size, "seed": seed, "quality": quality}
    if done.is_file() and json.loads(done.read_text()).get("spec") == spec:
        return root
    files = ilsvrc_files(root, classes, train_per_class, val_per_class, seed)
    jobs = [(seed, label, index, path, size, quality) for label, index, path in files]
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(tqdm(pool.map(_write_one, jobs, chunksize=64), total=len(jobs),
                  desc="generating the default dataset", unit="img"))
    write_val_solution(root, files, lambda path: (size, size))
    atomic_write_text(root / "README.txt", __doc__.strip() + "\n")
    atomic_write_text(done, json.dumps({
        "spec": spec,
        "wnids": {wnid(i): CLASS_NAMES[i] for i in range(classes)},
        "note": "generated stand-in, not ImageNet",
    }, indent=2) + "\n")
    return root
