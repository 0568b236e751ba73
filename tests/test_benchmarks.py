"""The benchmark scripts run (tiny sizes, CPU) and report finite figures; no timing asserted."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import timm

import metapool  # noqa: F401
from experiments import bench_enhancers, bench_gpu, bench_step
from tests.helpers import REPO, write_params
from tests.helpers import metapool as metapool_cli


def test_step_benchmark_reports_a_ratio():
    row = bench_step.bench("metapool_mobilenetv2_100", img_size=32, batch=4, repeats=1,
                           inner_lr=0.01, order="first", threads=1)
    assert row["ratio"] > 0 and math.isfinite(row["pmpl_images_per_s"])


def test_enhancer_benchmark_compares_the_same_computation():
    # "plain" (torch's pools, Python sum, NCHW) and "fast" must be the same model, or the
    # before/after table would compare different things
    import torch

    for name, args in bench_enhancers.genotypes().items():
        torch.manual_seed(0)
        # eval mode: train-mode BatchNorm over 2 images of 1x1 maps amplifies rounding
        model = metapool.build_model("mobilenetv2_100", num_classes=10, **args).eval()
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
    assert row["latency_ms_fast"] > 0 and row["train_img_s_plain"] > 0


def test_gpu_benchmark_runs_on_cpu():
    args = argparse.Namespace(device="cpu", img_size=32, batch=4, steps=1, warmup=1)
    for pmpl, name in ((False, "mobilenetv2_100"), (True, "metapool_mobilenetv2_100")):
        row = bench_gpu.bench(name, timm.create_model(name), pmpl, args, compile_model=False)
        assert row["images_per_s"] > 0 and row["batch"] == 4


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
                          {"recipes": {"paper": small, "standard": small}})
    monkeypatch.setattr(sys, "argv", ["bench_gpu", "--device", "cpu", "--img-size", "32",
                                      "--batch", "4", "--steps", "1", "--warmup", "1",
                                      "--no-compile", "--estimate-gpus", "2",
                                      "--params", str(params)])
    bench_gpu.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    estimates = {r["recipe"]: r for r in rows if "recipe" in r}
    assert set(estimates) == {"paper", "standard"}
    for r in estimates.values():
        assert r["batch_per_gpu"] == 4
        assert r["pmpl"]["hours"] > 0 and r["baseline"]["gpu_hours"] > 0


def test_ddp_benchmark_runs_under_torchrun():
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
         "-m", "experiments.bench_ddp", "--img-size", "32", "--batch", "2", "--steps", "1",
         "--blocks", "1"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["world_size"] == 2 and row["find_unused_over_static"] > 0


def test_loader_benchmark_runs_with_randaugment(tmp_path):
    params = write_params(tmp_path / "params.yaml", tmp_path / "data", tmp_path / "runs")
    metapool_cli("data", "prepare", "--params", str(params), "--out", str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipelines.bench_loaders", "--data", str(tmp_path / "data"),
         "--img-size", "32", "--batch", "8", "--workers", "1", "--epochs", "1",
         "--interpolation", "bicubic", "--randaugment", "rand-m9-mstd0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ffcv_images_per_s", "ffcv_randaugment_images_per_s", "torchvision_images_per_s"):
        assert row[key] > 0
    assert row["images"] == 39 and row["randaugment"] == "rand-m9-mstd0.5"


def test_prepare_benchmark_reports_rates_and_bytes(tmp_path):
    from data_pipelines.corpus import generate_corpus

    root = generate_corpus(tmp_path / "corpus", classes=2, train_per_class=3, val_per_class=1,
                           workers=1)
    out = subprocess.run([sys.executable, "-m", "data_pipelines.bench_prepare", str(root),
                          "--resolutions", "64", "--compress", "0,1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["compress_probability"] for r in rows] == [0.0, 1.0]
    assert all(r["images"] == 8 and r["write_img_s_per_process"] > 0 for r in rows)
    assert rows[0]["kb_per_image"] > rows[1]["kb_per_image"]  # raw pixels take more than JPEG
