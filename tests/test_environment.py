"""The environment is the locked one, and every run says where it came from."""
from __future__ import annotations

import importlib.metadata
import re
import sysconfig
from pathlib import Path

import pandas as pd

from experiments.provenance import LOCK, lock_hash
from experiments.report import environment_table, environment_warning
from tests.helpers import write_run_metrics

IGNORED = {"pip", "metapool"}  # the installer itself, and the project (installed --no-deps)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    """name -> version of every package requirements.lock pins."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)", LOCK.read_text(), re.M)
    return {_norm(n): v for n, v in pins}


def test_the_lock_pins_every_dependency_with_hashes():
    text = LOCK.read_text()
    pins = locked()
    assert {"torch", "torchvision", "timm", "ffcv", "dvc", "pydantic", "numpy", "numba"} <= set(pins)
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in b for b in blocks if "==" in b)  # every pin carries hashes


def test_installed_environment_matches_the_lock():
    pins = locked()
    # only what is installed in the environment (setuptools puts its vendored copies of
    # packaging and platformdirs on sys.path once imported: those are not installed packages)
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    installed = {_norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                 if Path(d.locate_file("")).resolve() in site}
    wrong = {n: (installed.get(n), v) for n, v in pins.items() if installed.get(n) != v}
    extra = set(installed) - set(pins) - IGNORED
    assert not wrong, f"installed != locked (run `make setup`): {wrong}"
    assert not extra, f"installed but not locked (add them to pyproject.toml, `make lock`): {extra}"


def test_environment_table_warns_when_runs_mix_environments(tmp_path):
    def run(variant: str, commit: str, device: str) -> None:
        write_run_metrics(tmp_path / variant / "seed0", top1=1.0, variant=variant, provenance={
            "git_commit": commit * 40, "git_dirty": False, "lock_sha256": lock_hash(),
            "torch": "2.14.1", "device_type": device, "device_name": device})

    run("baseline", "a", "cuda")
    run("pmpl", "a", "cuda")
    table = environment_table(tmp_path)
    assert len(table) == 1 and table.loc[0, "runs"] == "baseline/seed0, pmpl/seed0"
    assert environment_warning(table) is None
    run("pmpl-leak", "b", "cpu")
    table = environment_table(tmp_path)
    warning = environment_warning(table)
    assert len(table) == 2 and "git_commit" in warning and "device_type" in warning
    assert isinstance(table, pd.DataFrame)
