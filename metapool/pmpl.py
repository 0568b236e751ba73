"""Progressive Meta-Pooling Learning (METHOD.md section 2) as a per-step component.

The training loop calls, once per iteration::

    loss = search.step(support_batch, query_batch, epoch)   # leaves g_w in p.grad
    optimizer.step()                                       # the real weight update
    search.after_step(epoch)                               # progressive freezing

``step`` does one support forward/backward (whose weight gradient is kept for the real update),
an optional lookahead ``w' = w - inner_lr * g_w``, and a query forward/backward for the
gradient of alpha; first-order PMPL therefore costs two passes, not three. ``SearchPhase``
drives it inside a training loop (query batches, the deadline, what to release when the search
ends). ``PMPLSettings`` is ``params.yaml``'s ``pmpl`` section; ``PMPLConfig`` adds the recipe's
schedule (``alpha_lr``, ``deadline_epoch``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.func import functional_call

from metapool.enhancer import MetaPoolEnhancer
from metapool.genotype import Genotype, LayerChoice
from metapool.models import enhancers, unused_parameters
from metapool.ops import DEFAULT_CANDIDATES, check_candidates


class PMPLSettings(BaseModel):
    """The search as ``params.yaml``'s ``pmpl`` section sets it: candidates, the bilevel step,
    the stopping rule and where query batches come from (METHOD.md sections 1-3)."""

    model_config = ConfigDict(extra="forbid")

    candidates: list[str] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    split_ratio: float = Field(1.0, gt=0, le=1)
    # heldout: the meta split of train (default); val: the reference code's leak
    meta_source: Literal["heldout", "val"] = "heldout"
    # permuted: a control of the search - each query batch's labels shuffled among its images
    # (seeded), so alpha learns from batches whose labels carry no information
    meta_labels: Literal["true", "permuted"] = "true"
    inner_lr: float = Field(0.0, ge=0)
    inner_steps: int = Field(1, ge=1)
    order: Literal["first", "second"] = "first"
    second_order_method: Literal["finite_difference", "exact"] = "finite_difference"
    fd_eps: float = Field(0.01, gt=0)
    alpha_betas: tuple[float, float] = (0.5, 0.999)
    alpha_weight_decay: float = Field(1e-3, ge=0)
    threshold: float = Field(0.2, gt=0, le=1)  # the reference's final value (0.3 at first)
    stop_rule: Literal["margin", "reference_code", "none"] = "margin"
    deadline_policy: Literal["top2", "argmax"] = "top2"
    history_every: int = Field(10, ge=1)

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, names: list[str]) -> list[str]:
        return list(check_candidates(names))

    @model_validator(mode="after")
    def _second_order_needs_one_inner_step(self) -> PMPLSettings:
        if (self.order == "second" and self.second_order_method == "finite_difference"
                and self.inner_steps != 1):
            # relative to the section: params' errors prefix it with where it stands
            raise ValueError("order=second with finite_difference needs inner_steps=1: "
                             "use second_order_method=exact")
        return self


class PMPLConfig(PMPLSettings):
    """Everything the search needs: the settings plus its schedule, which belongs to the
    training recipe (``recipes.<name>.alpha_lr`` and ``deadline_epoch``)."""

    alpha_lr: float = Field(3e-4, gt=0)
    deadline_epoch: int = Field(50, ge=0)


def rng_state(device: torch.device) -> tuple:
    """The random state that dropout and drop-path draw from on ``device``."""
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalise with batch statistics (train mode) but leave their
    running statistics alone: passes at lookahead or perturbed weights must not move them."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def top2_margin(probs: torch.Tensor) -> float:
    """``p_top1 - p_top2`` of a probability vector (the paper's Eq. 4)."""
    top = torch.topk(probs, min(2, len(probs))).values
    return float(top[0] - (top[1] if len(top) > 1 else 0.0))


@dataclass
class FreezeEvent:
    layer: str
    ops: list[int]
    probs: list[float]
    step: int
    epoch: int
    reason: str


@dataclass
class _History:
    steps: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    probs: list[list[list[float]]] = field(default_factory=list)  # [record][layer][candidate]


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


class ProgressiveMetaPooling:
    """Learns the enhancers' alpha with a bilevel step and freezes layers progressively."""

    def __init__(
        self,
        model: nn.Module,
        config: PMPLConfig,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.model = model  # possibly DDP-wrapped: the support pass goes through it
        self.net = _unwrap(model)
        self.cfg = config
        self.loss_fn = loss_fn
        # Genotype layer names are the blocks' names (set by build_model), else module paths.
        self.layers: list[tuple[str, MetaPoolEnhancer]] = [
            (getattr(m, "layer", path), m) for path, m in enhancers(self.net)]
        if not self.layers:
            raise ValueError("PMPL needs a model with searchable enhancers (enhancer=search)")
        self.candidates = list(self.layers[0][1].candidates)
        self.alphas = [m.alpha for _, m in self.layers]
        alpha_ids = {id(a) for a in self.alphas}
        self.weight_names = [n for n, p in self.net.named_parameters()
                             if p.requires_grad and id(p) not in alpha_ids]
        params = dict(self.net.named_parameters())
        self.weights = [params[n] for n in self.weight_names]
        self.alpha_optimizer = torch.optim.Adam(
            self.alphas, lr=config.alpha_lr, betas=config.alpha_betas,
            weight_decay=config.alpha_weight_decay,
        )
        self.global_step = 0
        self.events: list[FreezeEvent] = []
        self.history = _History()
        self._broadcast_alpha()

    # ----------------------------------------------------------------- public API
    @property
    def active(self) -> bool:
        """True while at least one layer is still searching."""
        return any(not m.frozen for _, m in self.layers)

    def weight_parameters(self) -> list[nn.Parameter]:
        """Parameters for the recipe's weight optimizer (everything but alpha)."""
        return list(self.weights)

    def step(self, support: tuple[torch.Tensor, torch.Tensor],
             query: tuple[torch.Tensor, torch.Tensor] | None, epoch: int) -> torch.Tensor:
        """One PMPL iteration; leaves the support gradient in ``p.grad`` for the weight update."""
        x_s, y_s = support
        for p in self.net.parameters():
            p.grad = None
        rng = rng_state(x_s.device)  # the support pass's dropout/drop-path masks, for reuse
        loss_s = self.loss_fn(self.model(x_s), y_s)
        loss_s.backward()  # under DDP this all-reduces g_w like ordinary training
        if self.active:
            if query is None:
                raise ValueError("PMPL is still searching but no query batch was given")
            # The hypergradient takes no weight gradient into p.grad (autograd.grad only), so
            # g_w stays in place for the optimizer: no copy needed.
            g_w = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.weights]
            grad_alpha = self.hypergradient(support, query, g_w, rng)
            # A frozen layer's alpha gets no gradient at all, so Adam leaves it exactly as it
            # was (a zero gradient would still move it through momentum and weight decay).
            for (_, module), g in zip(self.layers, grad_alpha, strict=True):
                module.alpha.grad = None if module.frozen else g
            self._allreduce_alpha_grad()
            self.alpha_optimizer.step()
            self._check_finite_alpha(epoch)
        for a in self.alphas:
            a.grad = None  # alpha is never touched by the weight optimizer
        self.global_step += 1
        return loss_s.detach()

    def after_step(self, epoch: int) -> list[FreezeEvent]:
        """Apply the stopping rule to every searching layer; record alpha history."""
        if self.active and (self.global_step == 1
                            or self.global_step % max(1, self.cfg.history_every) == 0):
            self._record(epoch)
        frozen: list[FreezeEvent] = []
        if self.cfg.stop_rule == "none":
            return frozen
        for name, module in self.layers:
            if module.frozen:
                continue
            probs = module.probabilities()
            margin = top2_margin(probs)
            if margin >= self.cfg.threshold:
                if self.cfg.stop_rule == "reference_code":
                    # The reference code indexed the candidates with the boolean result of the
                    # margin test: True == 1 -> always candidate #1 (strip_pool).
                    chosen = [int(margin >= self.cfg.threshold)]
                else:
                    chosen = [int(torch.topk(probs, min(2, len(probs))).indices[0])]
                frozen.append(self._freeze(name, module, chosen, epoch, self.cfg.stop_rule))
        return frozen

    def on_epoch_start(self, epoch: int) -> list[FreezeEvent]:
        """At the deadline epoch, fix every undecided layer by the deadline policy."""
        if epoch >= self.cfg.deadline_epoch:
            return self.finalize(epoch, reason="deadline")
        return []

    def finalize(self, epoch: int, reason: str = "end_of_training") -> list[FreezeEvent]:
        """Freeze every layer still searching (deadline policy); used at the deadline/end."""
        if self.active and (not self.history.steps or self.history.steps[-1] != self.global_step):
            self._record(epoch)  # the probabilities the deadline decided on
        events = []
        for name, module in self.layers:
            if module.frozen:
                continue
            probs = module.probabilities()
            k = 2 if self.cfg.deadline_policy == "top2" and len(probs) > 1 else 1
            chosen = sorted(int(i) for i in torch.topk(probs, k).indices)
            events.append(self._freeze(name, module, chosen, epoch, reason))
        return events

    def genotype(self) -> Genotype:
        """The decisions so far (every layer must be frozen)."""
        if self.active:
            raise RuntimeError("some layers are still searching: call finalize() first")
        by_layer = {e.layer: e for e in self.events}
        layers = []
        for name, module in self.layers:
            e = by_layer.get(name)
            layers.append(LayerChoice(
                layer=name, ops=[self.candidates[i] for i in module.chosen],
                probs=e.probs if e else module.probabilities().tolist(),
                step=e.step if e else -1, epoch=e.epoch if e else -1,
                reason=e.reason if e else "restored"))
        return Genotype(layers=layers, candidates=self.candidates,
                        split_ratio=self.layers[0][1].split_ratio)

    def state_dict(self) -> dict:
        """Alpha optimizer state, freeze events and history (alpha itself is in the model)."""
        return {
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "global_step": self.global_step,
            "events": [asdict(e) for e in self.events],
            "history": asdict(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.global_step = int(state["global_step"])
        self.events = [FreezeEvent(**e) for e in state["events"]]
        self.history = _History(**state["history"])

    def history_table(self) -> list[dict]:
        """Long-format alpha history: one row per (record, layer, candidate)."""
        rows = []
        for step, epoch, probs in zip(self.history.steps, self.history.epochs,
                                      self.history.probs, strict=True):
            for (name, _), layer_probs in zip(self.layers, probs, strict=True):
                for cand, p in zip(self.candidates, layer_probs, strict=True):
                    rows.append({"step": step, "epoch": epoch, "layer": name,
                                 "candidate": cand, "prob": p})
        return rows

    def freeze_table(self) -> list[dict]:
        """One row per freeze event: layer, kept op(s), step, epoch, reason and margin."""
        return [{"layer": e.layer, "ops": "+".join(self.candidates[i] for i in e.ops),
                 "step": e.step, "epoch": e.epoch, "reason": e.reason,
                 "margin": top2_margin(torch.tensor(e.probs))} for e in self.events]

    # ----------------------------------------------------------------- the hypergradient
    def hypergradient(self, support, query, g_w: list[torch.Tensor],
                      support_rng: tuple | None = None) -> list[torch.Tensor]:
        """Gradient of the query loss w.r.t. alpha after the lookahead (METHOD.md step 3).

        ``g_w`` is the support pass's weight gradient and ``support_rng`` the random state it
        started from (``rng_state``): second-order passes over the support batch replay it, so
        they draw the dropout/drop-path masks the support pass drew. None of these passes moves
        BatchNorm's running statistics: only the real support pass does.
        """
        cfg = self.cfg
        with frozen_bn_statistics(self.net):
            if cfg.inner_lr == 0:
                return self._alpha_grad(query, [])  # plain alternating update (reference code)
            if cfg.order == "second" and cfg.second_order_method == "exact":
                return self._exact_hypergradient(support, query, support_rng)
            with self._weights_restored():  # exactly: w + d - d is not w in floating point
                self._lookahead(support, g_w)
                if cfg.order == "first":
                    return self._alpha_grad(query, [])
                grads = self._alpha_grad(query, self.weights)
                g_alpha, dw = grads[: len(self.alphas)], grads[len(self.alphas):]
            return self._finite_difference(support, g_alpha, dw, support_rng)

    def _alpha_grad(self, batch, extra: list[torch.Tensor]) -> list[torch.Tensor]:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        grads = torch.autograd.grad(loss, self.alphas + list(extra), allow_unused=True)
        targets = self.alphas + list(extra)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets, strict=True)]

    def _lookahead(self, support, g_w) -> None:
        """w <- w - inner_lr * g, ``inner_steps`` times (the caller restores w)."""
        grads = g_w
        for k in range(self.cfg.inner_steps):
            if k > 0:
                x, y = support
                loss = self.loss_fn(self.net(x), y)
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(
                    torch.autograd.grad(loss, self.weights, allow_unused=True),
                    self.weights, strict=True)]
            self._shift([-self.cfg.inner_lr * g for g in grads], 1.0)

    @contextmanager
    def _weights_restored(self) -> Iterator[None]:
        """The weights as they were on entry, bit for bit, on exit."""
        saved = [p.detach().clone() for p in self.weights]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.weights, saved, strict=True):
                    p.copy_(w)

    @torch.no_grad()
    def _shift(self, deltas: list[torch.Tensor], sign: float) -> None:
        for p, d in zip(self.weights, deltas, strict=True):
            p.add_(d, alpha=sign)

    def _finite_difference(self, support, g_alpha, dw, support_rng) -> list[torch.Tensor]:
        """DARTS eq. 8: subtract inner_lr * (grad_a L_s(w+) - grad_a L_s(w-)) / (2 eps).

        Both passes draw the same dropout masks (the support pass's) and run in float32 even
        under autocast: their difference is divided by a small eps, so any other noise would
        swamp the second-order term."""
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in dw)).item()
        if norm == 0:
            return g_alpha
        eps = self.cfg.fd_eps / norm
        step = [eps * d for d in dw]
        device = support[0].device
        after = rng_state(device)
        masks = support_rng or after
        try:
            with self._weights_restored(), torch.autocast(device.type, enabled=False):
                self._shift(step, 1.0)
                set_rng_state(masks, device)
                g_plus = self._alpha_grad(support, [])
                self._shift(step, -2.0)
                set_rng_state(masks, device)
                g_minus = self._alpha_grad(support, [])
        finally:
            set_rng_state(after, device)
        return [g - self.cfg.inner_lr * (gp - gm) / (2 * eps)
                for g, gp, gm in zip(g_alpha, g_plus, g_minus, strict=True)]

    def _exact_hypergradient(self, support, query, support_rng) -> list[torch.Tensor]:
        """Differentiate through the unrolled lookahead with autograd (any inner_steps); the
        first inner pass replays the support pass's random state (its dropout masks)."""
        x_s, y_s = support
        if support_rng is not None:
            set_rng_state(support_rng, x_s.device)
        fast = dict(zip(self.weight_names, self.weights, strict=True))
        for _ in range(self.cfg.inner_steps):
            loss = self.loss_fn(functional_call(self.net, fast, (x_s,), strict=False), y_s)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True,
                                        allow_unused=True)
            fast = {n: w if g is None else w - self.cfg.inner_lr * g
                    for (n, w), g in zip(fast.items(), grads, strict=True)}
        x_q, y_q = query
        loss_q = self.loss_fn(functional_call(self.net, fast, (x_q,), strict=False), y_q)
        grads = torch.autograd.grad(loss_q, self.alphas, allow_unused=True)
        return [torch.zeros_like(a) if g is None else g.detach()
                for g, a in zip(grads, self.alphas, strict=True)]

    # ----------------------------------------------------------------- bookkeeping
    def _freeze(self, name, module, chosen, epoch, reason) -> FreezeEvent:
        module.freeze(chosen)
        event = FreezeEvent(layer=name, ops=chosen, probs=module.probabilities().tolist(),
                            step=self.global_step, epoch=epoch, reason=reason)
        self.events.append(event)
        return event

    def _record(self, epoch: int) -> None:
        self.history.steps.append(self.global_step)
        self.history.epochs.append(epoch)
        self.history.probs.append([m.probabilities().tolist() for _, m in self.layers])

    def _check_finite_alpha(self, epoch: int) -> None:
        for name, module in self.layers:
            if not torch.isfinite(module.alpha).all():
                raise FloatingPointError(
                    f"alpha of {name} became NaN/inf at step {self.global_step} (epoch {epoch}): "
                    "lower pmpl.alpha_lr or pmpl.inner_lr and resume from the last checkpoint")

    def _allreduce_alpha_grad(self) -> None:
        # Averaging alpha's gradient (rather than computing it on one rank) uses every rank's
        # query batch, and all ranks then take the same Adam step from the same state, so alpha
        # and every freezing decision stay bit-identical across ranks (the same layers are
        # frozen everywhere, so the same alphas have a gradient).
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            alphas = [a for a in self.alphas if a.grad is not None]
            flat = torch.cat([a.grad.reshape(-1) for a in alphas])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= dist.get_world_size()
            offset = 0
            for a in alphas:
                a.grad.copy_(flat[offset: offset + a.numel()].view_as(a))
                offset += a.numel()

    def _broadcast_alpha(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for a in self.alphas:
                dist.broadcast(a.data, src=0)


class SearchPhase:
    """PMPL inside a training loop: cycles the query batches, applies the deadline, and tells
    the loop when the search has ended and which parameters no longer take part.

    ``queries`` is a re-iterable of ``(x, y)`` batches with ``set_epoch(int)`` (a data stream
    whose order is fixed by the epoch). The meta split is small, so it is cycled, each lap in
    the order of (epoch, lap): a resumed run sees the same query batches.
    """

    def __init__(self, search: ProgressiveMetaPooling, queries: Iterable,
                 permute_labels_seed: int | None = None) -> None:
        self.search = search
        self.queries = queries
        # not None: every query batch's labels are permuted among its images (the control)
        self.permute_labels_seed = permute_labels_seed
        self._batches: Iterator | None = None

    @property
    def active(self) -> bool:
        """True while at least one layer is still searching."""
        return self.search.active

    def start_epoch(self, epoch: int) -> bool:
        """Apply the deadline at the start of ``epoch``; True when layers were just frozen."""
        frozen = bool(self.search.on_epoch_start(epoch))
        self._batches = self._cycle(epoch) if self.active else None
        return frozen

    def step(self, support: tuple[torch.Tensor, torch.Tensor], epoch: int) -> torch.Tensor:
        """The bilevel step on ``support`` and the next query batch (leaves g_w in p.grad)."""
        return self.search.step(support, next(self._batches), epoch)

    def after_step(self, epoch: int) -> bool:
        """The stopping rule after the weight update; True when layers were just frozen."""
        return bool(self.search.after_step(epoch))

    def finish(self, epoch: int) -> bool:
        """Fix every layer still searching (deadline policy); True when any was."""
        return bool(self.search.finalize(epoch)) if self.active else False

    def unused_parameters(self) -> list[nn.Parameter]:
        """Alpha and the dropped candidates of every frozen layer: what DDP must not wait for."""
        return unused_parameters(self.search.net)

    def _cycle(self, epoch: int) -> Iterator:
        lap = 0
        while True:
            self.queries.set_epoch(epoch * 1000 + lap)
            for k, (x, y) in enumerate(self.queries):
                yield (x, self._permuted(y, epoch, lap, k)) if self.permute_labels_seed is not None \
                    else (x, y)
            lap += 1

    def _permuted(self, y: torch.Tensor, epoch: int, lap: int, k: int) -> torch.Tensor:
        # seeded by the batch's position, so a resumed run permutes the same way
        key = ((self.permute_labels_seed * 1000003 + epoch) * 1000003 + lap) * 1000003 + k
        g = torch.Generator().manual_seed(key % 2**63)
        return y[torch.randperm(len(y), generator=g).to(y.device)]
