"""The package layout: imports point down only (experiments -> data_pipelines -> metapool.io,
experiments -> metapool), so the method never depends on the pipeline around it."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

# package -> what it may import of the suite's own packages (prefixes)
ALLOWED = {
    "metapool": ("metapool",),
    "data_pipelines": ("data_pipelines", "metapool.io"),
    "experiments": ("experiments", "data_pipelines", "metapool"),
}
OWN = ("metapool", "data_pipelines", "experiments")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", list(ALLOWED))
def test_imports_point_down_only(package):
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        for module in imports_of(path):
            if module.split(".")[0] in OWN and not _allowed(module, ALLOWED[package]):
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_function_level_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from experiments.config import Params\n")
    assert "experiments.config.Params" in imports_of(path)
    assert not _allowed("experiments.config", ALLOWED["data_pipelines"])


def test_console_script_is_the_experiments_cli():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["metapool"] == "experiments.cli:main"
