"""``metapool train``: one training entry point for every experiment of the suite.

Modes: ``baseline`` (plain backbone), ``pmpl`` (search while training: alpha learned on the
meta split, layers frozen progressively, then adaptation), ``retrain`` (a genotype from a PMPL
run, trained from scratch: the two-stage variant), ``fixed`` (every enhancer one op),
``attention`` (a timm attention module in every enhancer slot).

Outputs in ``--out``: ``metrics.json``, ``live/`` (dvclive curves), ``artifacts/``
(``predictions.csv``, ``model_final.pt``, and for PMPL ``genotype.json``,
``alpha_history.csv``, ``freeze_events.csv``), ``checkpoints/`` (one per epoch, atomic; a
rerun resumes from the newest readable one).
"""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.loaders import LoaderConfig, ffcv_stream, torchvision_stream
from experiments.checkpoint import Checkpoints
from experiments.config import Params, PMPLParams, Recipe
from experiments.distributed import Dist, cleanup, init_distributed
from metapool.genotype import Genotype
from metapool.io import atomic_path, atomic_write_csv, atomic_write_text
from metapool.models import build_model, enhancers, export_fixed, release_unused_parameters
from metapool.pmpl import ProgressiveMetaPooling


@dataclass
class RunSpec:
    """What one run trains, resolved from a variant of ``params.yaml``."""

    variant: str
    mode: str
    seed: int
    out: str
    backbone: str
    fixed_op: str | None = None
    attention: str | None = None
    genotype: str | None = None
    checkpoints: str | None = None  # default: OUT/checkpoints


def resolve_run(params: Params, variant: str | None, seed: int, out: str | None,
                mode: str | None = None, genotype: str | None = None,
                checkpoints: str | None = None) -> tuple[RunSpec, PMPLParams]:
    """A RunSpec from a named variant (or a bare ``--mode``) and the seed."""
    if variant is not None:
        if variant not in params.variants:
            raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(params.variants)}")
        v = params.variants[variant]
        pmpl = params.variant_pmpl(variant)
    else:
        from experiments.config import Variant

        v = Variant(mode=mode or "baseline")
        v.validate("--mode")
        variant, pmpl = v.mode, params.pmpl
    out = out or str(Path(params.runs_dir) / variant / f"seed{seed}")
    geno = genotype
    if v.mode == "retrain" and geno is None:
        geno = str(Path(params.runs_dir) / v.genotype_from / f"seed{seed}" / "artifacts" /
                   "genotype.json")
    if v.mode == "retrain" and not Path(geno).is_file():
        raise FileNotFoundError(f"genotype {geno} does not exist: run the PMPL variant "
                                f"{v.genotype_from!r} for seed {seed} first")
    return RunSpec(variant, v.mode, seed, out, v.backbone or params.model.backbone,
                   v.fixed_op, v.attention, geno, checkpoints), pmpl


def make_model(spec: RunSpec, params: Params, recipe: Recipe, num_classes: int,
               pmpl: PMPLParams) -> nn.Module:
    kw = dict(num_classes=num_classes, drop_rate=recipe.drop_rate,
              drop_path_rate=recipe.drop_path_rate, width=params.model.width)
    if spec.mode == "baseline":
        return build_model(spec.backbone, "none", **kw)
    if spec.mode == "pmpl":
        return build_model(spec.backbone, "search", candidates=pmpl.candidates,
                           split_ratio=pmpl.split_ratio, **kw)
    if spec.mode == "retrain":
        return build_model(spec.backbone, "fixed", genotype=spec.genotype, **kw)
    if spec.mode == "fixed":
        return build_model(spec.backbone, "fixed", fixed_op=spec.fixed_op,
                           split_ratio=pmpl.split_ratio, **kw)
    return build_model(spec.backbone, "attention", attention=spec.attention, **kw)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: nn.Module, weight_decay: float, exclude: set[int]) -> list[dict]:
    # timm's convention: no weight decay on biases and norm weights (1-d tensors).
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


class _StopRequested:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """Holds one run's state; ``fit()`` reads top to bottom."""

    def __init__(self, params: Params, spec: RunSpec, pmpl: PMPLParams, dist: Dist) -> None:
        self.params, self.spec, self.pmpl_params, self.dist = params, spec, pmpl, dist
        self.recipe = params.active_recipe
        self.out = Path(spec.out)
        self.device = dist.device
        self.threads = self._cpu_threads()
        torch.set_num_threads(self.threads)
        seed_everything(spec.seed)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._build_data()
        self._build_model()
        self.ckpts = Checkpoints(spec.checkpoints or self.out / "checkpoints")
        self.history: list[dict] = []
        self.start_epoch, self.skip_steps, self.global_step = 0, 0, 0
        self.train_seconds, self.images_seen = 0.0, 0

    # ------------------------------------------------------------------ set-up
    def _cpu_threads(self) -> int:
        """train.threads, capped on the CPU so the processes of one machine do not
        oversubscribe its cores (spinning OpenMP threads slow training down by 10x or more)."""
        threads = self.params.train.threads
        if self.device.type != "cpu":
            return threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        fits = max(1, (cores or 1) // local_procs)
        if threads > fits:
            if self.dist.local_rank == 0:
                print(f"train.threads={threads} x {local_procs} processes exceeds the {cores} "
                      f"cores: using {fits} threads per process", flush=True)
            return fits
        return threads

    def _build_data(self) -> None:
        p, r = self.params, self.recipe
        data_dir = Path(p.data.out_dir)
        report_path = data_dir / "report.json"
        if not report_path.is_file():
            raise FileNotFoundError(f"prepared dataset {data_dir} not found: run `dvc repro data` "
                                    f"or `metapool data prepare --out {data_dir}` first")
        self.data_report = json.loads(report_path.read_text())
        self.num_classes = int(self.data_report["classes"])
        world = self.dist.world_size
        if r.batch_size % world:
            raise ValueError(f"recipes.{p.recipe}.batch_size={r.batch_size} must be divisible by "
                             f"the {world} processes")
        base = dict(img_size=r.img_size, batch_size=r.batch_size // world,
                    workers=p.data.loader.workers, scale=tuple(r.scale), seed=self.spec.seed,
                    channels_last=p.train.channels_last and self.device.type == "cuda",
                    device=str(self.device))
        train_cfg = LoaderConfig(**base, distributed=self.dist.enabled)
        # Validation is sharded too: rank r sees images r, r + world, ... (evaluate() merges).
        val_cfg = LoaderConfig(**{**base, "batch_size": max(1, r.batch_size // world)},
                               distributed=self.dist.enabled)
        # Query batches: never larger than the meta split allows, always full (a batch of one
        # image cannot train BatchNorm).
        meta_images = self.data_report["images"][
            "val" if self.pmpl_params.meta_source == "val" else "meta"] // world
        if self.spec.mode == "pmpl" and meta_images < 2:
            raise ValueError(f"the meta split has {meta_images} images per process, too few for "
                             "a query batch: raise pmpl.meta_split or use more images")
        meta_cfg = LoaderConfig(**{**base, "seed": self.spec.seed + 7919,
                                   "batch_size": max(2, min(r.batch_size // world, meta_images))},
                                distributed=self.dist.enabled)
        if r.randaugment and p.data.loader.backend == "ffcv":
            raise ValueError(f"recipes.{p.recipe}.randaugment={r.randaugment!r} needs the "
                             "torchvision loader: set data.loader.backend=torchvision")
        if p.data.loader.backend == "ffcv":
            self.train_data = ffcv_stream(str(data_dir / "train.beton"), True, train_cfg)
            self.val_data = ffcv_stream(str(data_dir / "val.beton"), False, val_cfg)
            meta_file = "val.beton" if self.pmpl_params.meta_source == "val" else "meta.beton"
            self.meta_data = (ffcv_stream(str(data_dir / meta_file), True, meta_cfg, drop_last=True)
                              if self.spec.mode == "pmpl" else None)
        else:
            from data_pipelines.manifest import meta_holdout, read_manifest

            skipped = {s["path"] for s in self.data_report["skipped_files"]}
            records = [x for x in read_manifest(data_dir / "manifest.csv") if x.path not in skipped]
            train, meta = meta_holdout(records, p.pmpl.meta_split, p.data.seed)
            val = [x for x in records if x.split == "val"]
            self.train_data = torchvision_stream(train, True, train_cfg)
            self.val_data = torchvision_stream(val, False, val_cfg)
            meta_records = val if self.pmpl_params.meta_source == "val" else meta
            self.meta_data = (torchvision_stream(meta_records, True, meta_cfg, drop_last=True)
                              if self.spec.mode == "pmpl" else None)

    def _build_model(self) -> None:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        r, spec = self.recipe, self.spec
        torch.manual_seed(spec.seed)
        self.net = make_model(spec, self.params, r, self.num_classes, self.pmpl_params).to(self.device)
        if self.params.train.sync_bn and self.dist.enabled:
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        if self.params.train.channels_last and self.device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        # While PMPL searches, each freeze changes which parameters get gradients (a frozen
        # enhancer stops using alpha and its dropped candidates), so DDP must look for unused
        # parameters; once every layer is frozen the graph is static again (_after_freezes).
        self.model = self._wrap(searching=spec.mode == "pmpl")
        self.loss_plain = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
        self.mixup = None
        if r.mixup > 0 or r.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix,
                               label_smoothing=r.label_smoothing, num_classes=self.num_classes)
            self.loss_mixup = SoftTargetCrossEntropy()
        self.search = None
        exclude: set[int] = set()
        if spec.mode == "pmpl":
            cfg = self.pmpl_params.search_config(r)
            self.search = ProgressiveMetaPooling(self.model, cfg, self.loss_plain)
            exclude = {id(a) for a in self.search.alphas}
        world_batch = r.batch_size
        lr = r.lr * world_batch / r.lr_base_batch
        self.optimizer = create_optimizer_v2(
            _param_groups(self.net, r.weight_decay, exclude), opt=r.opt, lr=lr,
            weight_decay=r.weight_decay, momentum=r.momentum)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=r.sched, num_epochs=r.epochs, decay_epochs=r.decay_epochs,
            decay_rate=r.decay_rate, min_lr=r.min_lr, warmup_lr=r.warmup_lr,
            warmup_epochs=r.warmup_epochs, cooldown_epochs=0,
            step_on_epochs=False, updates_per_epoch=len(self.train_data))
        self.ema = ModelEmaV3(self.net, decay=r.ema_decay) if r.ema_decay > 0 else None
        self.erasing = None
        if r.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(r.reprob, mode="pixel", device=str(self.device))
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if r.amp and self.device.type == "cuda" else nullcontext())

    def _wrap(self, searching: bool) -> nn.Module:
        """``self.net`` under DDP when distributed, and torch.compile when asked (GPU)."""
        model = self.dist.ddp(self.net, find_unused_parameters=searching) if self.dist.enabled \
            else self.net
        if self.params.train.compile and self.device.type == "cuda" and not searching:
            # Only once the graph is static: every freeze during the search would recompile,
            # and past dynamo's recompile limit the forward silently falls back to eager.
            model = torch.compile(model)
        return model

    def _after_freezes(self) -> None:
        """Called when layers were just frozen (or restored frozen): the EMA copy follows, and
        after the last freeze the dropped parameters leave autograd and DDP is rebuilt without
        the per-step unused-parameter traversal, compiled if asked. Every rank gets here at
        the same step: alpha and the freezing decisions are identical on all ranks."""
        self._sync_ema_enhancers()
        if self.search.active:
            return
        release_unused_parameters(self.net)
        self.model = self.search.model = self._wrap(searching=False)
        if self.dist.enabled and self.dist.is_main:
            print(f"search ended at step {self.global_step}: DDP rebuilt with "
                  "find_unused_parameters=False", flush=True)

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> str:
        """Hash of everything that decides what this run computes (not how fast)."""
        import hashlib

        p = self.params
        spec = {k: v for k, v in asdict(self.spec).items() if k not in ("out", "checkpoints")}
        what = {"spec": spec, "recipe": asdict(self.recipe),
                "model": asdict(p.model), "pmpl": asdict(self.pmpl_params),
                "loader": asdict(p.data.loader), "data": self.data_report.get("images"),
                "world_size": self.dist.world_size}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    def state_dict(self, epoch: int, step_in_epoch: int) -> dict:
        return {
            "fingerprint": self.fingerprint(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "search": self.search.state_dict() if self.search else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
            "history": self.history, "train_seconds": self.train_seconds,
            "images_seen": self.images_seen, "spec": asdict(self.spec),
        }

    def resume(self) -> Path | None:
        state, path = self.ckpts.load_latest()
        if state is None:
            return None
        if state.get("fingerprint") != self.fingerprint():
            # DVC keeps the checkpoint folder (persist) when a parameter changes: those
            # checkpoints belong to another experiment, so start afresh instead of resuming.
            print(f"checkpoints in {self.ckpts.folder} were made with other parameters: "
                  "starting this run from scratch", flush=True)
            self.ckpts.clear()
            return None
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.search and state["search"] is not None:
            self.search.load_state_dict(state["search"])
        self._sync_ema_enhancers()
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.history = state["history"]
        self.train_seconds, self.images_seen = state["train_seconds"], state["images_seen"]
        self.global_step = state["global_step"]
        if state["step_in_epoch"]:  # an interrupt checkpoint: continue inside that epoch
            self.start_epoch, self.skip_steps = state["epoch"], state["step_in_epoch"]
        else:
            self.start_epoch = state["epoch"] + 1
        return path

    def _sync_ema_enhancers(self) -> None:
        if self.ema is None:
            return
        for (_, live), (_, shadow) in zip(enhancers(self.net), enhancers(self.ema.module), strict=True):
            shadow.chosen_mask.copy_(live.chosen_mask)
            shadow._sync_chosen()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        resumed = self.resume()
        if not self.dist.same_everywhere([self.start_epoch, self.skip_steps, self.global_step]):
            # DDP does not re-broadcast weights after construction: ranks resuming from
            # different points would train different models and average their gradients.
            raise FileNotFoundError(
                f"rank {self.dist.rank} would resume at epoch {self.start_epoch} step "
                f"{self.skip_steps} ({resumed or 'no checkpoint'}) but other ranks would not: "
                f"put {self.ckpts.folder} on a filesystem every node sees (or --checkpoints DIR)")
        if resumed and self.dist.is_main:
            print(f"resuming {self.spec.out} from {resumed} (epoch {self.start_epoch})", flush=True)
        live = None
        if self.dist.is_main:
            from dvclive import Live

            live = Live(str(self.out / "live"), resume=resumed is not None, dvcyaml=False,
                        save_dvc_exp=False)
            live.step = self.start_epoch
        if self.search is not None and not self.search.active:
            self._after_freezes()  # a run resumed after its search ended
        stop = _StopRequested()
        try:
            for epoch in range(self.start_epoch, self.recipe.epochs):
                if self.search is not None and self.search.on_epoch_start(epoch):
                    self._after_freezes()
                if self.train_one_epoch(epoch, stop):
                    # 128 + signal, as a shell reports a killed command: DVC and SLURM must
                    # not take an interrupted stage for a finished one.
                    raise SystemExit(128 + (stop.signum or signal.SIGTERM))
                self._sync_bn_statistics()
                row = {"epoch": epoch, **self.last_train, **self.evaluate(self.net)}
                if self.ema:
                    row.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
                self.history.append(row)
                if live is not None:
                    for key, value in row.items():
                        if key != "epoch":
                            live.log_metric(key, value)
                    live.next_step()
                    self.ckpts.save(self.state_dict(epoch, 0), epoch)
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                      for k, v in row.items()}), flush=True)
                self.dist.barrier()
            return self.finish()
        finally:
            stop.restore()
            if live is not None:
                live.end()

    def _sync_bn_statistics(self) -> None:
        # Each rank's BatchNorm running statistics saw only its own batches: average them
        # (timm's --dist-bn reduce) so that every rank evaluates, and rank 0 saves, one model.
        if self.dist.enabled:
            from timm.utils import distribute_bn

            distribute_bn(self.net, self.dist.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.dist.world_size, reduce=True)

    def _query_batches(self, epoch: int):
        # The meta split is small: cycle through it, its order fixed by (seed, epoch, lap).
        lap = 0
        while True:
            self.meta_data.set_epoch(epoch * 1000 + lap)
            yield from self.meta_data
            lap += 1

    def train_one_epoch(self, epoch: int, stop: _StopRequested) -> bool:
        """One pass over train; returns True when a stop signal was handled."""
        self.net.train()
        self.train_data.set_epoch(epoch)
        queries = self._query_batches(epoch) if self.search is not None and self.search.active else None
        loss_sum, n_batches, images, start = 0.0, 0, 0, time.perf_counter()
        skip, self.skip_steps = self.skip_steps, 0
        for step, (x, y) in enumerate(self.train_data):
            if step < skip:
                continue
            searching = self.search is not None and self.search.active
            if searching:
                with self.autocast:
                    loss = self.search.step((x, y), next(queries), epoch)
            else:
                if self.erasing is not None:
                    x = self.erasing(x)
                if self.mixup is not None:
                    x, y_soft = self.mixup(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                with self.autocast:
                    out = self.model(x)
                    loss = (self.loss_mixup(out, y_soft) if self.mixup is not None
                            else self.loss_plain(out, y))
                loss.backward()
            self._check_finite(loss, epoch, step)
            if self.recipe.clip_grad > 0:
                nn.utils.clip_grad_norm_(self.net.parameters(), self.recipe.clip_grad)
            self.optimizer.step()
            self.global_step += 1
            self.scheduler.step_update(num_updates=self.global_step)
            if searching and self.search.after_step(epoch):
                self._after_freezes()
            if self.ema is not None:
                self.ema.update(self.net, step=self.global_step)
            loss_sum += float(loss.detach())
            n_batches += 1
            images += x.shape[0] * self.dist.world_size
            # every rank must stop after the same step, whichever got the signal first
            if self.dist.any(stop.signum is not None):
                if self.dist.is_main:
                    path = self.ckpts.save_interrupt(self.state_dict(epoch, step + 1))
                    print(f"stopped by signal {stop.signum or 'on another rank'} at epoch "
                          f"{epoch} step {step + 1}; "
                          f"checkpoint {path}: rerun the same command to resume", flush=True)
                return True
        self.scheduler.step(epoch + 1)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.images_seen += images
        frozen = sum(m.frozen for _, m in enhancers(self.net))
        self.last_train = {"train_loss": loss_sum / max(1, n_batches),
                           "lr": self.optimizer.param_groups[0]["lr"],
                           "train_images_per_s": images / max(seconds, 1e-9),
                           "frozen_layers": frozen}
        return False

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        if not torch.isfinite(loss):
            last = self.ckpts.latest()
            where = f"last good checkpoint: {last}" if last else "no checkpoint yet"
            raise FloatingPointError(
                f"loss is {float(loss.detach())} at epoch {epoch} step {step} of {self.spec.out} ({where}): "
                "lower the learning rate (or enable recipes.*.clip_grad) and rerun to resume")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, predictions: bool = False) -> dict:
        """Top-1/top-5/loss on the whole val set; under DDP each rank scores its shard and
        the sums (and predictions, in val order) are merged on every rank."""
        model.eval()
        n_val, rank, world = self.val_data.num_samples, self.dist.rank, self.dist.world_size
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # top1, top5, n, loss
        preds, seen = [], 0
        self.val_data.set_epoch(0)
        for x, y in self.val_data:
            # The distributed sampler pads the last round with repeats: keep positions < n_val.
            pos = rank + world * torch.arange(seen, seen + y.numel(), device=y.device)
            seen += y.numel()
            keep = pos < n_val
            with self.autocast:
                out = model(x)
            out = out.float()
            top5 = out.topk(min(5, out.shape[1]), dim=1).indices
            sums += torch.stack([
                ((top5[:, 0] == y) & keep).sum(), ((top5 == y[:, None]).any(dim=1) & keep).sum(),
                keep.sum(), (F.cross_entropy(out, y, reduction="none") * keep).sum()]).double()
            if predictions:
                preds.append(torch.stack([pos, y, top5[:, 0]], dim=1)[keep].cpu())
        model.train()
        if self.dist.enabled:
            torch.distributed.all_reduce(sums)
        correct1, correct5, total, loss_sum = sums.tolist()
        result = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total,
                  "val_loss": loss_sum / total}
        if predictions:
            rows = torch.cat(preds).numpy()
            if self.dist.enabled:
                shards = [None] * world
                torch.distributed.all_gather_object(shards, rows)
                rows = np.concatenate(shards)
            rows = rows[np.argsort(rows[:, 0], kind="stable")]
            result["predictions"] = rows[:, 1:]  # (label, prediction) in val order
        return result

    def finish(self) -> dict:
        """Final evaluation (every rank: the val set is sharded) and, on rank 0, every output."""
        from metapool.profile import profile_model

        final_net = self.ema.module if self.ema else self.net
        if self.search is not None:
            if self.search.active:
                self.search.finalize(self.recipe.epochs - 1)
                self._sync_ema_enhancers()
            final_net = export_fixed(copy.deepcopy(final_net))  # what the adapted model costs
        result = self.evaluate(final_net, predictions=True)
        if not self.dist.is_main:
            return {}
        art = self.out / "artifacts"
        art.mkdir(parents=True, exist_ok=True)
        if self.search is not None:
            self.search.genotype().save(art / "genotype.json")
            atomic_write_csv(art / "alpha_history.csv", self.search.history_table(),
                       ["step", "epoch", "layer", "candidate", "prob"])
            atomic_write_csv(art / "freeze_events.csv", [
                {"layer": e.layer, "ops": "+".join(self.search.candidates[i] for i in e.ops),
                 "step": e.step, "epoch": e.epoch, "reason": e.reason,
                 "margin": _margin(e.probs)} for e in self.search.events],
                ["layer", "ops", "step", "epoch", "reason", "margin"])
        preds = result.pop("predictions")
        atomic_write_csv(art / "predictions.csv",
                   [{"index": i, "label": int(t), "pred": int(p)} for i, (t, p) in enumerate(preds)],
                   ["index", "label", "pred"])
        cpu_net = copy.deepcopy(final_net).to("cpu").float().eval()
        with atomic_path(art / "model_final.pt") as tmp:
            torch.save({"spec": asdict(self.spec), "num_classes": self.num_classes,
                        "state_dict": cpu_net.state_dict()}, tmp)
        prof = profile_model(cpu_net, self.spec.variant, 224, latency=True)
        metrics = {
            **result,
            "params": prof.params, "macs_224": prof.macs,
            "macs_train_res": profile_model(cpu_net, "", self.recipe.img_size, latency=False).macs,
            "cpu_latency_ms_224": prof.latency_ms,
            "train_seconds": self.train_seconds,
            "train_images_per_s": self.images_seen / max(self.train_seconds, 1e-9),
            "epochs": self.recipe.epochs, "img_size": self.recipe.img_size,
            "recipe": self.params.recipe, "dataset": self.data_report.get("dataset", "unknown"),
            "seed": self.spec.seed, "mode": self.spec.mode, "variant": self.spec.variant,
            "backbone": self.spec.backbone, "world_size": self.dist.world_size,
            "ema": self.ema is not None,
        }
        if self.search is not None:
            metrics["frozen_ops"] = Genotype.load(art / "genotype.json").ops_by_layer()
        atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        return metrics


def _margin(probs: list[float]) -> float:
    top = sorted(probs, reverse=True)
    return top[0] - (top[1] if len(top) > 1 else 0.0)


def run_training(params: Params, spec: RunSpec, pmpl: PMPLParams) -> dict:
    """Train one run (under torchrun when ``WORLD_SIZE`` is set)."""
    dist = init_distributed()
    try:
        return Trainer(params, spec, pmpl, dist).fit()
    finally:
        cleanup()


def relaunch_with_torchrun(params: Params, argv: list[str]) -> None:
    """When ``train.nproc``/``nnodes`` ask for it and we are not under torchrun, become torchrun.

    ``exec`` (not a child process) so that a SIGTERM from DVC, SLURM or the user reaches
    torchrun's agent (``experiments.launch``), which forwards it to every rank.
    """
    t = params.train
    if (t.nproc == 1 and t.nnodes == 1) or "LOCAL_RANK" in os.environ:
        return
    cmd = [sys.executable, "-m", "experiments.launch", f"--nproc_per_node={t.nproc}",
           f"--nnodes={t.nnodes}", f"--node_rank={t.node_rank}",
           f"--master_addr={t.master_addr}", f"--master_port={t.master_port}",
           "-m", "metapool.cli", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
