"""The prepared GPU check runs, on the CPU, as CI runs it (--cpu-smoke): the same script that
runs on the GPU machine, so it cannot rot between GPU sessions."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--cpu-smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["environment"]["torch"]
    names = {r["model"] for r in report["throughput"]}
    assert {"timm mobilenetv2_100", "baseline", "search", "adapted"} <= names
    assert all(r["images_per_s"] > 0 for r in report["throughput"])
    assert {e["recipe"] for e in report["estimate"]} == {"paper", "standard"}
    assert all(e["pmpl"]["hours"] > 0 for e in report["estimate"])
    checks = report["correctness"]
    assert checks["gpu_matches_cpu"] and checks["bf16_ok"] and checks["exact_second_order_finite"]
    # (finite differences vs exact is reported, not asserted: across ReLU6 and max-pool kinks
    # the two legitimately differ; tests/test_pmpl.py checks them on a smooth network)
    assert checks["finite_difference_vs_exact_rel"] >= 0
    for variant in ("baseline", "pmpl"):
        run = report["end_to_end"][variant]
        assert run["exit"] == 0 and run["world_size"] == 1  # under torchrun: DDP, one process
        assert len(run["epoch_lines"]) == 2
    assert (out / "train_pmpl.log").is_file()
    table = (out / "gpu_check.md").read_text()
    assert "## Training step throughput" in table and "| pmpl | 0 |" in table
