"""The benchmark scripts run (tiny sizes, CPU) and report finite figures; no timing asserted."""
from __future__ import annotations

import argparse
import math

import timm

import metapool  # noqa: F401
from experiments import bench_gpu, bench_step


def test_step_benchmark_reports_a_ratio():
    row = bench_step.bench("metapool_mobilenetv2_100", img_size=32, batch=4, repeats=1,
                           inner_lr=0.01, order="first", threads=1)
    assert row["ratio"] > 0 and math.isfinite(row["pmpl_images_per_s"])


def test_gpu_benchmark_runs_on_cpu():
    args = argparse.Namespace(device="cpu", img_size=32, batch=4, steps=1, warmup=1)
    for pmpl, name in ((False, "mobilenetv2_100"), (True, "metapool_mobilenetv2_100")):
        row = bench_gpu.bench(name, timm.create_model(name), pmpl, args, compile_model=False)
        assert row["images_per_s"] > 0 and row["batch"] == 4
