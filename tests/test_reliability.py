"""Parameter validation, atomic writes and a full disk."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml

from experiments.config import load_params, parse_params
from metapool.io import atomic_path, atomic_write_text
from tests.helpers import REPO, metapool


def _params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.recipe == "default" and {"paper", "standard"} <= set(params.recipes)
    assert set(params.stages["plain"]) | set(params.stages["search"]) <= set(params.variants)


def test_controls_are_the_baseline_but_for_their_one_knob():
    from experiments.runs import resolve_run

    params = load_params(REPO / "params.yaml")
    base, aa, short = (resolve_run(params, v, 3) for v in ("baseline", "baseline-aa",
                                                            "baseline-short"))
    assert aa.seed == base.seed == 3 and aa.rng_seed == base.rng_seed + 1000  # another stream
    assert short.recipe.epochs == base.recipe.epochs - 1  # the positive control's handicap
    assert aa.recipe == base.recipe and aa.model_args == base.model_args == short.model_args
    assert short.recipe.model_dump(exclude={"epochs"}) == base.recipe.model_dump(exclude={"epochs"})
    assert len(params.control_seeds) >= params.compare.min_seeds


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("override,message", [
    ("pmpl.innerlr=0.1", r"unknown key pmpl.innerlr \(did you mean 'inner_lr'\?\)"),
    ("pmpl.candidates=[skip,max_pool_9x9]", "unknown candidate op 'max_pool_9x9'"),
    ("pmpl.threshold=1.5", r"pmpl.threshold=1.5 must lie in \(0, 1\]"),
    ("pmpl.threshold=0", r"pmpl.threshold=0.0 must lie in \(0, 1\]"),
    ("variants.baseline-short.recipe.epochs=0",
     r"variants.baseline-short.recipe.epochs=0 must be >= 1"),
    ("control_seeds=[0,1]", "control_seeds has 2 seeds, fewer than compare.min_seeds=5"),
    ("data.meta_split=1.0", r"data.meta_split=1.0 must lie in \(0, 1\)"),
    ("pmpl.meta_split=0.3", "pmpl.meta_split moved to data.meta_split"),
    ("pmpl.alpha_lr=0.1", r"pmpl.alpha_lr moved to recipes.<recipe>.alpha_lr"),
    ("recipes.default.alph_lr=0.1", r"unknown key recipes.default.alph_lr \(did you mean 'alpha_lr'\?\)"),
    ("pmpl.inner_lr=-0.01", "pmpl.inner_lr=-0.01 must be >= 0"),
    ("recipes.default.lr=-0.1", "recipes.default.lr=-0.1 is invalid: a learning rate must be > 0"),
    ("model.backbone=vgg16", "model.backbone='vgg16' is invalid: choose from mobilenetv2_100"),
    ("data.imagenet_root=/nonexistent/imagenet", "data.imagenet_root='/nonexistent/imagenet' is invalid: no such folder"),
    ("recipe=fast", "recipe='fast' is invalid: choose from default, paper, paper-final, standard"),
    ("variants.pmpl.pmpl={stop_rule: magic}",
     "variants.pmpl.pmpl.stop_rule='magic' is invalid: choose from margin, reference_code"),
    ("variants.pmpl.pmpl={innerlr: 1}", r"unknown key variants.pmpl.pmpl.innerlr \(did you mean"),
    ("variants.x={mode: fixed}", "variants.x.fixed_op=None is invalid: choose from skip"),
    ("recipes.paper.randaugment=rand-m99", "recipes.paper.randaugment='rand-m99' is invalid: "),
    ("recipes.paper.lr_noise=[0.9,0.42]", "recipes.paper.lr_noise=.* is invalid: need fractions"),
    ("stages.search=[pmpl,nope]", "stages.search='nope' is invalid: unknown variant"),
    ("train.node_rank=2", r"train.node_rank=2 is invalid: must lie in \[0, train.nnodes=1\)"),
    ("train.master_port=70000", "train.master_port=70000 is invalid: must be a TCP port"),
    ("train.nproc=0", "train.nproc=0 must be >= 1"),
])
def test_bad_parameters_name_the_key(override, message):
    with pytest.raises(ValueError, match=message) as error:
        load_params(REPO / "params.yaml", [override])
    assert "\n" not in str(error.value)  # one line, whatever pydantic found


def test_wrong_types_are_reported():
    data = _params()
    data["recipes"]["default"]["epochs"] = "many"
    with pytest.raises(ValueError, match="recipes.default.epochs='many' is invalid: expected int"):
        parse_params(data)


@pytest.mark.parametrize("args", [
    ["train", "--variant", "baseline", "--set", "pmpl.threshold=2"],
    ["data", "prepare", "--out", "/tmp/never", "--set", "pmpl.threshold=2"],
    ["compare", "--set", "pmpl.threshold=2"],
])
def test_every_entry_point_validates_first(args):
    proc = metapool(*args, "--params", str(REPO / "params.yaml"), check=False, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "pmpl.threshold=2.0 must lie in (0, 1]" in lines[0]


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = metapool("train", "--params", str(REPO / "params.yaml"), "--variant", "baseline",
                    "--set", f"data.out_dir={tmp_path / 'nothing'}", check=False, timeout=120)
    assert proc.returncode == 2
    assert "prepared dataset" in proc.stderr and "metapool data prepare" in proc.stderr


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old and complete")
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="no space left on device while writing .*metrics.json: free disk"):
        atomic_write_text(target, "new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == "old and complete"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoint_write_failure_leaves_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from experiments.checkpoint import Checkpoints

    ckpts = Checkpoints(tmp_path)
    ckpts.save({"epoch": 0}, 0)

    def enospc(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(OSError, match="no space left on device"):
        ckpts.save({"epoch": 1}, 1)
    monkeypatch.undo()
    state, path = ckpts.load_latest()
    assert state == {"epoch": 0} and path.name == "ckpt_epoch0000.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_epoch0000.pt"]


def test_exception_inside_atomic_path_removes_the_temporary(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.beton") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_cpu_runs_never_touch_cuda_even_where_it_is_available(monkeypatch):
    import torch

    from experiments.distributed import init_distributed

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""  # conftest hides CUDA from the suite
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CI machine with a GPU
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(i))
    assert init_distributed("cpu").device.type == "cpu" and not calls
    assert init_distributed("auto").device.type == "cuda" and calls == [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="train.device=cuda but CUDA is not available"):
        init_distributed("cuda")
    from tests.helpers import TINY

    assert TINY["train"]["device"] == "cpu"  # the tests' params say they are CPU runs


def test_without_ffcv_prepare_writes_the_manifest_for_the_torchvision_loader(tmp_path,
                                                                             monkeypatch):
    import importlib.util

    from data_pipelines.loaders import build_streams
    from data_pipelines.prepare import prepare
    from tests.helpers import stream_recipe, write_params

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ffcv" else real(name, *a))
    params = load_params(write_params(tmp_path / "params.yaml", tmp_path / "data",
                                      tmp_path / "runs"), ["data.loader.backend=torchvision",
                                                           "data.loader.workers=0"])
    report = prepare(tmp_path / "data", params.data)
    assert (tmp_path / "data" / "manifest.csv").is_file()
    assert not list((tmp_path / "data").glob("*.beton"))
    assert report["images"]["train"] > 0
    streams = build_streams(params.data, stream_recipe(img_size=32, batch_size=4, scale=(0.8, 1.0)),
                            seed=0)
    x, y = next(iter(streams.train))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_a_runs_fingerprint_changes_with_its_code(monkeypatch):
    from experiments import provenance
    from experiments.runs import resolve_run

    run = resolve_run(load_params(REPO / "params.yaml"), "baseline", 0)
    report = {"images": {"train": 10}, "data_id": "x"}
    before = run.fingerprint(1, report)
    assert run.fingerprint(1, report) == before  # deterministic
    monkeypatch.setattr(provenance, "code_sha256", lambda *a: "other code")
    assert run.fingerprint(1, report) != before


def test_metrics_json_is_one_record_written_and_read_back(tmp_path):
    from experiments.metrics import RunMetrics, read_metrics, write_metrics

    fields = dict(top1=50.0, top5=90.0, val_loss=1.5, params=3_504_872, macs_224=300_774_272,
                  macs_train_res=12_000_000, train_seconds=10.0, train_images_per_s=400.0,
                  epochs=4, img_size=48, recipe="default", dataset="generated", seed=0,
                  mode="baseline", variant="baseline", backbone="mobilenetv2_100",
                  genotype_from=None, head="plain", output_gates=False, world_size=1, ema=False,
                  provenance={"git_commit": "abc"})
    write_metrics(tmp_path / "metrics.json", RunMetrics(**fields))
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert list(data) == list(fields)  # no frozen_ops key where no search ran
    assert read_metrics(tmp_path) == read_metrics(tmp_path / "metrics.json") == RunMetrics(**fields)
    searched = RunMetrics(**fields, frozen_ops={"blocks.1.0": ["max_pool_3x3"]})
    write_metrics(tmp_path / "metrics.json", searched)
    assert read_metrics(tmp_path).frozen_ops == {"blocks.1.0": ["max_pool_3x3"]}
    # a file of another shape (a renamed key) is a one-line error naming the file and the key
    data["top_1"] = data.pop("top1")
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"metrics.json is not a metrics record of this suite "
                                         r"\(top1: Field required\): rerun"):
        read_metrics(tmp_path)


def test_a_bad_mode_is_one_line_naming_the_flag(tmp_path):
    proc = metapool("train", "--params", str(REPO / "params.yaml"), "--mode", "bogus",
                    "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("metapool train: error: --mode='bogus' is invalid: choose "
                                   "from baseline, pmpl, retrain, fixed, attention")
    proc = metapool("train", "--params", str(REPO / "params.yaml"), "--mode", "fixed",
                    "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and "--mode fixed: fixed_op=None is invalid" in proc.stderr
    assert not (tmp_path / "run").exists()
