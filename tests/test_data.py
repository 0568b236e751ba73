"""data_pipelines: manifests, subsets, the generated dataset, robust decoding, .beton I/O."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import betons
from data_pipelines.betons import WriterConfig, check_image, write_betons
from data_pipelines.loaders import LoaderConfig, ffcv_stream, torchvision_stream
from data_pipelines.manifest import build_subset, meta_holdout, read_manifest, write_manifest
from data_pipelines.synthetic import CLASS_NAMES, generate

WNIDS = ["n01000001", "n01000002", "n01000003"]


def _jpeg(path: Path, colour=(200, 30, 30), size=(40, 32), mode="RGB", fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_tree(root: Path, val_layout: str, train_per_class: int = 6, val_per_class: int = 2) -> Path:
    """A tiny ILSVRC-style tree; val in class folders or flat with a ground-truth file."""
    truth = []
    n = 0
    for c, wnid in enumerate(WNIDS):
        for k in range(train_per_class):
            _jpeg(root / "train" / wnid / f"{wnid}_{k}.JPEG", colour=(40 * c, 10 * k, 100))
        for _ in range(val_per_class):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}"
            if val_layout == "folders":
                _jpeg(root / "val" / wnid / f"{name}.JPEG")
            else:
                _jpeg(root / "val" / f"{name}.JPEG")
                truth.append((name, wnid))
    if val_layout == "csv":
        (root / "val" / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n" + "".join(f"{n},{w} 1 2 3 4\n" for n, w in truth))
    elif val_layout == "txt":
        (root / "val" / "val_labels.txt").write_text("".join(f"{n}.JPEG {w}\n" for n, w in truth))
    return root


@pytest.mark.parametrize("layout", ["folders", "csv", "txt"])
def test_manifest_in_every_val_layout(tmp_path, layout):
    root = make_tree(tmp_path / "imagenet", layout)
    records = build_subset(root)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    assert len(train) == 18 and len(val) == 6
    for r in records:
        assert r.wnid == WNIDS[r.label]
        assert Path(r.path).is_file()
    # val labels come from the layout / ground truth: image n belongs to class (n-1)//2
    for r in val:
        n = int(Path(r.path).stem.split("_")[-1])
        assert r.label == (n - 1) // 2
    path = tmp_path / "manifest.csv"
    write_manifest(records, path)
    assert read_manifest(path) == records


def test_subset_is_deterministic_and_limited(tmp_path):
    root = make_tree(tmp_path / "imagenet", "folders")
    a = build_subset(root, classes=2, train_per_class=3, val_per_class=1, seed=5)
    b = build_subset(root, classes=2, train_per_class=3, val_per_class=1, seed=5)
    others = [build_subset(root, classes=2, train_per_class=3, val_per_class=1, seed=s)
              for s in range(6)]
    assert a == b
    assert len({r.wnid for r in a}) == 2
    assert sum(r.split == "train" for r in a) == 6 and sum(r.split == "val" for r in a) == 2
    assert sorted({r.label for r in a}) == [0, 1]
    assert len({tuple(r.path for r in o) for o in others}) > 1  # the seed matters


def test_class_list_file(tmp_path):
    root = make_tree(tmp_path / "imagenet", "folders")
    listing = tmp_path / "classes.txt"
    listing.write_text("# my subset\nn01000003\nn01000001  # comment\n")
    records = build_subset(root, class_list=listing)
    assert sorted({(r.label, r.wnid) for r in records}) == [(0, "n01000001"), (1, "n01000003")]


def test_meta_split_is_disjoint_and_seeded(tmp_path):
    root = make_tree(tmp_path / "imagenet", "folders", train_per_class=10)
    records = build_subset(root)
    train, meta = meta_holdout(records, 0.3, seed=1)
    assert not {r.path for r in train} & {r.path for r in meta}
    assert len(train) + len(meta) == 30 and len(meta) == 9
    assert {r.label for r in meta} == {0, 1, 2}
    assert meta_holdout(records, 0.3, seed=1) == (train, meta)
    with pytest.raises(ValueError, match=r"pmpl.meta_split=1.5 must lie in \(0, 1\)"):
        meta_holdout(records, 1.5, 0)


@pytest.mark.parametrize("what,expected", [
    ("missing", "ImageNet root .* does not exist"),
    ("no_images", "class folder .*n01000001 has no images"),
    ("no_classes", "no class folders in"),
])
def test_bad_roots_are_one_line_errors(tmp_path, what, expected):
    root = tmp_path / "imagenet"
    if what == "no_images":
        (root / "train" / "n01000001").mkdir(parents=True)
        (root / "train" / "n01000001" / "notes.txt").write_text("x")
    elif what == "no_classes":
        (root / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=expected):
        build_subset(root)


def test_gotchas_are_decoded_or_skipped(tmp_path):
    root = make_tree(tmp_path / "imagenet", "folders", train_per_class=4)
    cls = root / "train" / WNIDS[0]
    _jpeg(cls / "png_as_jpeg.JPEG", fmt="PNG")
    _jpeg(cls / "cmyk.JPEG", mode="CMYK")
    _jpeg(cls / "grey.JPEG", mode="L")
    good = _jpeg(tmp_path / "full.JPEG", size=(200, 200))
    (cls / "truncated.JPEG").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (cls / "empty.JPEG").write_bytes(b"")
    (cls / "notes.txt").write_text("a stray file")
    (cls / ".DS_Store").write_bytes(b"\x00\x01")
    for name in ("png_as_jpeg", "cmyk", "grey"):
        assert check_image(str(cls / f"{name}.JPEG")) is None
        assert betons.load_rgb(str(cls / f"{name}.JPEG")).mode == "RGB"
    assert "truncated" in check_image(str(cls / "truncated.JPEG")).lower()
    assert check_image(str(cls / "empty.JPEG")) == "empty file"
    records = build_subset(root)
    assert not any(r.path.endswith(("notes.txt", ".DS_Store")) for r in records)
    report = write_betons(records, tmp_path / "out", WriterConfig(workers=1, meta_split=0.25))
    assert report["skipped"] == 2
    assert sorted(Path(s["path"]).name for s in report["skipped_files"]) == [
        "empty.JPEG", "truncated.JPEG"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["skipped"] == 2
    assert sum(report["images"].values()) == len(records) - 2


def _read_beton(path: Path):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()],
                                                "label": [IntDecoder()]})
    images, labels = [], []
    for x, y in loader:
        images += list(x)
        labels += list(np.asarray(y).reshape(-1))
    return images, labels


def test_beton_round_trip_and_loader(tmp_path):
    root = make_tree(tmp_path / "imagenet", "csv", train_per_class=8, val_per_class=3)
    records = build_subset(root)
    report = write_betons(records, tmp_path / "out",
                          WriterConfig(workers=1, meta_split=0.25, max_resolution=32))
    assert report["images"] == {"train": 18, "meta": 6, "val": 9}
    images, labels = _read_beton(tmp_path / "out" / "val.beton")
    val = [r for r in records if r.split == "val"]
    assert len(images) == 9 and [int(v) for v in labels] == [r.label for r in val]
    assert images[0].shape == (25, 32, 3)  # max_resolution 32 caps the longer side: 40x32 -> 32x25
    threads = torch.get_num_threads()
    stream = ffcv_stream(str(tmp_path / "out" / "train.beton"), True,
                         LoaderConfig(img_size=24, batch_size=6, workers=1, seed=0))
    batches = list(stream)
    assert torch.get_num_threads() == threads
    x, y = batches[0]
    assert x.shape == (6, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < float(x.mean()) < 3 and float(x.std()) > 0.05  # normalised, not 0..255
    # the crops are seeded: a second loader with the same seed yields identical batches
    again = list(ffcv_stream(str(tmp_path / "out" / "train.beton"), True,
                             LoaderConfig(img_size=24, batch_size=6, workers=1, seed=0)))
    for (a, _), (b, _) in zip(batches, again, strict=True):
        assert torch.equal(a, b)
    tv = list(torchvision_stream([r for r in records if r.split == "val"], False,
                                 LoaderConfig(img_size=24, batch_size=9, workers=0)))
    assert tv[0][0].shape == (9, 3, 24, 24)


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "imagenet", "folders")
    records = build_subset(root)
    out = tmp_path / "out"

    from ffcv.writer import DatasetWriter

    def crash(self, dataset, **kwargs):
        Path(self.fname).write_bytes(b"partial beton")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        write_betons(records, out, WriterConfig(workers=1))
    assert list(out.glob("*.beton")) == [] and list(out.glob(".*")) == []
    assert not (out / "report.json").exists()


def test_generated_dataset_layout_and_determinism(tmp_path):
    a = generate(tmp_path / "a", classes=4, train_per_class=3, val_per_class=2, size=40, seed=3)
    b = generate(tmp_path / "b", classes=4, train_per_class=3, val_per_class=2, size=40, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.JPEG"))
    assert len(files) == 4 * 3 + 4 * 2
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "train" / "n90000000" / "n90000000_0.JPEG").is_file()
    assert (a / "val" / "ILSVRC2012_val_00000001.JPEG").is_file()
    assert "NOT IMAGENET" in (a / "README.txt").read_text()
    records = build_subset(a)  # the same code path as real ImageNet (flat val + csv)
    assert sum(r.split == "val" for r in records) == 8
    assert json.loads((a / "classes.json").read_text())["wnids"]["n90000000"] == CLASS_NAMES[0]
