"""The run a variant resolves to: ``resolve_run`` turns a variant of ``params.yaml`` and a seed
into the one ``RunConfig`` the Trainer takes (its model arguments, recipe, PMPL settings, data
and execution settings, and the fingerprint that decides what a checkpoint may resume)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from data_pipelines.config import DataConfig
from experiments.config import Mode, Params, Recipe, TrainParams, Variant
from experiments.params_errors import format_error
from metapool.genotype import Genotype
from metapool.pmpl import PMPLConfig

# what each mode puts in the enhancer slots (metapool.models.build_model's ``enhancer``)
MODE_ENHANCER = {"baseline": "none", "pmpl": "search", "retrain": "fixed", "fixed": "fixed",
                 "attention": "attention"}


class RunConfig(BaseModel):
    """One training run, resolved from a variant of ``params.yaml``: all the Trainer reads."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    mode: Mode
    seed: int
    seed_offset: int = 0
    out: str
    checkpoints: str
    recipe_name: str
    recipe: Recipe
    # metapool.models.build_model's arguments but num_classes (known from the prepared data)
    model_args: dict[str, Any]
    pmpl: PMPLConfig | None  # PMPL runs only: the settings plus the recipe's schedule
    genotype_from: str | None = None  # retrain runs: the PMPL variant that found the genotype
    data: DataConfig
    train: TrainParams

    @property
    def rng_seed(self) -> int:
        """The random seed of this run: the recipe's seed_base plus the run's seed (plus the
        variant's seed_offset)."""
        return self.recipe.seed_base + self.seed + self.seed_offset

    def fingerprint(self, world_size: int, data_report: dict) -> str:
        """Hash of everything that decides what this run computes (not where or how fast): its
        settings, the prepared data (``report.json``'s ``data_id`` and counts) and the code. A
        checkpoint resumes only the run with the same fingerprint: DVC keeps the checkpoint
        folder (persist) when a dependency changes, and those checkpoints belong to the old one."""
        from experiments.provenance import code_sha256

        what = self.model_dump(mode="json", exclude={"out", "checkpoints", "train"})
        what.update(world_size=world_size, images=data_report["images"],
                    data_id=data_report.get("data_id"), code=code_sha256(),
                    sync_bn=self.train.sync_bn)
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def resolve_run(params: Params, variant: str | None, seed: int, out: str | None = None,
                mode: str | None = None, genotype: str | None = None,
                checkpoints: str | None = None) -> RunConfig:
    """The RunConfig of a named variant (or a bare ``--mode`` with the params' defaults)."""
    if variant is not None:
        if variant not in params.variants:
            raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(params.variants)}")
        v = params.variants[variant]
    else:
        mode = mode or "baseline"
        if mode not in get_args(Mode):
            raise ValueError(f"--mode={mode!r} is invalid: choose from {', '.join(get_args(Mode))}")
        try:
            v = Variant(mode=mode)
        except ValidationError as exc:  # a mode that needs keys only a variant can give
            raise ValueError(f"--mode {mode}: {format_error(exc, Variant)} (define a variant in "
                             "params.yaml and train it with --variant)") from None
        variant = v.mode
    settings = params.variant_pmpl(variant) if variant in params.variants else params.pmpl
    recipe = params.variant_recipe(variant)
    out = out or str(params.run_dir(variant, seed))
    args: dict[str, Any] = {"backbone": v.backbone or params.model.backbone,
                            "enhancer": MODE_ENHANCER[v.mode], "width": params.model.width,
                            "drop_rate": recipe.drop_rate, "drop_path_rate": recipe.drop_path_rate}
    if params.model.stem_stride != 2:
        args["stem_stride"] = params.model.stem_stride
    if v.output_gates:
        args["output_gates"] = True
    if v.head != "plain":
        args.update(head=v.head, head_drop_rate=recipe.head_drop_rate)
    if v.mode == "pmpl":
        args.update(candidates=settings.candidates, split_ratio=settings.split_ratio)
    elif v.mode == "fixed":
        args.update(fixed_op=v.fixed_op, split_ratio=settings.split_ratio)
    elif v.mode == "attention":
        args.update(attention=v.attention)
    elif v.mode == "retrain":
        path = genotype or str(params.run_dir(v.genotype_from, seed) / "artifacts" /
                               "genotype.json")
        if not Path(path).is_file():
            raise FileNotFoundError(f"genotype {path} does not exist: run the PMPL variant "
                                    f"{v.genotype_from!r} for seed {seed} first")
        args.update(genotype=Genotype.load(path).to_dict())
    pmpl = None
    if v.mode == "pmpl":
        pmpl = PMPLConfig(**settings.model_dump(), alpha_lr=recipe.alpha_lr,
                          deadline_epoch=recipe.deadline_epoch)
    return RunConfig(variant=variant, mode=v.mode, seed=seed, seed_offset=v.seed_offset, out=out,
                     checkpoints=checkpoints or str(Path(out) / "checkpoints"),
                     recipe_name=params.recipe, recipe=recipe, model_args=args, pmpl=pmpl,
                     genotype_from=v.genotype_from if v.mode == "retrain" else None,
                     data=params.data, train=params.train)
