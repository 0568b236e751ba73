"""Training: learning, PMPL freezing, determinism, resume after SIGKILL/SIGTERM, divergence."""
from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from experiments.config import load_params
from experiments.distributed import Dist
from experiments.train import Trainer, resolve_run
from tests.helpers import assert_same_metrics, metapool, signal_after_checkpoint, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    params = write_params(root / "params.yaml", root / "data", root / "runs")
    metapool("data", "prepare", "--params", str(params), "--out", str(root / "data"))
    return root, params


def _history(run: Path) -> list[dict]:
    with (run / "live" / "plots" / "metrics" / "train_loss.tsv").open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_training_decreases_the_loss(tiny):
    root, params = tiny
    out = root / "runs" / "learn"
    metapool("train", "--params", str(params), "--variant", "baseline", "--seed", "0",
             "--out", str(out), "--set", "recipes.default.epochs=4")
    losses = [float(r["train_loss"]) for r in _history(out)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("top1", "top5", "val_loss", "params", "macs_224", "train_seconds",
                "train_images_per_s", "cpu_latency_ms_224"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    with (out / "artifacts" / "predictions.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 18  # every val image, 3 classes x 6


def test_pmpl_freezes_every_layer_by_its_deadline(tiny):
    root, params = tiny
    out = root / "runs" / "pmpl"
    metapool("train", "--params", str(params), "--variant", "pmpl", "--seed", "0",
             "--out", str(out))
    geno = json.loads((out / "artifacts" / "genotype.json").read_text())
    assert len(geno["layers"]) == 16
    assert all(layer["epoch"] <= 1 and layer["ops"] for layer in geno["layers"])
    with (out / "artifacts" / "alpha_history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["candidate"] for r in rows} == set(geno["candidates"])
    metrics = json.loads((out / "metrics.json").read_text())
    # the reported cost is the adapted model's: no alpha, only the kept ops
    assert metrics["frozen_ops"] == {layer["layer"]: layer["ops"] for layer in geno["layers"]}


def _run_until_checkpoint(args: list[str], ckpt_dir: Path, sig: int) -> None:
    returncode, out = signal_after_checkpoint(args, ckpt_dir / "ckpt_epoch0000.pt", sig)
    if sig == signal.SIGKILL:
        assert returncode == -signal.SIGKILL
    else:
        assert returncode == 128 + signal.SIGTERM, out  # not "finished" for DVC/SLURM
        assert "stopped by signal" in out


@pytest.mark.parametrize("variant,sig", [("pmpl", signal.SIGKILL), ("baseline", signal.SIGTERM)])
def test_killed_run_resumes_to_the_same_result(tiny, variant, sig):
    root, params = tiny
    base = ["train", "--params", str(params), "--variant", variant, "--seed", "1",
            "--set", "recipes.default.epochs=3"]
    straight, killed = root / "runs" / f"straight-{variant}", root / "runs" / f"killed-{variant}"
    metapool(*base, "--out", str(straight))
    _run_until_checkpoint([*base, "--out", str(killed)], killed / "checkpoints", sig)
    assert not (killed / "metrics.json").exists()
    resumed = metapool(*base, "--out", str(killed))
    assert "resuming" in resumed.stdout
    assert_same_metrics(straight, killed)
    assert (straight / "artifacts" / "predictions.csv").read_text() == \
        (killed / "artifacts" / "predictions.csv").read_text()
    if variant == "pmpl":
        ga = json.loads((straight / "artifacts" / "genotype.json").read_text())
        gb = json.loads((killed / "artifacts" / "genotype.json").read_text())
        assert ga == gb


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny):
    root, params = tiny
    out = root / "runs" / "corrupt"
    args = ["train", "--params", str(params), "--variant", "baseline", "--seed", "0",
            "--out", str(out), "--set", "recipes.default.epochs=2"]
    metapool(*args)
    (out / "metrics.json").unlink()
    latest = out / "checkpoints" / "ckpt_epoch0001.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    rerun = metapool(*args)
    assert "unreadable" in rerun.stderr and "resuming" in rerun.stdout
    assert json.loads((out / "metrics.json").read_text())["top1"] >= 0


def test_changed_parameters_do_not_resume_stale_checkpoints(tiny):
    root, params = tiny
    out = root / "runs" / "stale"
    args = ["train", "--params", str(params), "--variant", "baseline", "--seed", "0",
            "--out", str(out)]
    metapool(*args, "--set", "recipes.default.epochs=1")
    rerun = metapool(*args, "--set", "recipes.default.epochs=1", "--set", "recipes.default.lr=0.001")
    assert "made with other parameters" in rerun.stdout


def test_nan_loss_stops_with_the_step_and_checkpoint(tiny, monkeypatch):
    root, params = tiny
    p = load_params(params)
    spec, pmpl = resolve_run(p, "baseline", 0, str(root / "runs" / "nan"))
    trainer = Trainer(p, spec, pmpl, Dist())
    trainer.loss_plain = lambda out, y: out.sum() * float("nan")
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 0 step 0 .*no checkpoint yet"):
        trainer.fit()
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("threads,local_procs,cores,expected", [
    (2, 1, 2, 2), (2, 2, 2, 1), (8, 2, 16, 8), (8, 4, 16, 4), (1, 4, 2, 1)])
def test_cpu_threads_never_oversubscribe_the_cores(monkeypatch, threads, local_procs, cores, expected):
    from types import SimpleNamespace

    from experiments.config import TrainParams

    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_procs))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    fake = SimpleNamespace(params=SimpleNamespace(train=TrainParams(threads=threads)),
                           device=torch.device("cpu"), dist=Dist())
    assert Trainer._cpu_threads(fake) == expected
