"""The DVC pipeline end to end on the CI smoke profile, in a temporary copy of the repository."""
from __future__ import annotations

import csv
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

# CI smoke profile: every stage kind (data, plain, search, retrain, cost, compare, report), the
# baseline and an A/A control at the rule's 5 seeds (so the report renders its controls), the
# other variants at 2 seeds.
SMOKE = {
    "seeds": [0, 1],
    "control_seeds": [0, 1, 2, 3, 4],
    "stages": {"controls": ["baseline", "baseline-aa"], "plain": ["fixed-max3"],
               "search": ["pmpl"], "retrain": ["two-stage"]},
    "compare": {"extra_pairs": [["two-stage", "pmpl"]], "resamples": 500,
                "controls": [["baseline-aa", "baseline", "no difference"]]},
    "cost": {"rounds": 3, "calls": 1, "img_size": 32},
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


@pytest.fixture(scope="module")
def reproduced(repo_copy) -> Path:
    """The copy after one `dvc repro`, its results committed: what every test here starts from
    (each test can run alone)."""
    _run(["dvc", "repro"], repo_copy)
    _run(["git", "add", "-A"], repo_copy)
    _run(["git", "commit", "-qm", "baseline results"], repo_copy)
    return repo_copy


def test_dvc_repro_produces_every_declared_output(reproduced):
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    stages = lock["stages"]
    assert {"data", "train-controls", "train-plain", "train-search", "train-retrain", "cost",
            "compare", "report"} <= set(stages)
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            assert (reproduced / out["path"]).exists(), f"{name}: {out['path']} missing"
    runs = sorted(p.parent.relative_to(reproduced / "runs").as_posix()
                  for p in (reproduced / "runs").rglob("seed*/metrics.json"))
    assert runs == sorted([*(f"controls/{v}/seed{s}" for v in ("baseline", "baseline-aa")
                             for s in range(5)),
                           *(f"{g}/{v}/seed{s}" for g, v in (("plain", "fixed-max3"),
                                                             ("search", "pmpl"),
                                                             ("retrain", "two-stage"))
                             for s in (0, 1))])
    for rel in runs:
        m = json.loads((reproduced / "runs" / rel / "metrics.json").read_text())
        assert all(math.isfinite(m[k]) for k in ("top1", "top5", "val_loss", "train_seconds"))
        assert 0 <= m["top1"] <= 100 and m["variant"] == rel.split("/")[1]
    summary = json.loads((reproduced / "runs" / "controls.json").read_text())
    assert set(summary) == {"baseline", "baseline-aa"} and len(summary["baseline"]) == 5
    compare = json.loads((reproduced / "results" / "compare.json").read_text())
    pairs = {(c["a"], c["b"]) for c in compare["comparisons"]}
    assert {("pmpl", "baseline"), ("fixed-max3", "baseline"), ("two-stage", "pmpl")} <= pairs
    assert [c["a"] for c in compare["controls"]] == ["baseline-aa"]
    with (reproduced / "results" / "latency.csv").open() as fh:
        latency = list(csv.DictReader(fh))
    # every run timed on both runtimes; one architecture for the baseline's five seeds
    assert {(r["run"], r["runtime"]) for r in latency} == {
        (rel.split("/", 1)[1], rt) for rel in runs for rt in ("eager", "onnxruntime")}
    base = {r["architecture"] for r in latency if r["variant"] in ("baseline", "baseline-aa")}
    assert base == {"baseline-aa/seed0"} or base == {"baseline/seed0"}
    _check_report((reproduced / "reports" / "output" / "report.html").read_text())
    assert "up to date" in _run(["dvc", "status"], reproduced).stdout


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
    assert "95% bootstrap" not in cells  # 2 seeds: no interval may call itself one
    controls = next(t for t, c in zip(tables, captions, strict=True) if c.startswith("Controls"))
    assert "baseline-aa vs baseline" in controls.get_text(" ")  # rendered end to end
    assert "What this run can and cannot show" in text and "None of it predicts ImageNet" in text
    assert any(c.startswith("What each variant costs") for c in captions)
    assert len(soup.find_all("img")) >= 4


def test_exp_run_reruns_only_what_reads_the_changed_param(reproduced):
    proc = _run(["dvc", "exp", "run", "-S", "pmpl.inner_lr=0.01"], reproduced)
    log = proc.stdout + proc.stderr
    assert "Running stage 'train-search'" in log
    assert "Running stage 'train-controls'" not in log and "Running stage 'train-plain'" not in log
    assert "Running stage 'data'" not in log
    show = _run(["dvc", "exp", "show", "--no-pager", "--csv"], reproduced).stdout
    assert "pmpl.inner_lr" in show and "top1" in show


def test_a_stage_with_train_nproc_launches_torchrun_itself(reproduced):
    from experiments.distributed import free_port

    proc = _run(["dvc", "exp", "run", "-S", "train.nproc=2", "-S", "train.threads=1",
                 "-S", f"train.master_port={free_port()}", "train-controls"], reproduced)
    log = proc.stdout + proc.stderr
    assert "Running stage 'train-controls'" in log
    metrics = json.loads((reproduced / "runs" / "controls" / "baseline" / "seed0" /
                          "metrics.json").read_text())
    assert metrics["world_size"] == 2
