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


OWN_PACKAGES = ("metapool", "data_pipelines", "experiments")
# the command-line dispatcher imports every sub-command's modules inside its handlers
DISPATCHER = REPO / "experiments" / "cli.py"
# what a training run computes with (the import closure of these): its fingerprint's code
TRAINING_MODULES = ("experiments.train", "experiments.runs")


def module_file(module: str) -> Path | None:
    """The suite's source file of ``module`` (or of the module an imported name lives in)."""
    parts = module.split(".")
    while parts:
        base = REPO.joinpath(*parts)
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        parts = parts[:-1]
    return None


def imported_names(source: str) -> set[str]:
    """Every module a Python source imports, at any depth (function-level imports too)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def source_closure(modules: tuple[str, ...] | list[str]) -> list[Path]:
    """The suite's source files ``modules`` run: the modules, everything of the suite they
    import transitively, and the (non-empty) ``__init__`` of each package on the way; the
    dispatcher's lazy imports are not followed. Sorted."""
    todo = [module_file(m) for m in modules]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        if path == DISPATCHER:
            continue
        todo += [module_file(n) for n in imported_names(path.read_text())
                 if n.split(".")[0] in OWN_PACKAGES]
        init = path.parent / "__init__.py"
        if path != init and init.is_file() and init.read_text().strip():
            todo.append(init)
    return sorted(p for p in seen if p.read_text().strip())


@functools.cache
def code_sha256(modules: tuple[str, ...] = TRAINING_MODULES) -> str:
    """sha256 of the sources a training run computes with (``source_closure`` of
    ``modules``: relative path and bytes of each file, in sorted order), whether or not git is
    there. A report or benchmark edit leaves it alone, so a finished run still resumes."""
    digest = hashlib.sha256()
    for path in source_closure(modules):
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
