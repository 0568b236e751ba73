"""Training: learning, PMPL freezing, determinism, resume after SIGKILL/SIGTERM, divergence."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from experiments.config import load_params
from experiments.distributed import Dist, StopSignal, cpu_threads
from experiments.runs import resolve_run
from experiments.train import Trainer
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


def _train_args(params: Path, variant: str, out: Path) -> list[str]:
    return ["train", "--params", str(params), "--variant", variant, "--seed", "1",
            "--set", "recipes.default.epochs=3", "--out", str(out)]


@pytest.fixture(scope="module")
def reference(tiny):
    """Uninterrupted 3-epoch runs of the baseline and PMPL, shared by the tests below (the
    resume tests compare against them)."""
    root, params = tiny
    runs = {}
    for variant in ("baseline", "pmpl"):
        runs[variant] = root / "runs" / f"straight-{variant}"
        metapool(*_train_args(params, variant, runs[variant]))
    return runs


class _SameBatch:
    """A train stream that yields one fixed batch ``steps`` times per epoch."""

    def __init__(self, batch, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def test_training_fits_a_fixed_batch(tiny):
    # The tiny data set is too small to show learning in a few epochs (its epoch losses
    # wander around ln 3), so the loop's learning is checked where it must show: the
    # Trainer's own epochs over one fixed batch drive its loss far below chance.
    root, params = tiny
    p = load_params(params, ["recipes.default.epochs=3"])
    tr = Trainer(resolve_run(p, "baseline", 0, str(root / "runs" / "fixed-batch")), Dist())
    tr.data.train.set_epoch(0)
    tr.data.train = _SameBatch(next(iter(tr.data.train)), steps=8)
    stop = StopSignal()
    try:
        losses = [tr.train_one_epoch(epoch, stop)["train_loss"] for epoch in range(3)]
    finally:
        stop.restore()
    assert losses[-1] < 0.05 < losses[0], losses  # chance is ln 3 = 1.1


def test_a_run_records_its_metrics_and_predictions(reference):
    import math

    from experiments.cost import load_final_model
    from metapool.profile import count_macs

    out = reference["baseline"]
    history = _history(out)
    losses = [float(r["train_loss"]) for r in history]
    assert [int(r["step"]) for r in history] == [0, 1, 2]  # one row per epoch
    assert all(math.isfinite(v) and v > 0 for v in losses)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("top1", "top5", "val_loss", "train_seconds",
                                                   "train_images_per_s"))
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and metrics["val_loss"] > 0
    model = load_final_model(out)
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    assert metrics["macs_224"] == count_macs(model, 224)
    assert metrics["macs_train_res"] == count_macs(model, 32) < metrics["macs_224"]
    assert metrics["epochs"] == 3 and metrics["img_size"] == 32 and metrics["seed"] == 1
    with (out / "artifacts" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in rows] == list(range(18))  # every val image, 3 x 6, in order
    top1 = 100 * sum(r["label"] == r["pred"] for r in rows) / len(rows)
    assert top1 == pytest.approx(metrics["top1"])  # the predictions are the scored ones
    # the last epoch's evaluation is the final one (scored once): the curve's last point
    with (out / "live" / "plots" / "metrics" / "top1.tsv").open() as fh:
        assert float(list(csv.DictReader(fh, delimiter="\t"))[-1]["top1"]) == metrics["top1"]


def test_every_run_records_where_it_came_from(reference):
    import importlib.metadata
    import os
    import subprocess

    from experiments.provenance import REPO, code_sha256, lock_hash

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO, capture_output=True, text=True).stdout.strip())
    for out in reference.values():
        prov = json.loads((out / "metrics.json").read_text())["provenance"]
        assert prov["git_commit"] == head and prov["git_dirty"] is dirty
        assert prov["lock_sha256"] == lock_hash() and len(prov["lock_sha256"]) == 64
        assert prov["code_sha256"] == code_sha256()
        assert prov["device_type"] == "cpu" and prov["world_size"] == 1
        assert prov["deterministic_algorithms"] is True and prov["torch_compile"] is False
        assert prov["torch"] == torch.__version__
        assert prov["timm"] == importlib.metadata.version("timm")
        assert prov["ffcv"] == importlib.metadata.version("ffcv")
        assert prov["cpu_threads"] == cpu_threads(2, Dist())  # train.threads of the params
        assert prov["cpu_count"] == os.cpu_count() and prov["cpu_model"]
        params = (out / "live" / "params.yaml").read_text()  # dvclive's params carry it too
        assert head in params


def test_pmpl_freezes_every_layer_by_its_deadline(reference):
    out = reference["pmpl"]
    geno = json.loads((out / "artifacts" / "genotype.json").read_text())
    assert len(geno["layers"]) == 16
    assert all(layer["epoch"] <= 1 and layer["ops"] for layer in geno["layers"])
    with (out / "artifacts" / "alpha_history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["candidate"] for r in rows} == set(geno["candidates"])
    with (out / "artifacts" / "freeze_events.csv").open() as fh:
        events = list(csv.DictReader(fh))
    assert sorted(e["layer"] for e in events) == sorted(layer["layer"] for layer in geno["layers"])
    metrics = json.loads((out / "metrics.json").read_text())
    # the reported cost is the adapted model's: no alpha, only the kept ops
    assert metrics["frozen_ops"] == {layer["layer"]: layer["ops"] for layer in geno["layers"]}


def test_saved_model_rebuilds_from_its_own_arguments(reference, tiny):
    """model_final.pt carries build_model's arguments: one builder rebuilds any saved model,
    and the rebuilt PMPL model is the adapted one (only the kept ops, no alpha)."""
    from experiments.cost import load_final_model
    from metapool.models import enhancers

    root, _ = tiny
    for variant, out in reference.items():
        saved = torch.load(out / "artifacts" / "model_final.pt", weights_only=False)
        model = load_final_model(out)
        assert saved["model_args"]["num_classes"] == 3
        assert sum(p.numel() for p in model.parameters()) == \
            json.loads((out / "metrics.json").read_text())["params"]
        if variant == "pmpl":
            assert saved["model_args"]["enhancer"] == "fixed" and not enhancers(model)
            assert not any(n.endswith("alpha") for n, _ in model.named_parameters())


def _run_until_checkpoint(args: list[str], ckpt_dir: Path, sig: int) -> None:
    returncode, out = signal_after_checkpoint(args, ckpt_dir / "ckpt_epoch0000.pt", sig)
    if sig == signal.SIGKILL:
        assert returncode == -signal.SIGKILL
    else:
        assert returncode == 128 + signal.SIGTERM, out  # not "finished" for DVC/SLURM
        assert "stopped by signal" in out


@pytest.mark.parametrize("variant,sig", [("pmpl", signal.SIGKILL), ("baseline", signal.SIGTERM)])
def test_killed_run_resumes_to_the_same_result(tiny, reference, variant, sig):
    root, params = tiny
    killed = root / "runs" / f"killed-{variant}"
    _run_until_checkpoint(_train_args(params, variant, killed), killed / "checkpoints", sig)
    assert not (killed / "metrics.json").exists()
    resumed = metapool(*_train_args(params, variant, killed))
    assert "resuming" in resumed.stdout
    straight = reference[variant]
    assert_same_metrics(straight, killed)
    assert (straight / "artifacts" / "predictions.csv").read_text() == \
        (killed / "artifacts" / "predictions.csv").read_text()
    if variant == "pmpl":
        ga = json.loads((straight / "artifacts" / "genotype.json").read_text())
        gb = json.loads((killed / "artifacts" / "genotype.json").read_text())
        assert ga == gb


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny, reference):
    root, params = tiny
    out = root / "runs" / "corrupt"
    shutil.copytree(reference["baseline"], out)  # a finished run whose last output is lost
    (out / "metrics.json").unlink()
    latest = out / "checkpoints" / "ckpt_epoch0002.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    rerun = metapool(*_train_args(params, "baseline", out))
    assert "unreadable" in rerun.stderr and "resuming" in rerun.stdout
    assert_same_metrics(reference["baseline"], out)  # epoch 2 trained again, to the same result


def test_changed_parameters_do_not_resume_stale_checkpoints(tiny):
    root, params = tiny
    out = root / "runs" / "stale"
    args = ["train", "--params", str(params), "--variant", "baseline", "--seed", "0",
            "--out", str(out)]
    metapool(*args, "--set", "recipes.default.epochs=1")
    rerun = metapool(*args, "--set", "recipes.default.epochs=1", "--set", "recipes.default.lr=0.001")
    assert "made with other parameters" in rerun.stdout and "resuming" not in rerun.stdout


def test_other_data_with_the_same_counts_does_not_resume_stale_checkpoints(tiny):
    # a re-prepared dataset (other images, another meta split) keeps its image counts: the
    # checkpoint must know it was trained on the old one
    root, params = tiny
    data = root / "data-copy"
    shutil.copytree(root / "data", data)
    out = root / "runs" / "stale-data"
    args = ["train", "--params", str(params), "--variant", "baseline", "--seed", "0",
            "--out", str(out), "--set", "recipes.default.epochs=1", "--set",
            f"data.out_dir={data}"]
    metapool(*args)
    assert "resuming" in metapool(*args).stdout  # same data: the finished run is resumed
    report = json.loads((data / "report.json").read_text())
    (data / "report.json").write_text(json.dumps({**report, "data_id": "another dataset"}))
    rerun = metapool(*args)
    assert "made with other parameters, data or code" in rerun.stdout
    assert "resuming" not in rerun.stdout


def test_a_resumed_run_rebuilds_the_curves_dvc_deleted(tiny, reference):
    # DVC deletes a stage's outputs (live/plots) before rerunning it but keeps the persisted
    # checkpoints: resuming the finished run must write every epoch's curve again
    root, params = tiny
    out = root / "runs" / "replayed"
    shutil.copytree(reference["baseline"], out)
    shutil.rmtree(out / "live")
    (out / "metrics.json").unlink()
    rerun = metapool(*_train_args(params, "baseline", out))
    assert "resuming" in rerun.stdout
    assert_same_metrics(reference["baseline"], out)
    assert _history(out) == _history(reference["baseline"])


def test_nan_loss_stops_with_the_step_and_checkpoint(tiny, monkeypatch):
    root, params = tiny
    run = resolve_run(load_params(params), "baseline", 0, str(root / "runs" / "nan"))
    trainer = Trainer(run, Dist())
    trainer.loss_plain = lambda out, y: out.sum() * float("nan")
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 0 step 0 .*no checkpoint yet"):
        trainer.fit()
    # the FFCV loader set torch's threads to its worker count; the stream restored train.threads
    assert torch.get_num_threads() == cpu_threads(run.train.threads, Dist())


@pytest.mark.parametrize("threads,local_procs,cores,expected", [
    (2, 1, 2, 2), (2, 2, 2, 1), (8, 2, 16, 8), (8, 4, 16, 4), (1, 4, 2, 1)])
def test_cpu_threads_never_oversubscribe_the_cores(monkeypatch, threads, local_procs, cores, expected):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_procs))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert cpu_threads(threads, Dist()) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_loss_after_a_checkpoint_names_the_last_good_one(tiny, bad):
    root, params = tiny
    out = root / "runs" / f"diverge-{bad}"
    run = resolve_run(load_params(params, ["recipes.default.epochs=3"]), "baseline", 0, str(out))
    trainer = Trainer(run, Dist())
    real, calls = trainer.loss_plain, []
    steps = len(trainer.data.train)

    def diverging(logits, y):  # fine for the first epoch, then the loss blows up
        calls.append(1)
        loss = real(logits, y)
        return loss * bad if len(calls) > steps else loss

    trainer.loss_plain = diverging
    word = "nan" if bad != bad else "inf"
    with pytest.raises(FloatingPointError, match=rf"loss is {word} at epoch 1 step 0 .*"
                                                 r"last good checkpoint: .*ckpt_epoch0000\.pt"):
        trainer.fit()
    assert (out / "checkpoints" / "ckpt_epoch0000.pt").is_file()
    assert not (out / "metrics.json").exists()


def test_a_run_without_dvclive_still_writes_its_metrics(tiny, monkeypatch, capsys):
    import sys

    root, params = tiny
    monkeypatch.setitem(sys.modules, "dvclive", None)  # `import dvclive` raises ImportError
    out = root / "runs" / "no-dvclive"
    run = resolve_run(load_params(params, ["recipes.default.epochs=1"]), "baseline", 0, str(out))
    metrics = Trainer(run, Dist()).fit()
    assert "dvclive is not installed" in capsys.readouterr().out
    assert (out / "metrics.json").is_file() and metrics.epochs == 1
    assert not (out / "live").exists()
