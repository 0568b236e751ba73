"""The schema of ``params.yaml``, one typed tree (pydantic v2), and the run a variant resolves to.

Each part owns its section: ``metapool.pmpl.PMPLSettings`` the ``pmpl`` section,
``data_pipelines.config.DataConfig`` the ``data`` section; this module adds the recipes, the
model, the variants, how runs execute (``train``) and the statistics (``compare``), and composes
them. Every model rejects unknown keys. ``load_params`` turns any validation error into one
``ValueError`` line that names the key, the bad value and what is allowed ("did you mean":
``experiments.params_errors``). ``experiments.runs`` resolves a variant and a seed into the one
``RunConfig`` the Trainer takes.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from data_pipelines.config import DataConfig
from experiments.params_errors import format_error
from metapool.models import ATTENTIONS, BACKBONES, HEADS
from metapool.ops import DEFAULT_CANDIDATES
from metapool.pmpl import PMPLSettings

Mode = Literal["baseline", "pmpl", "retrain", "fixed", "attention"]
Backbone = Literal[tuple(BACKBONES)]


def _positive_lr(value: float) -> float:
    if not value > 0:
        raise ValueError("a learning rate must be > 0")
    return value


LearningRate = Annotated[float, AfterValidator(_positive_lr)]


def _invalid(message: str) -> PydanticCustomError:
    """A whole one-line message (cross-field rules name their keys themselves)."""
    return PydanticCustomError("params", "{message}", {"message": message})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_Model = typing.TypeVar("_Model", bound=BaseModel)


class Recipe(_Section):
    """A training recipe (METHOD.md section 4); ``lr`` is for ``lr_base_batch`` images and
    scales linearly with the global ``batch_size``."""

    epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=1)  # global (split over processes)
    img_size: int = Field(64, ge=16)
    seed_base: int = Field(0, ge=0)  # a run's random seed is seed_base + its entry of `seeds`
    opt: Literal["sgd", "momentum", "lamb", "rmsproptf", "adamw"] = "sgd"
    opt_eps: float | None = Field(None, gt=0)  # None: the optimizer's own default
    lr: LearningRate = 0.1
    lr_base_batch: int = Field(64, ge=1)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(4e-5, ge=0)
    sched: Literal["cosine", "step"] = "cosine"
    sched_on_updates: bool = True  # False: the lr changes once per epoch (timm's default)
    decay_rate: float = Field(0.1, gt=0)
    decay_epochs: float = Field(1.0, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    # timm's --lr-noise: lr noise between these fractions of the schedule (noise_range_t)
    lr_noise: tuple[float, float] | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    randaugment: str = ""  # timm's string, e.g. rand-m9-mstd0.5 (per image, both loaders)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # resizes, train and eval
    reprob: float = Field(0.0, ge=0, le=1)  # random erasing (pixel mode, after normalising)
    drop_rate: float = Field(0.0, ge=0, lt=1)
    # the published head's dropout; None: 0.2, what the authors' model ran whatever --drop said
    head_drop_rate: float | None = Field(None, ge=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    amp: bool = True  # autocast on GPUs (CPU runs are float32 either way)
    # float16 adds a gradient scaler (timm's --amp); bfloat16 needs none
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    scale: tuple[float, float] = (0.08, 1.0)
    clip_grad: float = Field(0.0, ge=0)  # max gradient norm; 0: no clipping
    # PMPL's search schedule under this recipe
    deadline_epoch: int = Field(4, ge=0)
    alpha_lr: LearningRate = 3e-4

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("need 0 < min <= max <= 1")
        return value

    @field_validator("lr_noise")
    @classmethod
    def _noise_window(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1] <= 1:
            raise ValueError("need fractions of the schedule, 0 <= start < end <= 1")
        return value

    @field_validator("randaugment")
    @classmethod
    def _known_randaugment(cls, value: str) -> str:
        if value:
            from data_pipelines.randaugment import parse_randaugment

            parse_randaugment(value)
        return value


class ModelParams(_Section):
    backbone: Backbone = "mobilenetv2_100"
    width: float = Field(1.0, gt=0)
    # 1: MobileNetV2's stem at stride 1, every feature map twice as large (the geometry run)
    stem_stride: int = Field(2, ge=1, le=2)


class TrainParams(_Section):
    """How a run executes (not what it learns)."""

    # auto: this process's GPU when CUDA is available; cpu: never CUDA (the CPU test suite)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(2, ge=1)
    nproc: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    sync_bn: bool = False
    channels_last: bool = True
    compile: bool = False

    @field_validator("master_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError("must be a TCP port in [1, 65535]")
        return value

    @model_validator(mode="after")
    def _rank_in_world(self) -> TrainParams:
        if self.node_rank >= self.nnodes:
            raise _invalid(f"train.node_rank={self.node_rank} is invalid: must lie in "
                           f"[0, train.nnodes={self.nnodes})")
        return self


class Variant(_Section):
    """One experiment: a mode plus what it overrides (``pmpl``: keys of the pmpl section)."""

    mode: Mode = "baseline"
    backbone: Backbone | None = None
    fixed_op: Literal[DEFAULT_CANDIDATES] | None = None
    attention: Literal[ATTENTIONS] | None = None
    genotype_from: str | None = None
    # at least this many seeds: the group's, extended by the next unused integers
    min_seeds: int = Field(1, ge=1)
    # parts of the authors' published model (METHOD.md 4b), MobileNetV2 only
    head: Literal[HEADS] = "plain"
    output_gates: bool = False
    pmpl: dict[str, Any] = Field(default_factory=dict)
    # keys of the active recipe this variant changes (e.g. the positive control's epochs)
    recipe: dict[str, Any] = Field(default_factory=dict)
    # added to every run's random seed: the same seeds' pairing, another random stream
    # (the negative control: the baseline again, with nothing else changed)
    seed_offset: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _mode_needs(self) -> Variant:
        needs = {"fixed": ("fixed_op", "choose from " + ", ".join(DEFAULT_CANDIDATES)),
                 "attention": ("attention", "choose from " + ", ".join(ATTENTIONS)),
                 "retrain": ("genotype_from", "name the PMPL variant whose genotype to retrain")}
        if self.mode in needs:
            key, allowed = needs[self.mode]
            if not getattr(self, key):
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid: {allowed}")
        return self


class CompareSettings(_Section):
    """Statistics of the compare stage (METHOD.md section 6)."""

    confidence: float = Field(0.95, gt=0, lt=1)
    resamples: int = Field(10000, ge=100)
    min_seeds: int = Field(5, ge=2)
    extra_pairs: list[tuple[str, str]] = Field(default_factory=list)
    # controls of the decision rule: [a, b, expected verdict of a against b]
    controls: list[tuple[str, str, Literal["no difference", "worse", "better"]]] = Field(
        default_factory=list)
    out_dir: str = "results"
    seed: int = 0  # of the bootstrap resampling


class CostSettings(_Section):
    """Deployed latency (``metapool cost``, metapool.deploy): batch 1, interleaved with the
    baseline on each runtime."""

    runtimes: list[Literal["eager", "inductor", "onnxruntime", "executorch"]] = Field(
        default_factory=lambda: ["eager", "onnxruntime"], min_length=1)
    threads: int = Field(1, ge=1)
    img_size: int = Field(224, ge=16)
    rounds: int = Field(15, ge=3)  # interleaved rounds per (model, runtime)
    calls: int = Field(5, ge=1)    # calls per block of a round (its median is the block's time)


class Params(_Section):
    """The whole of ``params.yaml``."""

    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 1],
                                                     min_length=1)
    # the seeds of the controls and their reference (the `controls` stage group): at least
    # compare.min_seeds of them, or the controls cannot reach a verdict
    control_seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    recipe: str = "default"
    recipes: dict[str, Recipe] = Field(default_factory=lambda: {"default": Recipe()})
    model: ModelParams = Field(default_factory=ModelParams)
    pmpl: PMPLSettings = Field(default_factory=PMPLSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainParams = Field(default_factory=TrainParams)
    variants: dict[str, Variant] = Field(default_factory=lambda: {"baseline": Variant()})
    # DVC's matrix lists (names of variants per stage group)
    stages: dict[str, list[str]] = Field(default_factory=dict)
    compare: CompareSettings = Field(default_factory=CompareSettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    runs_dir: str = "runs"

    @model_validator(mode="after")
    def _cross_references(self) -> Params:
        if self.recipe not in self.recipes:
            raise _invalid(f"recipe={self.recipe!r} is invalid: choose from "
                           f"{', '.join(self.recipes)}")
        for name in self.variants:
            self.variant_pmpl(name)
        for pair in self.compare.extra_pairs:
            if not all(v in self.variants for v in pair):
                raise _invalid(f"compare.extra_pairs={list(pair)!r} is invalid: each entry is "
                               "[variant_a, variant_b] of variants")
        for a, b, _ in self.compare.controls:
            if a not in self.variants or b not in self.variants:
                raise _invalid(f"compare.controls entry [{a}, {b}] is invalid: both must be "
                               "variants")
        if self.compare.controls and len(self.control_seeds) < self.compare.min_seeds:
            raise _invalid(f"control_seeds has {len(self.control_seeds)} seeds, fewer than "
                           f"compare.min_seeds={self.compare.min_seeds}: the controls could "
                           "never reach a verdict; list more seeds")
        for name, v in self.variants.items():
            self.variant_recipe(name)
            backbone = v.backbone or self.model.backbone
            if (v.head != "plain" or v.output_gates) and backbone != "mobilenetv2_100":
                raise _invalid(f"variants.{name}: head/output_gates (the published model's "
                               f"parts) need backbone mobilenetv2_100, not {backbone}")
        for group, names in self.stages.items():
            for name in names:
                if name not in self.variants:
                    raise _invalid(f"stages.{group}={name!r} is invalid: unknown variant: define "
                                   f"it under variants ({', '.join(self.variants)})")
        return self

    @property
    def active_recipe(self) -> Recipe:
        return self.recipes[self.recipe]

    def pipeline_runs(self) -> set[str] | None:
        """The runs (``variant/seedK``) the DVC pipeline trains under this configuration: the
        ``controls`` group at ``control_seeds``, every other group at ``seeds``; None when
        ``stages`` lists no groups (then every run found is taken)."""
        if not self.stages:
            return None
        return {f"{name}/seed{seed}" for names in self.stages.values() for name in names
                for seed in self.variant_seeds(name)}

    def variant_group(self, name: str) -> str:
        """The stage group (``stages``) that trains variant ``name``; ``other`` when none does
        (a variant trained by hand)."""
        return next((group for group, names in self.stages.items() if name in names), "other")

    def run_dir(self, variant: str, seed: int) -> Path:
        """Where run (``variant``, ``seed``) lives: ``runs_dir/GROUP/VARIANT/seedS``, one folder
        per stage group (the group's DVC output)."""
        return Path(self.runs_dir) / self.variant_group(variant) / variant / f"seed{seed}"

    def variant_seeds(self, name: str) -> list[int]:
        """The seeds the pipeline trains variant ``name`` at: ``control_seeds`` in the
        ``controls`` group, ``seeds`` otherwise, extended by the next unused integers to the
        variant's ``min_seeds``."""
        seeds = list(self.control_seeds if name in self.stages.get("controls", []) else self.seeds)
        need = self.variants[name].min_seeds if name in self.variants else 1
        candidate = 0
        while len(seeds) < need:
            if candidate not in seeds:
                seeds.append(candidate)
            candidate += 1
        return seeds

    def variant_recipe(self, name: str) -> Recipe:
        """The active recipe with variant ``name``'s overrides applied (validated)."""
        overrides = self.variants[name].recipe if name in self.variants else {}
        return _override(self.active_recipe, overrides, ("variants", name, "recipe"))

    def variant_pmpl(self, name: str) -> PMPLSettings:
        """The pmpl section with variant ``name``'s overrides applied (validated)."""
        return _override(self.pmpl, self.variants[name].pmpl, ("variants", name, "pmpl"))


def _override(section: _Model, overrides: dict[str, Any], where: tuple[str, ...]) -> _Model:
    """``section`` with ``overrides`` applied and validated; a bad value is a one-line error
    naming its key under ``where``."""
    if not overrides:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **overrides})
    except ValidationError as exc:
        raise _invalid(format_error(exc, type(section), where)) from None


def parse_params(data: dict) -> Params:
    """Validate a params mapping (e.g. ``params.yaml`` after ``-S`` overrides)."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as exc:
        raise ValueError(format_error(exc, Params)) from None


def load_params(path: str | Path | None, overrides: list[str] | None = None) -> Params:
    """Read and validate ``params.yaml`` (None: the defaults); ``overrides`` are
    ``dotted.key=value`` strings with YAML values, as ``dvc exp run -S`` takes them."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"params file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        *parents, last = key.split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = yaml.safe_load(raw)
    return parse_params(data)
