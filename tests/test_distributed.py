"""DDP on the CPU (gloo, 2 processes under torchrun): PMPL and plain steps against a single
process, and the whole Trainer launched by `metapool train` with train.nproc=2."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.distributed import free_port
from tests.helpers import (
    REPO,
    assert_same_metrics,
    loader_config,
    metapool,
    signal_after_checkpoint,
    write_params,
)

pytestmark = pytest.mark.slow


def _run(mode: str, out: str, nproc: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 f"--master_port={free_port()}"] if nproc > 1 else [sys.executable])
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


# ---------------------------------------------------------------- the Trainer under torchrun
EPOCHS = 8


@pytest.fixture(scope="module")
def tiny_ddp(tmp_path_factory):
    """Tiny data and a PMPL run trained start to finish by `metapool train` with train.nproc=2."""
    root = tmp_path_factory.mktemp("ddp_trainer")
    # 15 val images: the 2 ranks' shards (8 + 7) need one padded repeat, which must not count
    params = write_params(root / "params.yaml", root / "data", root / "runs",
                          {"data": {"default": {"val_per_class": 5}}})
    metapool("data", "prepare", "--params", str(params), "--out", str(root / "data"))
    straight = root / "runs" / "straight"
    proc = metapool(*_train_args(params, straight))
    return root, params, straight, proc.stdout


def _train_args(params: Path, out: Path) -> list[str]:
    return ["train", "--params", str(params), "--variant", "pmpl", "--seed", "0", "--out", str(out),
            "--set", "train.nproc=2", "--set", "train.threads=1", "--set", f"train.master_port={free_port()}",
            "--set", f"recipes.default.epochs={EPOCHS}"]


def _two_nodes(params: Path, out: Path, port: int,
               extra=lambda rank: []) -> tuple[list[int], list[str]]:
    """Two `metapool train` commands, one per "node" (one process each, here on one machine);
    their exit codes and outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *_train_args(params, out), "--set", "train.nproc=1",
         "--set", "train.nnodes=2", "--set", f"train.node_rank={rank}",
         "--set", "train.master_addr=127.0.0.1", "--set", f"train.master_port={port}",
         *extra(rank)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    return [node.returncode for node in nodes], logs


def test_pmpl_training_under_torchrun_writes_its_outputs_once(tiny_ddp):
    root, _, out, stdout = tiny_ddp
    epoch_lines = [line for line in stdout.splitlines() if line.startswith('{"epoch"')]
    assert len(epoch_lines) == EPOCHS  # printed by rank 0 only
    assert stdout.count("DDP rebuilt with find_unused_parameters=False") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == EPOCHS
    geno = json.loads((out / "artifacts" / "genotype.json").read_text())
    assert len(geno["layers"]) == 16 and all(layer["ops"] for layer in geno["layers"])
    names = sorted(p.name for p in (out / "checkpoints").iterdir())  # the newest few are kept
    assert names and all(n.startswith("ckpt_epoch") for n in names)  # no temporaries, no interrupt
    assert names[-1] == f"ckpt_epoch{EPOCHS - 1:04d}.pt"
    with (out / "live" / "plots" / "metrics" / "top1.tsv").open() as fh:
        assert len(fh.read().splitlines()) == EPOCHS + 1  # header + one row per epoch, one writer
    # Sharded evaluation, merged: every val image once, in val order, and top-1 agrees with it.
    with (root / "data" / "manifest.csv").open() as fh:
        val_labels = [int(r["label"]) for r in csv.DictReader(fh) if r["split"] == "val"]
    with (out / "artifacts" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["label"]) for r in rows] == val_labels and len(rows) == 15
    correct = sum(r["label"] == r["pred"] for r in rows)
    assert metrics["top1"] == pytest.approx(100.0 * correct / len(rows))


def test_sigterm_under_torchrun_stops_every_rank_and_resumes_to_the_same_result(tiny_ddp):
    root, params, straight, _ = tiny_ddp
    killed = root / "runs" / "killed"
    # `metapool train` has become torchrun (exec): the signal goes to its agent
    returncode, out = signal_after_checkpoint(_train_args(params, killed),
                                              killed / "checkpoints" / "ckpt_epoch0000.pt",
                                              signal.SIGTERM, threads=1)
    assert returncode == 128 + signal.SIGTERM, out  # an interrupted stage must not look finished
    assert len(re.findall(r"^stopped by signal 15 at epoch", out, re.M)) == 1, out  # rank 0
    assert "metapool train: stopped by signal 15" in out and "Traceback" not in out, out
    assert (killed / "checkpoints" / "ckpt_interrupt.pt").exists()
    assert not (killed / "metrics.json").exists()
    resumed = metapool(*_train_args(params, killed))
    assert "resuming" in resumed.stdout
    assert_same_metrics(straight, killed)
    assert (straight / "artifacts" / "genotype.json").read_text() == \
        (killed / "artifacts" / "genotype.json").read_text()
    assert (straight / "artifacts" / "predictions.csv").read_text() == \
        (killed / "artifacts" / "predictions.csv").read_text()


def test_two_nodes_of_one_process_match_one_node_of_two(tiny_ddp):
    """train.nnodes/node_rank/master_*: two `metapool train` commands (one per "node", here on
    one machine) form one world of 2 and compute exactly what 2 processes on one node do."""
    root, params, straight, _ = tiny_ddp
    out = root / "runs" / "two-nodes"
    codes, logs = _two_nodes(params, out, free_port())
    assert codes == [0, 0], logs
    assert "top-1" in logs[0] and "top-1" not in logs[1]  # rank 0 (node 0) alone reports
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    assert_same_metrics(straight, out)
    assert (straight / "artifacts" / "genotype.json").read_text() == \
        (out / "artifacts" / "genotype.json").read_text()


def test_nodes_that_would_resume_from_different_checkpoints_refuse_to_start(tiny_ddp):
    """Checkpoints not on a shared filesystem: node 0 finds one, node 1 does not -> a clear
    error on both, instead of two ranks silently training different weights."""
    root, params, straight, _ = tiny_ddp
    out = root / "runs" / "unshared"
    shutil.copytree(straight / "checkpoints", root / "node0-ckpts")
    codes, logs = _two_nodes(params, out, free_port(),
                             lambda rank: ["--checkpoints", str(root / f"node{rank}-ckpts")])
    assert all(code != 0 for code in codes), logs
    assert all("on a filesystem every node sees" in log for log in logs), logs
    assert all("exited with code 2" in log and "Traceback" not in log for log in logs), logs
    assert not (out / "metrics.json").exists()


def test_reported_accuracy_is_that_of_the_saved_model(tiny_ddp):
    """Each rank scores its shard with its own copy of the model: the copies must be one model
    (BatchNorm statistics averaged across ranks), the one rank 0 saved."""
    import torch
    import torch.nn.functional as F

    from data_pipelines.loaders import ffcv_stream
    from experiments.cost import load_final_model

    root, _, out, _ = tiny_ddp
    model = load_final_model(out)
    stream = ffcv_stream(str(root / "data" / "val.beton"), False,
                         loader_config(img_size=32, batch_size=4, workers=1))
    preds, loss_sum = [], 0.0
    with torch.no_grad():
        for x, y in stream:
            logits = model(x)
            preds += logits.argmax(dim=1).tolist()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    with (out / "artifacts" / "predictions.csv").open() as fh:
        assert preds == [int(r["pred"]) for r in csv.DictReader(fh)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_loss"] == pytest.approx(loss_sum / len(preds), rel=1e-5)
