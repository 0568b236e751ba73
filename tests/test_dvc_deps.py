"""Every DVC stage depends on every module its command runs: editing one of them makes DVC
rerun the stage instead of leaving its results stale."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments.provenance import TRAINING_MODULES, imported_names, source_closure
from tests.helpers import REPO
from tests.test_layout import OWN

# what each `metapool` sub-command runs (the modules its handler in experiments/cli.py imports;
# the dispatcher's own lazy imports are those of every sub-command and are not followed)
COMMANDS = {
    "data prepare": ["experiments.cli", "experiments.config", "data_pipelines.prepare"],
    "train": ["experiments.cli", "experiments.config", "experiments.runs", "experiments.launch",
              "experiments.train"],
    "cost": ["experiments.cli", "experiments.config", "experiments.cost"],
    "compare": ["experiments.cli", "experiments.config", "experiments.compare"],
    "report": ["experiments.cli", "experiments.config", "experiments.report"],
}


def closure(modules: list[str], notebooks: list[Path] = ()) -> set[Path]:
    """The suite's files ``modules`` run (``experiments.provenance.source_closure``), plus the
    notebooks and what their code cells import."""
    names = list(modules)
    for nb in notebooks:
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "code":
                names += [n for n in imported_names("".join(cell["source"]))
                          if n.split(".")[0] in OWN]
    return set(source_closure(names)) | set(notebooks)


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _command(cmd: str) -> str:
    words = cmd.split()
    assert words[0] == "metapool", cmd
    return "data prepare" if words[1] == "data" else words[1]


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


@pytest.mark.parametrize("stage", list(_stages()))
def test_a_stage_depends_on_every_module_its_command_runs(stage):
    spec = _stages()[stage]
    deps = [str(d).split("#")[0].strip() for d in spec.get("deps", [])]
    extra = [REPO / d for d in deps if d.endswith(".ipynb")]
    needed = closure(COMMANDS[_command(spec["cmd"])], extra)
    missing = sorted(str(p.relative_to(REPO)) for p in needed if not _covered(p, deps))
    assert not missing, f"{stage} runs these but does not depend on them: {missing}"
    # and no dependency on code it never runs (a benchmark edit must not retrain everything)
    code = [d for d in deps if d.endswith(".py") or (REPO / d).is_dir() and
            any((REPO / d).rglob("*.py"))]
    for d in code:
        files = [REPO / d] if d.endswith(".py") else sorted((REPO / d).rglob("*.py"))
        assert any(f in needed for f in files), f"{stage} depends on {d}, which it never runs"
        if not d.endswith(".py"):
            unused = [str(f.relative_to(REPO)) for f in files if f not in needed]
            assert not unused, f"{stage}: {d} holds modules it never runs: {unused}"


def test_the_checker_follows_imports_into_other_packages():
    files = {p.relative_to(REPO).as_posix() for p in closure(COMMANDS["train"])}
    assert {"experiments/train.py", "data_pipelines/loaders.py", "data_pipelines/prepared.py",
            "metapool/pmpl.py", "metapool/ops.py"} <= files
    assert "experiments/report.py" not in files and not any("benchmarks" in f for f in files)


def test_a_runs_fingerprint_covers_exactly_the_code_training_runs():
    from experiments.provenance import code_sha256

    files = set(source_closure(list(TRAINING_MODULES)))
    assert files <= closure(COMMANDS["train"])  # nothing training does not run
    assert {REPO / "experiments" / "train.py", REPO / "metapool" / "pmpl.py"} <= files
    assert not any(f.name in ("report.py", "deploy.py") or "benchmarks" in f.parts
                   for f in files)
    assert len(code_sha256()) == 64
