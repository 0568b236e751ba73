"""Genotype: which op(s) every enhancer kept, when it froze, and with what probabilities."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metapool.io import atomic_write_text
from metapool.ops import check_candidates


@dataclass
class LayerChoice:
    """One enhancer's decision."""

    layer: str
    ops: list[str]
    probs: list[float] = field(default_factory=list)
    step: int = -1
    epoch: int = -1
    reason: str = "margin"  # margin | reference_code | deadline | end_of_training | fixed


@dataclass
class Genotype:
    """One entry per enhancer, in network order, plus the candidate list they chose from."""

    layers: list[LayerChoice]
    candidates: list[str]
    split_ratio: float = 1.0

    def __post_init__(self) -> None:
        check_candidates(self.candidates)
        for choice in self.layers:
            check_candidates(choice.ops)

    def ops_by_layer(self) -> dict[str, list[str]]:
        return {c.layer: list(c.ops) for c in self.layers}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Genotype:
        return cls(
            layers=[LayerChoice(**c) for c in data["layers"]],
            candidates=list(data["candidates"]),
            split_ratio=float(data.get("split_ratio", 1.0)),
        )

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"genotype file {path} does not exist: run a PMPL search first")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"genotype file {path} is not a valid genotype: {exc}") from exc

    @classmethod
    def uniform(cls, layers: list[str], op: str, split_ratio: float = 1.0) -> Genotype:
        """Every enhancer fixed to ``op`` (the fixed-pooling ablation)."""
        return cls(
            layers=[LayerChoice(layer=n, ops=[op], reason="fixed") for n in layers],
            candidates=[op],
            split_ratio=split_ratio,
        )
