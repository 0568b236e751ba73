"""DDP on the CPU (gloo, 2 processes under torchrun) against a single process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _run(mode: str, out: str, nproc: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 "--master_port=29517"] if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(REPO / "tests" / "ddp_worker.py"), mode, out],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(open(f"{out}.rank{r}.json").read()) for r in range(nproc)]


def _close(a, b, tol=1e-9):
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=tol, rtol=tol)


def test_pmpl_alpha_and_genotype_identical_across_ranks_and_match_one_process(tmp_path):
    ranks = _run("pmpl", str(tmp_path / "ddp"), 2)
    single = _run("pmpl", str(tmp_path / "single"), 1)[0]
    assert ranks[0]["alpha"] == ranks[1]["alpha"]  # bit-identical on every rank
    assert ranks[0]["genotype"] == ranks[1]["genotype"]
    assert all(_close(a, b) for a, b in zip(ranks[0]["alpha"], single["alpha"], strict=True))
    assert [c["ops"] for c in ranks[0]["genotype"]["layers"]] == \
        [c["ops"] for c in single["genotype"]["layers"]]
    assert [c["step"] for c in ranks[0]["genotype"]["layers"]] == \
        [c["step"] for c in single["genotype"]["layers"]]


def test_baseline_ddp_weights_match_one_process(tmp_path):
    ranks = _run("baseline", str(tmp_path / "ddp"), 2)
    single = _run("baseline", str(tmp_path / "single"), 1)[0]
    for name, value in single["weights"].items():
        assert _close(ranks[0]["weights"][name], value), name
        assert ranks[0]["weights"][name] == ranks[1]["weights"][name]
