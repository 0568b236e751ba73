"""The schema of ``params.yaml``: every entry point validates its parameters here first.

Unknown keys, unknown ops/backbones, out-of-range values and missing paths raise a one-line
``ValueError`` naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metapool.models import ATTENTIONS, BACKBONES
from metapool.ops import DEFAULT_CANDIDATES, check_candidates
from metapool.pmpl import PMPLConfig

MODES = ("baseline", "pmpl", "retrain", "fixed", "attention")
OPTIMIZERS = ("sgd", "momentum", "lamb", "rmsproptf", "adamw")
SCHEDULERS = ("cosine", "step")
BACKENDS = ("ffcv", "torchvision")
META_SOURCES = ("heldout", "val")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: {allowed}")


@dataclass
class Recipe:
    """A training recipe (METHOD.md section 4); ``lr`` is for ``lr_base_batch`` images."""

    epochs: int = 6
    batch_size: int = 64
    img_size: int = 64
    opt: str = "sgd"
    lr: float = 0.1
    lr_base_batch: int = 64
    momentum: float = 0.9
    weight_decay: float = 4e-5
    sched: str = "cosine"
    decay_rate: float = 0.1
    decay_epochs: float = 1.0
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    randaugment: str = ""
    reprob: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    ema_decay: float = 0.0
    amp: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    clip_grad: float = 0.0
    # PMPL's schedule under this recipe (used where pmpl.deadline_epoch / alpha_lr are null)
    deadline_epoch: int = 4
    alpha_lr: float = 3e-4

    def validate(self, name: str) -> None:
        k = f"recipes.{name}"
        _require(self.epochs >= 1, f"{k}.epochs", self.epochs, "must be >= 1")
        _require(self.batch_size >= 1, f"{k}.batch_size", self.batch_size, "must be >= 1")
        _require(self.img_size >= 16, f"{k}.img_size", self.img_size, "must be >= 16")
        _require(self.opt in OPTIMIZERS, f"{k}.opt", self.opt, f"choose from {OPTIMIZERS}")
        _require(self.lr > 0, f"{k}.lr", self.lr, "a learning rate must be > 0")
        _require(self.alpha_lr > 0, f"{k}.alpha_lr", self.alpha_lr, "a learning rate must be > 0")
        _require(self.weight_decay >= 0, f"{k}.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.sched in SCHEDULERS, f"{k}.sched", self.sched, f"choose from {SCHEDULERS}")
        _require(0 <= self.ema_decay < 1, f"{k}.ema_decay", self.ema_decay, "must lie in [0, 1)")
        _require(0 <= self.reprob <= 1, f"{k}.reprob", self.reprob, "must lie in [0, 1]")
        _require(0 < self.scale[0] <= self.scale[1] <= 1, f"{k}.scale", list(self.scale),
                 "need 0 < min <= max <= 1")
        for key in ("warmup_lr", "min_lr", "mixup", "cutmix", "label_smoothing", "drop_rate",
                    "drop_path_rate", "clip_grad", "warmup_epochs"):
            _require(getattr(self, key) >= 0, f"{k}.{key}", getattr(self, key), "must be >= 0")


@dataclass
class PMPLParams:
    """``pmpl`` section: the search (PMPLConfig) plus the data it learns alpha on."""

    candidates: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    split_ratio: float = 1.0
    meta_split: float = 0.2
    meta_source: str = "heldout"
    inner_lr: float = 0.0
    inner_steps: int = 1
    order: str = "first"
    second_order_method: str = "finite_difference"
    fd_eps: float = 0.01
    alpha_lr: float | None = None
    alpha_betas: tuple[float, float] = (0.5, 0.999)
    alpha_weight_decay: float = 1e-3
    threshold: float = 0.3
    stop_rule: str = "margin"
    deadline_epoch: int | None = None
    deadline_policy: str = "top2"
    history_every: int = 10

    def validate(self) -> None:
        try:
            check_candidates(self.candidates)
        except ValueError as exc:
            raise ValueError(f"pmpl.candidates: {exc}") from None
        _require(0 < self.split_ratio <= 1, "pmpl.split_ratio", self.split_ratio, "must lie in (0, 1]")
        _require(0 < self.meta_split < 1, "pmpl.meta_split", self.meta_split, "must lie in (0, 1)")
        _require(self.meta_source in META_SOURCES, "pmpl.meta_source", self.meta_source,
                 f"choose from {META_SOURCES}")
        self.search_config(Recipe())

    def search_config(self, recipe: Recipe) -> PMPLConfig:
        """The PMPLConfig for a run; null deadline_epoch / alpha_lr come from the recipe."""
        names = {f.name for f in dataclasses.fields(PMPLConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        if self.deadline_epoch is None:
            values["deadline_epoch"] = recipe.deadline_epoch
        if self.alpha_lr is None:
            values["alpha_lr"] = recipe.alpha_lr
        return PMPLConfig(**values)


@dataclass
class ModelParams:
    backbone: str = "mobilenetv2_100"
    width: float = 1.0

    def validate(self) -> None:
        _require(self.backbone in BACKBONES, "model.backbone", self.backbone,
                 f"choose from {', '.join(BACKBONES)}")
        _require(self.width > 0, "model.width", self.width, "must be > 0")


@dataclass
class DefaultData:
    classes: int = 10
    train_per_class: int = 110
    val_per_class: int = 40
    size: int = 40


@dataclass
class WriterParams:
    max_resolution: int = 256
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    workers: int = 2


@dataclass
class LoaderParams:
    backend: str = "ffcv"
    workers: int = 1


@dataclass
class DataParams:
    imagenet_root: str = ""
    classes: int | None = None
    train_per_class: int | None = None
    val_per_class: int | None = None
    class_list: str = ""
    seed: int = 0
    out_dir: str = "data/prepared"
    default: DefaultData = field(default_factory=DefaultData)
    writer: WriterParams = field(default_factory=WriterParams)
    loader: LoaderParams = field(default_factory=LoaderParams)

    def validate(self) -> None:
        if self.imagenet_root:
            root = Path(self.imagenet_root).expanduser()
            _require(root.is_dir(), "data.imagenet_root", self.imagenet_root,
                     "no such folder: point it at an ILSVRC2012 root (train/, val/) or leave it "
                     "empty for the generated default dataset")
        if self.class_list:
            _require(Path(self.class_list).is_file(), "data.class_list", self.class_list,
                     "no such file")
        for key in ("classes", "train_per_class", "val_per_class"):
            v = getattr(self, key)
            _require(v is None or v >= 1, f"data.{key}", v, "must be >= 1 or null (no limit)")
        _require(self.loader.backend in BACKENDS, "data.loader.backend", self.loader.backend,
                 f"choose from {BACKENDS}")
        _require(self.loader.workers >= 0, "data.loader.workers", self.loader.workers, "must be >= 0")
        _require(1 <= self.writer.jpeg_quality <= 100, "data.writer.jpeg_quality",
                 self.writer.jpeg_quality, "must lie in [1, 100]")
        _require(0 <= self.writer.compress_probability <= 1, "data.writer.compress_probability",
                 self.writer.compress_probability, "must lie in [0, 1]")


@dataclass
class TrainParams:
    """How a run executes (not what it learns)."""

    threads: int = 2
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    sync_bn: bool = False
    channels_last: bool = True
    compile: bool = False

    def validate(self) -> None:
        for key in ("threads", "nproc", "nnodes"):
            _require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        _require(0 <= self.node_rank < self.nnodes, "train.node_rank", self.node_rank,
                 f"must lie in [0, train.nnodes={self.nnodes})")
        _require(1 <= self.master_port <= 65535, "train.master_port", self.master_port,
                 "must be a TCP port in [1, 65535]")


@dataclass
class Variant:
    """One experiment: a mode plus the parameters it overrides."""

    mode: str = "baseline"
    backbone: str | None = None
    fixed_op: str | None = None
    attention: str | None = None
    genotype_from: str | None = None
    pmpl: dict = field(default_factory=dict)

    def validate(self, name: str) -> None:
        k = f"variants.{name}"
        _require(self.mode in MODES, f"{k}.mode", self.mode, f"choose from {MODES}")
        if self.backbone is not None:
            _require(self.backbone in BACKBONES, f"{k}.backbone", self.backbone,
                     f"choose from {', '.join(BACKBONES)}")
        if self.mode == "fixed":
            _require(self.fixed_op in DEFAULT_CANDIDATES, f"{k}.fixed_op", self.fixed_op,
                     f"choose from {', '.join(DEFAULT_CANDIDATES)}")
        if self.mode == "attention":
            _require(self.attention in ATTENTIONS, f"{k}.attention", self.attention,
                     f"choose from {ATTENTIONS}")
        if self.mode == "retrain":
            _require(bool(self.genotype_from), f"{k}.genotype_from", self.genotype_from,
                     "name the PMPL variant whose genotype to retrain")


@dataclass
class CompareParams:
    """Statistics of the compare stage (METHOD.md section 6)."""

    confidence: float = 0.95
    resamples: int = 10000
    min_seeds: int = 5
    extra_pairs: list[list[str]] = field(default_factory=list)
    out_dir: str = "results"

    def validate(self, variants: dict) -> None:
        _require(0 < self.confidence < 1, "compare.confidence", self.confidence, "must lie in (0, 1)")
        _require(self.resamples >= 100, "compare.resamples", self.resamples, "must be >= 100")
        _require(self.min_seeds >= 2, "compare.min_seeds", self.min_seeds, "must be >= 2")
        for pair in self.extra_pairs:
            _require(isinstance(pair, list) and len(pair) == 2 and all(v in variants for v in pair),
                     "compare.extra_pairs", pair, "each entry is [variant_a, variant_b] of variants")


@dataclass
class Params:
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    recipe: str = "default"
    recipes: dict[str, Recipe] = field(default_factory=lambda: {"default": Recipe()})
    model: ModelParams = field(default_factory=ModelParams)
    pmpl: PMPLParams = field(default_factory=PMPLParams)
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    variants: dict[str, Variant] = field(default_factory=lambda: {"baseline": Variant()})
    # DVC's foreach lists (names of variants per stage group); validated against `variants`
    stages: dict[str, list[str]] = field(default_factory=dict)
    compare: CompareParams = field(default_factory=CompareParams)
    runs_dir: str = "runs"

    def validate(self) -> Params:
        _require(bool(self.seeds) and all(isinstance(s, int) and s >= 0 for s in self.seeds),
                 "seeds", self.seeds, "a non-empty list of integers >= 0")
        _require(self.recipe in self.recipes, "recipe", self.recipe,
                 f"choose from {', '.join(self.recipes)}")
        for name, recipe in self.recipes.items():
            recipe.validate(name)
        self.model.validate()
        self.pmpl.validate()
        self.data.validate()
        self.train.validate()
        for name, variant in self.variants.items():
            variant.validate(name)
            if variant.pmpl:
                self.variant_pmpl(name)
        self.compare.validate(self.variants)
        for group, names in self.stages.items():
            for name in names:
                _require(name in self.variants, f"stages.{group}", name,
                         f"unknown variant: define it under variants ({', '.join(self.variants)})")
        return self

    @property
    def active_recipe(self) -> Recipe:
        return self.recipes[self.recipe]

    def variant_pmpl(self, name: str) -> PMPLParams:
        """The pmpl section with a variant's overrides applied (and validated)."""
        merged = dataclasses.replace(self.pmpl)
        for key, value in self.variants[name].pmpl.items():
            _check_key(PMPLParams, key, f"variants.{name}.pmpl")
            setattr(merged, key, value)
        merged.validate()
        return merged

    def prepare_config(self):
        from data_pipelines.prepare import PrepareConfig

        d = self.data
        return PrepareConfig(
            imagenet_root=d.imagenet_root or None, classes=d.classes,
            train_per_class=d.train_per_class, val_per_class=d.val_per_class,
            class_list=d.class_list or None, seed=d.seed,
            default_classes=d.default.classes, default_train_per_class=d.default.train_per_class,
            default_val_per_class=d.default.val_per_class, default_size=d.default.size)

    def writer_config(self):
        from data_pipelines.betons import WriterConfig

        w = self.data.writer
        return WriterConfig(max_resolution=w.max_resolution, jpeg_quality=w.jpeg_quality,
                            compress_probability=w.compress_probability, workers=w.workers,
                            meta_split=self.pmpl.meta_split, seed=self.data.seed)


def _check_key(cls, key: str, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown key {where}.{key}{hint}: allowed keys are {', '.join(names)}")


def _build(cls, data, where: str):
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a suggestion."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'params'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        _check_key(cls, key, where or "params")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is dict and args and dataclasses.is_dataclass(args[1]):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping of names to settings")
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        return tuple(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ValueError(f"{where}={value!r} is invalid: expected {hint.__name__}")
    return value


def parse_params(data: dict) -> Params:
    """Validate a params mapping (e.g. ``params.yaml`` after ``-S`` overrides)."""
    return _build(Params, data, "").validate()


def load_params(path: str | Path, overrides: list[str] | None = None) -> Params:
    """Read and validate ``params.yaml``; ``overrides`` are ``dotted.key=value`` strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = yaml.safe_load(raw)
    return parse_params(data)
