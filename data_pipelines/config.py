"""The ``data`` section of ``params.yaml``: which images, how they are written, how they are read.

``data_pipelines`` owns these settings; ``experiments/config.py`` composes them into the whole
schema. Every model rejects unknown keys (``extra="forbid"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DefaultDataset(_Section):
    """The generated embedded default (used when ``imagenet_root`` is empty)."""

    classes: int = Field(10, ge=2)
    train_per_class: int = Field(200, ge=2)
    val_per_class: int = Field(40, ge=1)
    size: int = Field(48, ge=16)


class WriterConfig(_Section):
    """ffcv-imagenet's writer knobs for the ``.beton`` files."""

    max_resolution: int = Field(256, ge=16)
    jpeg_quality: int = Field(90, ge=1, le=100)
    compress_probability: float = Field(0.5, ge=0, le=1)
    write_mode: Literal["proportion", "smart", "raw", "jpg"] = "proportion"
    workers: int = Field(2, ge=1)


class LoaderSettings(_Section):
    """Which loader reads the prepared data, with how many worker threads/processes."""

    backend: Literal["ffcv", "torchvision"] = "ffcv"
    workers: int = Field(1, ge=0)


class DataConfig(_Section):
    """Everything ``metapool data prepare`` and the training loaders read."""

    imagenet_root: str = ""  # empty: the generated default dataset (NOT ImageNet)
    classes: int | None = Field(None, ge=1)
    train_per_class: int | None = Field(None, ge=1)
    val_per_class: int | None = Field(None, ge=1)
    class_list: str = ""
    seed: int = Field(0, ge=0)
    # share of every class's train images held out as PMPL's meta split, for every variant
    meta_split: float = Field(0.2, gt=0, lt=1)
    out_dir: str = "data/prepared"
    default: DefaultDataset = Field(default_factory=DefaultDataset)
    writer: WriterConfig = Field(default_factory=WriterConfig)
    loader: LoaderSettings = Field(default_factory=LoaderSettings)

    @field_validator("imagenet_root")
    @classmethod
    def _root_exists(cls, value: str) -> str:
        if value and not Path(value).expanduser().is_dir():
            raise ValueError("no such folder: point it at an ILSVRC2012 root (train/, val/) or "
                             "leave it empty for the generated default dataset")
        return value

    @field_validator("class_list")
    @classmethod
    def _class_list_exists(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError("no such file")
        return value

    @property
    def dataset_name(self) -> str:
        """``embedded-default``, ``imagenet`` or ``imagenet-subset``."""
        if not self.imagenet_root:
            return "embedded-default"
        whole = self.classes is None and self.train_per_class is None and not self.class_list
        return "imagenet" if whole else "imagenet-subset"
