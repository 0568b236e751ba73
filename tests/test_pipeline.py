"""The DVC pipeline end to end on the CI smoke profile, in a temporary copy of the repository."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, write_params

pytestmark = pytest.mark.slow

# CI smoke profile: every stage kind (data, plain, search, retrain, compare, report), 2 seeds.
SMOKE = {
    "control_seeds": [0, 1],
    "stages": {"controls": ["baseline"], "plain": ["fixed-max3"], "search": ["pmpl"]},
    "compare": {"extra_pairs": [["two-stage", "pmpl"]], "resamples": 500, "controls": []},
}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "2", "GIT_AUTHOR_NAME": "ci",
           "GIT_AUTHOR_EMAIL": "ci@example.invalid", "GIT_COMMITTER_NAME": "ci",
           "GIT_COMMITTER_EMAIL": "ci@example.invalid"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("pipeline") / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    # what `dvc repro` writes (autostage adds it to git's index) is never part of the copy
    generated = ("dvc.lock", "runs/", "results/", "checkpoints/", "data/", "reports/output/")
    for rel in filter(None, files):
        if (REPO / rel).is_file() and not rel.startswith(generated):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    # repo-relative paths, as a user's checkout has them
    write_params(dst / "params.yaml", Path("data/prepared"), Path("runs"), SMOKE)
    _run(["git", "init", "-q"], dst)  # dvc exp needs a full git repository of its own
    _run(["git", "add", "-A"], dst)
    _run(["git", "commit", "-qm", "smoke"], dst)
    return dst


def test_dvc_repro_produces_every_declared_output(repo_copy):
    _run(["dvc", "repro"], repo_copy)
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    stages = lock["stages"]
    assert {"data", "compare", "report", "train-controls@baseline-0", "train-search@pmpl-1",
            "train-retrain@1"} <= set(stages)
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            assert (repo_copy / out["path"]).exists(), f"{name}: {out['path']} missing"
    for metrics in repo_copy.glob("runs/*/seed*/metrics.json"):
        m = json.loads(metrics.read_text())
        assert all(math.isfinite(m[k]) for k in ("top1", "top5", "val_loss", "train_seconds"))
    compare = json.loads((repo_copy / "results" / "compare.json").read_text())
    pairs = {(c["a"], c["b"]) for c in compare["comparisons"]}
    assert {("pmpl", "baseline"), ("fixed-max3", "baseline"), ("two-stage", "pmpl")} <= pairs
    _check_report((repo_copy / "reports" / "output" / "report.html").read_text())
    assert "up to date" in _run(["dvc", "status"], repo_copy).stdout


def _check_report(html: str) -> None:
    """The HTML a reader gets from 2-seed runs: no code, a summary, every table captioned with
    its dataset, ranges (not 95% intervals) and no verdict."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    # no code shown (markdown cells keep nbconvert's input wrapper: they are the text)
    assert not soup.select(".jp-CodeCell .jp-InputArea, .jp-InputArea-editor, .jp-InputPrompt")
    text = soup.get_text(" ")
    assert "papermill parameters" not in text and "import " not in text
    assert "Traceback" not in text and "Warning" not in text
    tables = soup.find_all("table")
    captions = [t.caption.get_text(" ") if t.caption else "" for t in tables]
    assert any(c.startswith("Summary") for c in captions), captions
    assert tables and all("embedded-default" in c for c in captions), captions
    summary = next(t for t, c in zip(tables, captions, strict=True) if c.startswith("Summary"))
    cells = summary.get_text(" ")
    assert "range [" in cells and "not resolved: 2 seeds" in cells
    assert "95% bootstrap" not in text  # 2 seeds: no interval may call itself one
    assert len(soup.find_all("img")) >= 4


def test_exp_run_reruns_only_what_reads_the_changed_param(repo_copy):
    _run(["git", "add", "-A"], repo_copy)
    _run(["git", "commit", "-qm", "baseline results"], repo_copy)
    proc = _run(["dvc", "exp", "run", "-S", "pmpl.inner_lr=0.01"], repo_copy)
    log = proc.stdout + proc.stderr
    assert "Running stage 'train-search@pmpl-0'" in log
    assert "Running stage 'train-controls@baseline-0'" not in log
    assert "Running stage 'data'" not in log
    show = _run(["dvc", "exp", "show", "--no-pager", "--csv"], repo_copy).stdout
    assert "pmpl.inner_lr" in show and "top1" in show


def test_a_stage_with_train_nproc_launches_torchrun_itself(repo_copy):
    proc = _run(["dvc", "exp", "run", "-S", "train.nproc=2", "-S", "train.threads=1",
                 "-S", "train.master_port=29537", "train-controls@baseline-0"], repo_copy)
    log = proc.stdout + proc.stderr
    assert "Running stage 'train-controls@baseline-0'" in log
    metrics = json.loads((repo_copy / "runs" / "baseline" / "seed0" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
