"""Where a run came from: commit, locked environment, versions, hardware, determinism.

Written into every ``metrics.json`` (and dvclive's params) so that a result says which code,
which environment and which machine produced it. No host or user names.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.cache
def code_sha256() -> str:
    """sha256 of the suite's Python sources (metapool, experiments, data_pipelines: relative
    path and bytes of every ``.py`` file, in sorted order): the version of the code whether or
    not git is there."""
    digest = hashlib.sha256()
    for path in sorted(p for package in ("metapool", "experiments", "data_pipelines")
                       for p in (REPO / package).rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def lock_hash() -> str | None:
    """sha256 of requirements.lock (None when the file is not there)."""
    return hashlib.sha256(LOCK.read_bytes()).hexdigest() if LOCK.is_file() else None


def provenance(device: torch.device, world_size: int, compiled: bool) -> dict:
    """Everything that identifies the code, environment and hardware of a run."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "code_sha256": code_sha256(),
        "lock_sha256": lock_hash(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timm": _version("timm"),
        "ffcv": _version("ffcv"),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
        "world_size": world_size,
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # what decides whether a rerun is bit-identical (README: "Determinism")
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "torch_compile": compiled,
    }
    return info
