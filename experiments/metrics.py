"""``metrics.json``: what one finished run measured, as one typed record.

The Trainer writes it (``write_metrics``) and the report, the findings and the GPU check read it
(``read_metrics``); its keys are also ``compare``'s columns and DVC's metrics. A field added or
renamed here is one change for the writer and every reader; a file that does not fit the record
(another version of the suite) is an error naming the file, not a silent ``None``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from metapool.io import atomic_write_text


class RunMetrics(BaseModel):
    """One run: the final evaluation, the model's cost, how it was trained and where."""

    model_config = ConfigDict(extra="forbid")

    top1: float  # % of the val set, the final model (EMA when the recipe keeps one)
    top5: float
    val_loss: float
    params: int  # of the deployed model (PMPL: the adapted genotype), 224 px, at the run's classes
    macs_224: int
    macs_train_res: int  # at the recipe's img_size
    train_seconds: float  # training steps only (not evaluation, not start-up)
    train_images_per_s: float  # over every process
    epochs: int
    img_size: int
    recipe: str
    dataset: str
    seed: int
    mode: str
    variant: str
    backbone: str
    genotype_from: str | None  # retrain runs: the PMPL variant whose genotype this trained
    head: str
    output_gates: bool
    world_size: int
    ema: bool
    frozen_ops: dict[str, list[str]] | None = None  # PMPL runs: the chosen op(s) per layer
    provenance: dict[str, Any]  # experiments.provenance: commit, lock, versions, device

    def to_json(self) -> str:
        """The file's text (``frozen_ops`` only where a search ran)."""
        return json.dumps(self.model_dump(exclude={"frozen_ops"} if self.frozen_ops is None
                                          else set()), indent=2) + "\n"


def write_metrics(path: str | Path, metrics: RunMetrics) -> None:
    """Write ``metrics.json`` atomically (a killed run leaves no half-written file)."""
    atomic_write_text(Path(path), metrics.to_json())


def read_metrics(path: str | Path) -> RunMetrics:
    """A run's ``metrics.json`` (its folder or the file itself)."""
    path = Path(path)
    path = path / "metrics.json" if path.is_dir() else path
    try:
        return RunMetrics.model_validate_json(path.read_text())
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ValueError(f"{path} is not a metrics record of this suite "
                         f"({'.'.join(map(str, first['loc']))}: {first['msg']}): rerun its "
                         "training stage (dvc repro)") from None
