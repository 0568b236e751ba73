"""Helpers shared by the tests: a tiny searchable net, tiny end-to-end params, running the
`metapool` command, signalling a run and comparing the metrics of two runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from torch import nn

from data_pipelines.loaders import LoaderConfig
from metapool.enhancer import MetaPoolEnhancer

REPO = Path(__file__).resolve().parents[1]


class TinySearchNet(nn.Module):
    """conv -> BN -> ReLU -> two enhancers -> pool -> linear: small enough for exact checks."""

    def __init__(self, candidates=("skip", "max_pool_3x3", "avg_pool_3x3", "strip_pool"),
                 channels: int = 8, classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.enh1 = MetaPoolEnhancer(channels, candidates)
        self.mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.enh2 = MetaPoolEnhancer(channels, candidates)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enh2(self.drop(self.mid(self.enh1(self.stem(x)))))
        return self.head(x.mean((2, 3)))


# A run of a few seconds: 3 classes, 32px, 2 epochs, batch 8.
TINY = {
    "seeds": [0, 1],
    "recipes": {"default": {"epochs": 2, "batch_size": 8, "lr_base_batch": 8, "img_size": 32,
                            "deadline_epoch": 1, "alpha_lr": 0.05, "warmup_epochs": 0}},
    "data": {"default": {"classes": 3, "train_per_class": 16, "val_per_class": 6, "size": 36},
             "writer": {"workers": 1}},
    # CPU tests say so: a CI machine with a GPU must not move them to CUDA (their numbers,
    # bit-identical resumes and nproc=2 on one GPU assume the CPU)
    "train": {"threads": 2, "device": "cpu"},
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
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"metapool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def signal_after_checkpoint(args: list[str], checkpoint: Path, sig: int,
                            threads: int = 2) -> tuple[int, str]:
    """Start ``metapool *args``, send ``sig`` once ``checkpoint`` exists; (exit code, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def assert_same_metrics(a: Path, b: Path) -> None:
    """The runs in folders ``a`` and ``b`` reported exactly the same accuracy and loss."""
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    for key in ("top1", "top5", "val_loss"):
        assert ma[key] == mb[key], key


def loader_config(img_size: int, batch_size: int, workers: int, seed: int = 0,
                  **settings) -> LoaderConfig:
    """A single-process CPU stream's settings for a test (``LoaderConfig`` has no defaults)."""
    base = dict(scale=(0.08, 1.0), distributed=False, channels_last=False, device="cpu",
                interpolation="bilinear", randaugment="")
    return LoaderConfig(img_size=img_size, batch_size=batch_size, workers=workers, seed=seed,
                        **{**base, **settings})


def stream_recipe(img_size: int, batch_size: int, scale: tuple[float, float] = (0.08, 1.0),
                  interpolation: str = "bilinear", randaugment: str = "") -> SimpleNamespace:
    """What ``build_streams`` reads of a recipe (``data_pipelines.loaders.StreamRecipe``)."""
    return SimpleNamespace(img_size=img_size, batch_size=batch_size, scale=scale,
                           interpolation=interpolation, randaugment=randaugment)


def write_run_metrics(run: Path, **fields) -> Path:
    """A finished run's ``metrics.json`` (``experiments.metrics.RunMetrics``): ``fields`` over
    placeholder values, for tests of what reads runs."""
    from experiments.metrics import RunMetrics, write_metrics

    base = dict(top1=50.0, top5=90.0, val_loss=1.0, params=1, macs_224=1, macs_train_res=1,
                train_seconds=1.0, train_images_per_s=1.0, epochs=1, img_size=32,
                recipe="default", dataset="generated", seed=0, mode="baseline",
                variant="baseline", backbone="mobilenetv2_100", genotype_from=None, head="plain",
                output_gates=False, world_size=1, ema=False, provenance={})
    run.mkdir(parents=True, exist_ok=True)
    write_metrics(run / "metrics.json", RunMetrics(**{**base, **fields}))
    return run / "metrics.json"
