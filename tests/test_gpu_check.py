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
    assert names == {"timm mobilenetv2_100", "baseline", "search", "adapted", "published"}
    for r in report["throughput"]:
        assert r["batch"] == 4 and r["img_size"] == 32
        assert 0 < r["images_per_s"] < 1e5 and r["step_ms"] == pytest.approx(
            1000 * r["batch"] / r["images_per_s"], rel=0.05)
    assert {e["recipe"] for e in report["estimate"]} == {"paper", "standard", "paper-final"}
    for e in report["estimate"]:
        # a search step costs more than a plain one, so PMPL takes longer than the baseline
        assert 0 < e["baseline"]["hours"] < e["pmpl"]["hours"]
        assert e["published"]["hours"] > 0
    checks = report["correctness"]
    # against float64 on the CPU: a real comparison on the CPU smoke too
    assert checks["reference"] == "float64 on the CPU"
    assert 0 < checks["weight_grad_rel"] < 1e-4 and 0 < checks["alpha_grad_rel"] < 1e-4
    assert checks["gpu_matches_cpu"] and checks["bf16_ok"] and checks["exact_second_order_finite"]
    assert checks["exact_matches_reference"] and checks["finite_difference_matches_reference"]
    assert 0 < checks["finite_difference_vs_exact_rel"] < 5e-2  # judged on the smooth net
    assert checks["finite_difference_approximates_exact"]
    # the torch.compile branch runs too (dynamo's "eager" backend on the CPU)
    assert checks["compile_backend"] == "eager" and checks["compiled_ok"]
    assert 0 <= checks["compiled_vs_eager_rel"] < 1e-3
    for variant in ("baseline", "pmpl"):
        run = report["end_to_end"][variant]
        assert run["exit"] == 0 and run["world_size"] == 1  # under torchrun: DDP, one process
        assert len(run["epoch_lines"]) == 2
    assert (out / "train_pmpl.log").is_file()
    table = (out / "gpu_check.md").read_text()
    assert "## Training step throughput" in table and "| pmpl | 0 |" in table
