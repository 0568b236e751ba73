"""data_pipelines: manifests, subsets, the generated dataset, robust decoding, .beton I/O."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.betons import check_image, check_images, screen_image, write_betons
from data_pipelines.config import DataConfig, WriterConfig
from data_pipelines.loaders import build_streams, ffcv_stream, torchvision_stream
from data_pipelines.manifest import build_subset, split_meta
from data_pipelines.prepare import prepare
from data_pipelines.prepared import load_rgb, read_manifest, write_manifest
from data_pipelines.synthetic import CLASS_NAMES, generate
from tests.helpers import loader_config, stream_recipe

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
    elif val_layout == "devkit":
        # the devkit: ILSVRC2012 ids (not in wnid order) in meta.mat, one id per val image
        import numpy as np
        from scipy.io import savemat

        ids = {w: i + 1 for i, w in enumerate(reversed(WNIDS))}
        synsets = np.array([(ids[w], w) for w in WNIDS],
                           dtype=[("ILSVRC2012_ID", np.int32), ("WNID", "U9")])
        savemat(root / "meta.mat", {"synsets": synsets})
        (root / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{ids[w]}\n" for _, w in truth))
    return root


@pytest.mark.parametrize("layout", ["folders", "csv", "txt", "devkit"])
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
    marked = split_meta(records, 0.3, seed=1)
    meta = [r for r in marked if r.split == "meta"]
    train = [r for r in marked if r.split == "train"]
    assert [(r.path, r.label) for r in marked] == [(r.path, r.label) for r in records]
    assert len(train) + len(meta) == 30 and len(meta) == 9
    assert {r.label for r in meta} == {0, 1, 2}
    assert [r for r in marked if r.split == "val"] == [r for r in records if r.split == "val"]
    assert split_meta(records, 0.3, seed=1) == marked
    assert split_meta(records, 0.3, seed=2) != marked
    with pytest.raises(ValueError, match=r"data.meta_split=1.5 must lie in \(0, 1\)"):
        split_meta(records, 1.5, 0)


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


def _corrupt_huffman_table(path: Path) -> Path:
    """A JPEG whose headers parse and which ends with its end marker, but whose Huffman table
    is bogus: only a full decode finds out."""
    data = bytearray(_jpeg(path, size=(48, 40)).read_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5: table + 21] = b"\xff" * 16  # code counts that overflow the table
    path.write_bytes(bytes(data))
    return path


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
    corrupt = _corrupt_huffman_table(cls / "corrupt_data.JPEG")
    for name in ("png_as_jpeg", "cmyk", "grey"):
        assert check_image(str(cls / f"{name}.JPEG")) is None
        assert screen_image(str(cls / f"{name}.JPEG")) is None
        assert load_rgb(str(cls / f"{name}.JPEG")).mode == "RGB"
    for name in ("truncated", "empty"):  # the screen catches these without the writer
        assert screen_image(str(cls / f"{name}.JPEG")) == check_image(str(cls / f"{name}.JPEG"))
    assert "truncated" in check_image(str(cls / "truncated.JPEG")).lower()
    assert check_image(str(cls / "empty.JPEG")) == "empty file"
    # the screen does not decode: a corrupt scan with intact headers passes it ...
    assert screen_image(str(corrupt)) is None and "broken data stream" in check_image(str(corrupt))
    records = build_subset(root)
    assert not any(r.path.endswith(("notes.txt", ".DS_Store")) for r in records)
    good, skipped = check_images(records, workers=1)
    assert sorted(Path(s["path"]).name for s in skipped) == ["empty.JPEG", "truncated.JPEG"]
    # ... and the writer's single decode catches it without hanging: preparation writes the
    # .beton files again without it and lists all three
    report = prepare(tmp_path / "out", DataConfig(imagenet_root=str(root), meta_split=0.25,
                                                  writer={"workers": 1}))
    listed = json.loads((tmp_path / "out" / "report.json").read_text())["skipped_files"]
    assert report["skipped"] == 3 and listed[:2] == skipped
    assert listed[2]["path"] == str(corrupt) and "broken data stream" in listed[2]["reason"]
    readable = [r for r in good if r.path != str(corrupt)]
    assert sum(report["images"].values()) == len(records) - 3 == len(readable)
    manifest = read_manifest(tmp_path / "out" / "manifest.csv")
    assert {r.path for r in manifest} == {r.path for r in readable}
    assert {r.split: sum(m.split == r.split for m in manifest) for r in manifest} == \
        report["images"]
    assert not list((tmp_path / "out").glob(".*.tmp*"))  # the discarded .beton left nothing


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
    records = split_meta(build_subset(root), 0.25, seed=0)
    counts = write_betons(records, tmp_path / "out", WriterConfig(workers=1, max_resolution=32))
    assert counts == {"train": 18, "meta": 6, "val": 9}
    images, labels = _read_beton(tmp_path / "out" / "val.beton")
    val = [r for r in records if r.split == "val"]
    assert len(images) == 9 and [int(v) for v in labels] == [r.label for r in val]
    assert images[0].shape == (25, 32, 3)  # max_resolution 32 caps the longer side: 40x32 -> 32x25
    threads = torch.get_num_threads()
    stream = ffcv_stream(str(tmp_path / "out" / "train.beton"), True,
                         loader_config(img_size=24, batch_size=6, workers=1, seed=0))
    batches = list(stream)
    assert torch.get_num_threads() == threads
    x, y = batches[0]
    assert x.shape == (6, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < float(x.mean()) < 3 and float(x.std()) > 0.05  # normalised, not 0..255
    # the crops are seeded: a second loader with the same seed yields identical batches
    again = list(ffcv_stream(str(tmp_path / "out" / "train.beton"), True,
                             loader_config(img_size=24, batch_size=6, workers=1, seed=0)))
    for (a, _), (b, _) in zip(batches, again, strict=True):
        assert torch.equal(a, b)
    tv = list(torchvision_stream([r for r in records if r.split == "val"], False,
                                 loader_config(img_size=24, batch_size=9, workers=0)))
    assert tv[0][0].shape == (9, 3, 24, 24)


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "imagenet", "folders")
    out = tmp_path / "out"

    from ffcv.writer import DatasetWriter

    def crash(self, dataset, **kwargs):
        Path(self.fname).write_bytes(b"partial beton")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(DatasetWriter, "from_indexed_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(out, DataConfig(imagenet_root=str(root), writer={"workers": 1}))
    assert list(out.glob("*.beton")) == [] and list(out.glob(".*")) == []
    assert not (out / "report.json").exists()  # what tells the trainer the data is ready


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


@pytest.mark.parametrize("backend", ["ffcv", "torchvision"])
def test_build_streams_reads_the_splits_of_the_manifest(tmp_path, backend):
    """One function picks the backend; both read the same train/meta/val images."""
    root = make_tree(tmp_path / "imagenet", "folders", train_per_class=8, val_per_class=3)
    data = DataConfig(imagenet_root=str(root), meta_split=0.25, out_dir=str(tmp_path / "out"),
                      writer={"workers": 1}, loader={"backend": backend, "workers": 0})
    prepare(data.out_dir, data)
    manifest = read_manifest(tmp_path / "out" / "manifest.csv")
    recipe, kw = stream_recipe(img_size=16, batch_size=4, scale=(0.5, 1.0)), dict(seed=0)
    streams = build_streams(data, recipe, **kw, meta_source="heldout")
    assert type(streams.train).__name__.lower().startswith(backend)
    sizes = {name: getattr(streams, name).num_samples for name in ("train", "meta", "val")}
    assert sizes == {s: sum(r.split == s for r in manifest) for s in ("train", "meta", "val")}
    labels = sorted(int(v) for _, y in streams.val for v in y)
    assert labels == sorted(r.label for r in manifest if r.split == "val")
    assert build_streams(data, recipe, **kw).meta is None  # no search, no query stream
    leak = build_streams(data, recipe, **kw, meta_source="val").meta
    assert leak.num_samples == sizes["val"]  # the reference code's leak: alpha on val
    with pytest.raises(ValueError, match="too few for a query batch: raise data.meta_split"):
        build_streams(data, stream_recipe(img_size=16, batch_size=16), **kw, world_size=4,
                      meta_source="heldout")


def test_writer_mode_is_applied(tmp_path):
    """data.writer.write_mode reaches FFCV's RGBImageField: each image is stored in that mode."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    root = make_tree(tmp_path / "imagenet", "folders", train_per_class=4, val_per_class=1)
    records = split_meta(build_subset(root), 0.25, seed=0)
    for mode in ("raw", "jpg"):
        write_betons(records, tmp_path / mode, WriterConfig(workers=1, write_mode=mode))
        stored = Reader(str(tmp_path / mode / "train.beton")).metadata["f0"]["mode"]
        assert set(stored.tolist()) == {IMAGE_MODES[mode]}


def test_imagenet_like_corpus_has_imagenet_sizes_layout_and_bytes(tmp_path):
    from data_pipelines.corpus import generate_corpus, image_size

    sizes = [image_size(np.random.default_rng([0, 0, k])) for k in range(2000)]
    landscape = sum(s == (500, 375) for s in sizes) / len(sizes)
    assert 0.5 < landscape < 0.6 and sum(s == (375, 500) for s in sizes) > 200
    assert any(w >= 1000 for w, _ in sizes) and all(w >= 120 and h >= 120 for w, h in sizes)
    root = generate_corpus(tmp_path / "c", classes=2, train_per_class=6, val_per_class=3,
                           workers=1)
    files = sorted(root.glob("train/*/*.JPEG")) + sorted(root.glob("val/*.JPEG"))
    assert len(files) == 2 * 6 + 2 * 3
    solution = (root / "val" / "LOC_val_solution.csv").read_text().splitlines()[1:]
    for line in solution:  # the box is the whole image, as the writer recorded it
        name, rest = line.split(",")
        w, h = Image.open(root / "val" / f"{name}.JPEG").size
        assert rest.split()[3:] == [str(w - 1), str(h - 1)]
    kb = [f.stat().st_size / 1024 for f in files if Image.open(f).size == (500, 375)]
    assert kb and 70 < np.mean(kb) < 160  # ImageNet's JPEGs: about 110 KB
    again = generate_corpus(tmp_path / "d", classes=2, train_per_class=6, val_per_class=3,
                            workers=2)
    assert all(f.read_bytes() == (again / f.relative_to(root)).read_bytes() for f in files)
    cfg = DataConfig(imagenet_root=str(root), meta_split=0.25,
                     writer={"workers": 1, "max_resolution": 160})
    from data_pipelines.prepare import estimate, format_estimate
    guess = estimate(tmp_path / "out", cfg, sample=6)  # a third of it; writes nothing
    assert not (tmp_path / "out").exists() and guess["images"] == 18 and guess["sample"] == 6
    assert "disk:" in format_estimate(guess) and guess["write_s_per_image"] > 0
    report = prepare(tmp_path / "out", cfg)
    assert report["images"] == {"train": 8, "meta": 4, "val": 6}  # 2 of 6 per class held out
    from ffcv.reader import Reader
    stored = sum(int(Reader(str(tmp_path / "out" / f"{s}.beton")).alloc_table["size"].sum())
                 for s in ("train", "meta", "val"))
    # 6 images sampled stand for all 18 (the corpus's sizes vary: a looser tolerance)
    assert guess["bytes_per_image"] * 18 == pytest.approx(stored, rel=0.35)
