"""Tiny end-to-end fixtures shared by the training, pipeline and reliability tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# A run of a few seconds: 3 classes, 32px, 2 epochs, batch 8.
TINY = {
    "seeds": [0, 1],
    "recipes": {"default": {"epochs": 2, "batch_size": 8, "lr_base_batch": 8, "img_size": 32,
                            "deadline_epoch": 1, "alpha_lr": 0.05, "warmup_epochs": 0}},
    "data": {"default": {"classes": 3, "train_per_class": 16, "val_per_class": 6, "size": 36},
             "writer": {"workers": 1}},
    "train": {"threads": 2},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_params(path: Path, data_dir: Path, runs_dir: Path, extra: dict | None = None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = merge(params, TINY)
    params = merge(params, {"data": {"out_dir": str(data_dir)}, "runs_dir": str(runs_dir)})
    params = merge(params, extra or {})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def metapool(*args: str, cwd: Path | None = None, timeout: int = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "metapool.cli", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"metapool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
