"""The benchmark scripts run (tiny sizes, CPU) and report finite figures; no timing asserted."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm

import metapool  # noqa: F401
from experiments.benchmarks import enhancers as bench_enhancers
from experiments.benchmarks import gpu as bench_gpu
from experiments.benchmarks import step as bench_step
from experiments.distributed import free_port
from tests.helpers import REPO, write_params


def test_step_benchmark_reports_a_ratio():
    row = bench_step.bench("metapool_mobilenetv2_100", img_size=32, batch=4, repeats=1,
                           inner_lr=0.01, order="first", threads=1)
    assert {"baseline_step_s", "pmpl_step_s", "ratio", "baseline_images_per_s",
            "pmpl_images_per_s"} <= set(row)
    # a first-order PMPL step is two passes and an alpha step: dearer than one plain step
    assert 1.0 < row["ratio"] < 20 and row["ratio"] == pytest.approx(
        row["pmpl_step_s"] / row["baseline_step_s"], rel=0.01)
    assert row["pmpl_images_per_s"] == pytest.approx(4 / row["pmpl_step_s"], rel=0.01)


def test_enhancer_benchmark_compares_the_same_computation():
    # "plain" (torch's pools, Python sum, NCHW) and "fast" must be the same model, or the
    # before/after table would compare different things
    import torch

    for name, args in bench_enhancers.genotypes().items():
        torch.manual_seed(0)
        # eval mode: train-mode BatchNorm over 2 images of 1x1 maps amplifies rounding; its
        # statistics calibrated first, or the signal fades through the freshly initialised
        # depthwise convs and the gradients are all rounding
        model = metapool.build_model("mobilenetv2_100", num_classes=10, **args)
        with torch.no_grad():
            model(torch.randn(16, 3, 64, 64))
        model.eval()
        x = torch.randn(2, 3, 64, 64)
        outputs = []
        # same layout for both: channels_last changes the convolutions' rounding, which moves
        # near-tied maxima (a layout change, not an op change)
        for net in (bench_enhancers.plain(model), model):
            out = net(x)
            out.square().sum().backward()
            outputs.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-5)
        for a, b in zip(outputs[0][1], outputs[1][1], strict=True):
            # summed over many elements: rounding relative to the gradient's scale
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
    opts = argparse.Namespace(repeats=1, train_steps=1, train_size=32, batch=2)
    row = bench_enhancers.measure("all max_pool_3x3", {"enhancer": "fixed",
                                                       "fixed_op": "max_pool_3x3"}, opts)
    for key in ("latency_ms_fast", "latency_ms_plain", "train_img_s_plain", "train_img_s_fast"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert 0.05 < row["latency_ms_fast"] / row["latency_ms_plain"] < 20  # the same model


def test_gpu_benchmark_runs_on_cpu():
    args = argparse.Namespace(device="cpu", img_size=32, batch=4, steps=1, warmup=1)
    for pmpl, name in ((False, "mobilenetv2_100"), (True, "metapool_mobilenetv2_100")):
        row = bench_gpu.bench(name, timm.create_model(name), pmpl, args, compile_model=False)
        assert row["batch"] == 4 and row["img_size"] == 32 and row["model"] == name
        assert row["images_per_s"] == pytest.approx(4000 / row["step_ms"], rel=0.02)


def test_run_time_estimate_by_hand():
    # 3.6M images, 20% held out, 2 GPUs -> 1.44M images per GPU per epoch
    est = bench_gpu.estimate_hours({"baseline": 400.0, "search": 200.0, "adapted": 320.0},
                                   epochs=10, deadline_epoch=2, gpus=2, meta_split=0.2,
                                   train_images=3_600_000)
    assert est["baseline"] == {"hours": 10.0, "gpu_hours": 20.0}  # 10 x 1.44M / 400 s
    assert est["pmpl"] == {"hours": 14.0, "gpu_hours": 28.0}  # 2 x 1.44M/200 + 8 x 1.44M/320 s


def test_gpu_benchmark_estimate_runs_end_to_end_on_cpu(tmp_path, monkeypatch, capsys):
    small = {"img_size": 32, "batch_size": 8}
    params = write_params(tmp_path / "params.yaml", tmp_path / "data", tmp_path / "runs",
                          {"recipes": {"paper": small, "standard": small,
                                       "paper-final": small}})
    monkeypatch.setattr(sys, "argv", ["bench_gpu", "--device", "cpu", "--img-size", "32",
                                      "--batch", "4", "--steps", "1", "--warmup", "1",
                                      "--no-compile", "--estimate-gpus", "2",
                                      "--params", str(params)])
    bench_gpu.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    estimates = {r["recipe"]: r for r in rows if "recipe" in r}
    assert set(estimates) == {"paper", "standard", "paper-final"}
    for r in estimates.values():
        assert r["batch_per_gpu"] == 4 and r["gpus"] == 2 and r["img_size"] == 32
        # the hours are the epochs' images over the measured rate (by hand: test above)
        ips = r["images_per_s_per_gpu"]
        assert set(ips) == {"baseline", "search", "adapted", "published"}
        assert r["baseline"]["gpu_hours"] == pytest.approx(2 * r["baseline"]["hours"], abs=0.1)
        assert 0 < r["baseline"]["hours"] < r["pmpl"]["hours"]  # a search step costs more
        assert r["published"]["hours"] > 0


def test_ddp_benchmark_runs_under_torchrun():
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "experiments.benchmarks.ddp", "--img-size", "32", "--batch", "2", "--steps", "1",
         "--blocks", "1"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    # the unused-parameter traversal costs a little, never a factor
    assert row["world_size"] == 2 and 0.5 < row["find_unused_over_static"] < 2.0


def test_loader_benchmark_runs_on_a_small_corpus(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipelines.benchmarks.loaders", "--bench-dir", str(tmp_path),
         "--classes", "2", "--train-per-class", "6", "--val-per-class", "2",
         "--max-resolution", "96", "--compress", "0.5", "--sizes", "32,48", "--eval-size", "32",
         "--batch", "4", "--epochs", "1", "--randaugment", "rand-m9-mstd0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [(r["phase"], r["img_size"]) for r in rows] == [("train", 32), ("train", 48),
                                                          ("val", 32)]
    ways = ("ffcv", "torchvision", "limit_beton", "limit_files")
    for r in rows:
        for w in ways:
            assert math.isfinite(r[f"{w}_img_per_cpu_s"]) and r[f"{w}_img_per_cpu_s"] > 0
            # a rate per CPU-second never exceeds the wall rate times the cores used
            assert r[f"{w}_img_per_cpu_s"] * os.cpu_count() >= r[f"{w}_img_s"] * 0.9
    assert rows[0]["images"] == 10 and rows[2]["images"] == 4  # 12 train less the meta split
    assert rows[0]["decode_only_beton_img_per_cpu_s"] > 0 and rows[0]["randaugment_cost"] > 0
    # the corpus was prepared with the settings asked for, where the docstring says
    report = json.loads((tmp_path / "prepared-96-0.5" / "report.json").read_text())
    assert report["writer"]["max_resolution"] == 96 and report["images"]["train"] == 10


def test_the_limit_reads_what_ffcv_reads_and_drafts_only_large_crops(tmp_path):
    from PIL import Image

    from data_pipelines.benchmarks.loaders import beton_images, crop_resize, decode_only
    from data_pipelines.config import DataConfig
    from data_pipelines.corpus import generate_corpus
    from data_pipelines.prepare import prepare
    from data_pipelines.prepared import read_manifest

    root = generate_corpus(tmp_path / "c", classes=2, train_per_class=3, val_per_class=1,
                           workers=1)
    prepare(tmp_path / "p", DataConfig(imagenet_root=str(root), meta_split=0.34,
                                       writer={"workers": 1, "max_resolution": 128,
                                               "compress_probability": 0.5}))
    # the .beton holds the manifest's train images in order, resized by FFCV's writer to at
    # most 128 px and stored as JPEG or raw: each image read is closest to its own original
    originals = [Image.open(r.path).convert("RGB")
                 for r in read_manifest(tmp_path / "p" / "manifest.csv") if r.split == "train"]
    np.random.seed(0)
    order = np.random.permutation(len(originals))
    np.random.seed(0)
    seen = [np.asarray(img.convert("RGB")).astype(int)
            for img in beton_images(tmp_path / "p" / "train.beton")()]
    np.random.seed(0)
    decoded = [b.copy() for b in decode_only(tmp_path / "p" / "train.beton")()]
    assert len(seen) == len(decoded) == len(originals) == 4
    for k, ours in enumerate(seen):
        assert max(ours.shape[:2]) == 128
        distance = [np.abs(ours - np.asarray(o.resize(ours.shape[1::-1], Image.BOX))).mean()
                    for o in originals]
        assert int(np.argmin(distance)) == order[k] and min(distance) < 12
        raw = decoded[k][: ours.size].reshape(ours.shape).astype(int)
        # the same bytes: FFCV asks turbojpeg for its fast DCT, PIL for the exact one
        assert np.abs(raw - ours).mean() < 3.0
    # draft(): a scaled decode only when the crop is at least twice the output
    path = next(root.glob("train/*/*.JPEG"))
    full = Image.open(path).convert("RGB")
    w, h = full.size
    box = (0, 0, w - w % 8, h - h % 8)
    for size, drafted in ((box[3] // 4, True), (box[3] // 2 + 8, False)):
        img = Image.open(path)
        out = np.asarray(crop_resize(img, box, size, Image.BICUBIC)).astype(int)
        assert (img.size != (w, h)) == drafted
        reference = np.asarray(full.resize((size, size), Image.BICUBIC, box=box)).astype(int)
        assert np.abs(out - reference).mean() < 3.0


def test_prepare_benchmark_reports_rates_and_bytes(tmp_path):
    from data_pipelines.corpus import generate_corpus

    root = generate_corpus(tmp_path / "corpus", classes=2, train_per_class=3, val_per_class=1,
                           workers=1)
    out = subprocess.run([sys.executable, "-m", "data_pipelines.benchmarks.prepare", str(root),
                          "--resolutions", "64", "--compress", "0,1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["compress_probability"] for r in rows] == [0.0, 1.0]
    assert all(r["images"] == 8 and r["write_img_s_per_process"] > 0 for r in rows)
    assert rows[0]["kb_per_image"] > rows[1]["kb_per_image"]  # raw pixels take more than JPEG


def test_prepare_benchmark_writes_with_the_workers_asked_for(tmp_path, monkeypatch, capsys):
    from data_pipelines.benchmarks import prepare as bench_prepare
    from data_pipelines.corpus import generate_corpus

    root = generate_corpus(tmp_path / "corpus", classes=2, train_per_class=2, val_per_class=1,
                           workers=1)
    seen = []
    real = bench_prepare.write_beton
    monkeypatch.setattr(bench_prepare, "write_beton",
                        lambda good, path, cfg: seen.append(cfg.workers) or real(good, path, cfg))
    monkeypatch.setattr(sys, "argv", ["bench_prepare", str(root), "--resolutions", "64",
                                      "--compress", "1", "--workers", "2"])
    bench_prepare.main()
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seen == [2] and row["writers"] == 2 and row["write_img_s_per_process"] > 0
