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
import random
import signal
import time
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.loaders import Streams, build_streams
from experiments.checkpoint import Checkpoints
from experiments.distributed import Dist, StopSignal, cleanup, cpu_threads, init_distributed
from experiments.metrics import RunMetrics, write_metrics
from experiments.runs import RunConfig
from metapool.io import atomic_path, atomic_write_csv
from metapool.models import (
    build_model,
    copy_freezes,
    enhancers,
    export_fixed,
    release_unused_parameters,
)
from metapool.pmpl import ProgressiveMetaPooling, SearchPhase


def autocast_for(amp: bool, device: torch.device, dtype: str = "bfloat16"):
    """Autocast to ``dtype`` on a GPU when the recipe asks for it; float32 otherwise (CPU runs
    too: CPU autocast would change the numbers and gain nothing on these models)."""
    return torch.autocast("cuda", dtype=getattr(torch, dtype)) if amp and device.type == "cuda" \
        else nullcontext()


def grad_scaler_for(amp: bool, device: torch.device, dtype: str = "bfloat16"):
    """timm's native AMP: float16 gradients underflow without a scaler; bfloat16 has float32's
    range and needs none, and the CPU runs float32. None when no scaler applies."""
    if amp and dtype == "float16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


class Trainer:
    """Holds one run's state; ``fit()`` reads top to bottom."""

    def __init__(self, run: RunConfig, dist: Dist, streams: Streams | None = None) -> None:
        """``streams``: the data streams of an earlier run of this process, reused (reseeded)
        when their settings are this run's, so that their loaders are not compiled again."""
        from timm.utils import random_seed

        self.run, self.dist, self.recipe = run, dist, run.recipe
        self.out = Path(run.out)
        self.device = dist.device
        torch.set_num_threads(cpu_threads(run.train.threads, dist))
        random_seed(run.rng_seed, dist.rank)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.recipe.batch_size % dist.world_size:
            raise ValueError(f"recipes.{run.recipe_name}.batch_size={self.recipe.batch_size} "
                             f"must be divisible by the {dist.world_size} processes")
        self.data = self.build_streams(streams)
        self.model_args = {**run.model_args, "num_classes": int(self.data.report["classes"])}
        # in this order: the network is the first (and only) draw from the seeded generator
        self.net = self.build_net()
        # While PMPL searches, each freeze changes which parameters get gradients (a frozen
        # enhancer stops using alpha and its dropped candidates), so DDP must look for unused
        # parameters; once every layer is frozen the graph is static again (_after_freezes).
        self.model = self._wrap(searching=run.mode == "pmpl")
        self.loss_plain, self.mixup, self.loss_mixup = self.build_losses()
        self.phase = self.build_search()
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self.ema = self.build_ema()
        self.erasing = self.build_erasing()
        self.autocast = autocast_for(self.recipe.amp, self.device, self.recipe.amp_dtype)
        self.scaler = grad_scaler_for(self.recipe.amp, self.device, self.recipe.amp_dtype)
        # PMPL's bilevel step has no gradient scaler: under float16 it runs in float32, as the
        # authors' meta trainer did; under bfloat16 it autocasts like the other steps
        self.search_autocast = self.autocast if self.scaler is None else nullcontext()
        self.ckpts = Checkpoints(run.checkpoints)
        self.history: list[dict] = []
        self.start_epoch, self.skip_steps, self.global_step = 0, 0, 0
        self.train_seconds, self.images_seen = 0.0, 0
        self._final_scores: dict | None = None  # the last epoch's evaluation (plain runs)

    # ------------------------------------------------------------------ set-up
    def build_streams(self, reusable: Streams | None) -> Streams:
        """The run's train, val and (PMPL) query streams, from its data config and recipe."""
        run = self.run
        return build_streams(run.data, self.recipe, seed=run.rng_seed,
                             world_size=self.dist.world_size, device=str(self.device),
                             channels_last=run.train.channels_last,
                             meta_source=run.pmpl.meta_source if run.pmpl else None,
                             reuse=reusable)

    def build_net(self) -> nn.Module:
        """The run's network (``metapool.models.build_model``), the same initial weights on every
        rank, SyncBatchNorm when asked under DDP, channels_last when asked."""
        torch.manual_seed(self.run.rng_seed)
        net = build_model(**self.model_args).to(self.device)
        if self.run.train.sync_bn and self.dist.enabled:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if self.run.train.channels_last:
            # on the CPU too: the enhancers' pooling is memory-bound, 2-3x faster channels_last
            net = net.to(memory_format=torch.channels_last)
        return net

    def build_losses(self) -> tuple[nn.Module, object | None, nn.Module | None]:
        """The plain loss (label smoothing), and timm's ``Mixup`` with the soft-target loss it
        needs when the recipe mixes (label smoothing then goes through the soft targets)."""
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        r = self.recipe
        plain = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
        if r.mixup <= 0 and r.cutmix <= 0:
            return plain, None, None
        mixup = Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix,
                      label_smoothing=r.label_smoothing,
                      num_classes=self.model_args["num_classes"])
        return plain, mixup, SoftTargetCrossEntropy()

    def build_search(self) -> SearchPhase | None:
        """PMPL's search over the query stream (alpha and its own optimizer), for PMPL runs."""
        run = self.run
        if run.mode != "pmpl":
            return None
        return SearchPhase(
            ProgressiveMetaPooling(self.model, run.pmpl, self.loss_plain), self.data.meta,
            permute_labels_seed=run.rng_seed if run.pmpl.meta_labels == "permuted" else None)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimizer (timm's) over the weights, no weight decay on norms and
        biases, the learning rate scaled linearly with the global batch; alpha is not in it."""
        from timm.optim import create_optimizer_v2, param_groups_weight_decay

        r = self.recipe
        groups = param_groups_weight_decay(self.net, r.weight_decay)
        if self.phase is not None:
            weights = {id(p) for p in self.phase.search.weight_parameters()}
            groups = [{**g, "params": [p for p in g["params"] if id(p) in weights]}
                      for g in groups]
        return create_optimizer_v2(
            groups, opt=r.opt, lr=r.lr * r.batch_size / r.lr_base_batch,
            weight_decay=r.weight_decay, momentum=r.momentum,
            **({"eps": r.opt_eps} if r.opt_eps is not None else {}))

    def build_scheduler(self):
        """timm's scheduler for the recipe, stepped per epoch or per update."""
        from timm.scheduler import create_scheduler_v2

        r = self.recipe
        scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=r.sched, num_epochs=r.epochs, decay_epochs=r.decay_epochs,
            decay_rate=r.decay_rate, min_lr=r.min_lr, warmup_lr=r.warmup_lr,
            warmup_epochs=r.warmup_epochs, cooldown_epochs=0,
            noise=list(r.lr_noise) if r.lr_noise else None,
            step_on_epochs=not r.sched_on_updates, updates_per_epoch=len(self.data.train))
        return scheduler

    def build_ema(self):
        """timm's ``ModelEmaV3`` of the weights when the recipe keeps one."""
        from timm.utils import ModelEmaV3

        return ModelEmaV3(self.net, decay=self.recipe.ema_decay) \
            if self.recipe.ema_decay > 0 else None

    def build_erasing(self):
        """timm's per-pixel random erasing of training batches when the recipe asks for it."""
        if self.recipe.reprob <= 0:
            return None
        from timm.data.random_erasing import RandomErasing

        return RandomErasing(self.recipe.reprob, mode="pixel", device=str(self.device))

    def _wrap(self, searching: bool) -> nn.Module:
        """``self.net`` under DDP when distributed, and torch.compile when asked (GPU)."""
        model = self.dist.ddp(self.net, find_unused_parameters=searching) if self.dist.enabled \
            else self.net
        if self.run.train.compile and self.device.type == "cuda" and not searching:
            # Only once the graph is static: every freeze during the search would recompile,
            # and past dynamo's recompile limit the forward silently falls back to eager.
            model = torch.compile(model)
        return model

    def _after_freezes(self) -> None:
        """Layers were just frozen (or restored frozen): the EMA copy follows, and after the
        last freeze the dropped parameters leave autograd and DDP is rebuilt without the
        per-step unused-parameter traversal, compiled if asked. Every rank gets here at the
        same step: alpha and the freezing decisions are identical on all ranks."""
        if self.ema is not None:
            copy_freezes(self.net, self.ema.module)
        if self.phase.active:
            return
        release_unused_parameters(self.net)
        self.model = self._wrap(searching=False)
        if self.dist.enabled and self.dist.is_main:
            print(f"search ended at step {self.global_step}: DDP rebuilt with "
                  "find_unused_parameters=False", flush=True)

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int, step_in_epoch: int) -> dict:
        return {
            "fingerprint": self.run.fingerprint(self.dist.world_size, self.data.report),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "search": self.phase.search.state_dict() if self.phase else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
            "history": self.history, "train_seconds": self.train_seconds,
            "images_seen": self.images_seen,
        }

    def _checkpoint(self, epoch: int, step_in_epoch: int) -> Path:
        """The end of ``epoch`` (``step_in_epoch`` 0) or an interrupt inside it."""
        state = self.state_dict(epoch, step_in_epoch)
        return self.ckpts.save_interrupt(state) if step_in_epoch else self.ckpts.save(state, epoch)

    def resume(self) -> Path | None:
        """Load the newest readable checkpoint of this run's parameters, if any."""
        state, path = self.ckpts.load_latest()
        if state is None:
            return None
        if state.get("fingerprint") != self.run.fingerprint(self.dist.world_size,
                                                            self.data.report):
            # DVC keeps the checkpoint folder (persist) when a dependency changes: those
            # checkpoints belong to another experiment, so start afresh instead of resuming.
            print(f"checkpoints in {self.ckpts.folder} were made with other parameters, data "
                  "or code: starting this run from scratch", flush=True)
            self.ckpts.clear()
            return None
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.phase and state["search"] is not None:
            self.phase.search.load_state_dict(state["search"])
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

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunMetrics | None:
        resumed = self.resume()
        if not self.dist.same_everywhere([self.start_epoch, self.skip_steps, self.global_step]):
            # DDP does not re-broadcast weights after construction: ranks resuming from
            # different points would train different models and average their gradients.
            raise FileNotFoundError(
                f"rank {self.dist.rank} would resume at epoch {self.start_epoch} step "
                f"{self.skip_steps} ({resumed or 'no checkpoint'}) but other ranks would not: "
                f"put {self.ckpts.folder} on a filesystem every node sees (or --checkpoints DIR)")
        if resumed:
            self.dist.on_main(print, f"resuming {self.run.out} from {resumed} "
                                     f"(epoch {self.start_epoch})", flush=True)
        live = self.dist.on_main(self._open_live, resumed is not None)
        if self.phase is not None:
            self._after_freezes()  # a resumed run may hold frozen layers (its EMA copy too)
        stop = StopSignal()
        try:
            for epoch in range(self.start_epoch, self.recipe.epochs):
                if self.phase is not None and self.phase.start_epoch(epoch):
                    self._after_freezes()
                row = {"epoch": epoch, **self.train_one_epoch(epoch, stop)}
                self._sync_bn_statistics()
                # the last epoch's evaluation of a plain run is its final one: keep the
                # predictions instead of scoring the same model twice
                final = epoch == self.recipe.epochs - 1 and self.ema is None and self.phase is None
                scores = self.evaluate(self.net, predictions=final)
                if final:
                    self._final_scores = dict(scores)
                    scores.pop("predictions")
                row.update(scores)
                if self.ema:
                    row.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
                self.history.append(row)
                self.dist.on_main(self._checkpoint, epoch, 0)
                self.dist.on_main(self._log_epoch, live, row)
                self.dist.barrier()
            return self.finish()
        finally:
            stop.restore()
            if live is not None:
                live.end()

    def _open_live(self, resumed: bool):
        try:
            from dvclive import Live
        except ImportError:  # e.g. the GPU machine: metrics.json and the epoch lines still come
            print("dvclive is not installed: no live/ curves for this run (pip install dvclive)",
                  flush=True)
            return None
        # DVC deletes a stage's outputs (the curves) before rerunning it, yet keeps the
        # checkpoints: a run resumed after that rebuilds its curves from the checkpoint's history
        replay = resumed and not (self.out / "live" / "plots" / "metrics").is_dir()
        live = Live(str(self.out / "live"), resume=resumed and not replay, dvcyaml=False,
                    save_dvc_exp=False)
        live.log_params({"provenance": self.provenance})
        if replay:
            for row in self.history:
                self._log_live(live, row)
        live.step = self.start_epoch
        return live

    @cached_property
    def provenance(self) -> dict:
        """Where this run came from (experiments.provenance), computed once."""
        from experiments.provenance import provenance

        return provenance(self.device, self.dist.world_size,
                          compiled=self.run.train.compile and self.device.type == "cuda")

    @staticmethod
    def _log_live(live, row: dict) -> None:
        for key, value in row.items():
            if key != "epoch":
                live.log_metric(key, value)
        live.next_step()

    @classmethod
    def _log_epoch(cls, live, row: dict) -> None:
        if live is not None:
            cls._log_live(live, row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)

    def _sync_bn_statistics(self) -> None:
        # Each rank's BatchNorm running statistics saw only its own batches: average them
        # (timm's --dist-bn reduce) so that every rank evaluates, and rank 0 saves, one model.
        if self.dist.enabled:
            from timm.utils import distribute_bn

            distribute_bn(self.net, self.dist.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.dist.world_size, reduce=True)

    def train_one_epoch(self, epoch: int, stop: StopSignal) -> dict:
        """One pass over train; its loss, lr, images/s and frozen layers. A stop signal saves
        an interrupt checkpoint and exits with 128 + signal."""
        self.net.train()
        self.data.train.set_epoch(epoch)
        loss_sum, n_batches, images, start = 0.0, 0, 0, time.perf_counter()
        skip, self.skip_steps = self.skip_steps, 0
        for step, (x, y) in enumerate(self.data.train):
            if step < skip:
                continue
            if self.erasing is not None:  # every training batch, search steps' included
                x = self.erasing(x)
            searching = self.phase is not None and self.phase.active
            if searching:  # mixup stays off during the search, as in the reference code
                with self.search_autocast:
                    loss = self.phase.step((x, y), epoch)
            else:
                loss = self._plain_step(x, y)
            self._check_finite(loss, epoch, step)
            self.optimizer_step(scaled=not searching)
            if searching and self.phase.after_step(epoch):
                self._after_freezes()
            if self.ema is not None:
                self.ema.update(self.net, step=self.global_step)
            loss_sum += float(loss.detach())
            n_batches += 1
            images += x.shape[0] * self.dist.world_size
            # every rank must stop after the same step, whichever got the signal first
            if self.dist.any(stop.signum is not None):
                path = self.dist.on_main(self._checkpoint, epoch, step + 1)
                self.dist.on_main(print, f"stopped by signal {stop.signum or 'on another rank'} "
                                         f"at epoch {epoch} step {step + 1}; checkpoint {path}: "
                                         "rerun the same command to resume", flush=True)
                # 128 + signal, as a shell reports a killed command: DVC and SLURM must not
                # take an interrupted stage for a finished one.
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
        self.scheduler.step(epoch + 1)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.images_seen += images
        return {"train_loss": loss_sum / max(1, n_batches),
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_images_per_s": images / max(seconds, 1e-9),
                "frozen_layers": sum(m.frozen for _, m in enhancers(self.net))}

    def optimizer_step(self, scaled: bool = True) -> None:
        """The weight update from the gradients in ``p.grad``: unscaled (float16 AMP, when
        ``scaled``: the backward pass ran through the scaler), clipped to the recipe's norm,
        the recipe's optimizer, the per-update learning rate."""
        scaler = self.scaler if scaled else None
        if scaler is not None and self.recipe.clip_grad > 0:
            scaler.unscale_(self.optimizer)
        if self.recipe.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.net.parameters(), self.recipe.clip_grad)
        if scaler is not None:
            scaler.step(self.optimizer)  # skips the step when a gradient is inf/NaN
            scaler.update()
        else:
            self.optimizer.step()
        self.global_step += 1
        self.scheduler.step_update(num_updates=self.global_step)

    def _plain_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of an ordinary training step (mixup, the loss)."""
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.model(x)
            loss = (self.loss_mixup(out, target) if self.mixup is not None
                    else self.loss_plain(out, target))
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        if not torch.isfinite(loss):
            last = self.ckpts.latest()
            where = f"last good checkpoint: {last}" if last else "no checkpoint yet"
            raise FloatingPointError(
                f"loss is {float(loss.detach())} at epoch {epoch} step {step} of {self.run.out} "
                f"({where}): lower the learning rate (or enable recipes.*.clip_grad) and rerun "
                "to resume")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, predictions: bool = False) -> dict:
        """Top-1/top-5/loss on the whole val set; under DDP each rank scores its shard and
        the sums (and predictions, in val order) are merged on every rank."""
        model.eval()
        val = self.data.val
        n_val, rank, world = val.num_samples, self.dist.rank, self.dist.world_size
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # top1, top5, n, loss
        preds, seen = [], 0
        val.set_epoch(0)
        for x, y in val:
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

    def finish(self) -> RunMetrics | None:
        """Final evaluation (every rank: the val set is sharded) and, on rank 0, every output
        (other ranks: None)."""
        final_net, model_args = self.ema.module if self.ema else self.net, self.model_args
        genotype = None
        if self.phase is not None:
            if self.phase.finish(self.recipe.epochs - 1) and self.ema is not None:
                copy_freezes(self.net, self.ema.module)
            genotype = self.phase.search.genotype()
            final_net = export_fixed(copy.deepcopy(final_net))  # what the adapted model costs
            model_args = {**model_args, "enhancer": "fixed", "genotype": genotype.to_dict()}
            model_args.pop("candidates", None)
        result = self._final_scores or self.evaluate(final_net, predictions=True)
        return self.dist.on_main(self._write_outputs, final_net, model_args, genotype, result)

    def _write_outputs(self, final_net: nn.Module, model_args: dict, genotype,
                       result: dict) -> RunMetrics:
        art = self.out / "artifacts"
        art.mkdir(parents=True, exist_ok=True)
        if genotype is not None:
            genotype.save(art / "genotype.json")
            atomic_write_csv(art / "alpha_history.csv", self.phase.search.history_table(),
                             ["step", "epoch", "layer", "candidate", "prob"])
            atomic_write_csv(art / "freeze_events.csv", self.phase.search.freeze_table(),
                             ["layer", "ops", "step", "epoch", "reason", "margin"])
        preds = result.pop("predictions")
        atomic_write_csv(art / "predictions.csv",
                         [{"index": i, "label": int(t), "pred": int(p)}
                          for i, (t, p) in enumerate(preds)], ["index", "label", "pred"])
        cpu_net = copy.deepcopy(final_net).to("cpu").float().eval()
        with atomic_path(art / "model_final.pt") as tmp:
            # timm's convention: the constructor's arguments travel with the weights, so
            # build_model(**saved["model_args"]) rebuilds any saved model
            torch.save({"model_args": model_args, "variant": self.run.variant,
                        "mode": self.run.mode, "state_dict": cpu_net.state_dict()}, tmp)
        metrics = self.run_metrics(cpu_net, genotype, result)
        write_metrics(self.out / "metrics.json", metrics)
        return metrics

    def run_metrics(self, cpu_net: nn.Module, genotype, result: dict) -> RunMetrics:
        """The run's record (``experiments.metrics``): ``result``'s scores, the final model's
        cost, how it was trained and where."""
        from metapool.profile import profile_model

        prof = profile_model(cpu_net, self.run.variant, 224)
        run, args = self.run, self.model_args
        return RunMetrics(
            **result, params=prof.params, macs_224=prof.macs,
            macs_train_res=profile_model(cpu_net, "", self.recipe.img_size).macs,
            train_seconds=self.train_seconds,
            train_images_per_s=self.images_seen / max(self.train_seconds, 1e-9),
            epochs=self.recipe.epochs, img_size=self.recipe.img_size, recipe=run.recipe_name,
            dataset=self.data.report.get("dataset", "unknown"), seed=run.seed, mode=run.mode,
            variant=run.variant, backbone=args["backbone"], genotype_from=run.genotype_from,
            head=args.get("head", "plain"), output_gates=bool(args.get("output_gates", False)),
            world_size=self.dist.world_size, ema=self.ema is not None,
            frozen_ops=genotype.ops_by_layer() if genotype is not None else None,
            provenance=self.provenance)


def keep_freed_memory() -> None:
    """glibc's malloc hands large freed blocks back to the kernel and maps them again on the
    next step: on a CPU every training step then pays page faults for its activations (about
    5% of a 2-core step at 48 px, measured with the pipeline benchmark). Fixed thresholds keep
    them in the heap. A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


def run_training(runs: RunConfig | list[RunConfig]) -> list[RunMetrics | None]:
    """Train runs one after the other in this process (under torchrun when ``WORLD_SIZE`` is
    set); rank 0 returns their metrics (other ranks None each). Runs with the same data
    settings share the data streams, reseeded, and every run computes what it would compute
    alone."""
    runs = [runs] if isinstance(runs, RunConfig) else runs
    dist = init_distributed(runs[0].train.device if runs else "auto")
    if dist.device.type == "cpu":
        keep_freed_memory()
    results, streams = [], None
    try:
        for run in runs:
            trainer = Trainer(run, dist, streams)
            results.append(trainer.fit())
            streams = trainer.data
        return results
    finally:
        cleanup()
