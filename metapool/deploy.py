"""A trained model as it would be deployed, and its latency on the runtimes that deploy it.

``deployable(model)`` is the one inference form every runtime gets: eval mode, float32 on the
CPU, frozen search enhancers exported to their fixed ops, every BatchNorm that follows a
convolution folded into it, and every enhancer *lowered* (``DeployedEnhancer``) to operators a
runtime fuses:

- the linear candidates (``skip``, ``avg_pool_k``: a zero-padded box mean is a depthwise
  convolution) and the enhancer's BatchNorm become one depthwise k x k convolution with bias,
  which the runtime fuses with the h-swish that follows: one pass over the map;
- the other candidates (max pools: torch's ``max_pool2d``, a large window as two 1-D ones;
  ``strip_pool``) run as they are, then the BatchNorm as a depthwise 1x1 convolution, again
  fused with the h-swish. The average pool's custom backward (``ops.BoxMean``) never reaches an
  exporter: a linear op, it is inside the convolution.

On ONNX Runtime the BatchNorm as elementwise ``Mul``/``Add`` instead cost 0.26 of the baseline's
whole latency with every enhancer at max 3x3: they break its NCHWc convolution layout, so every
enhancer paid two layout reorders as well (reports/benchmarks, "Deployed latency").

``measure_latency`` times batch-1 inference of several models on several runtimes (PyTorch
eager, ``torch.compile``'s inductor, ONNX Runtime's CPU provider, ExecuTorch with XNNPACK), each
model interleaved with the reference (baseline, variant, baseline, ...), summarised by medians.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer
from metapool.models import export_fixed
from metapool.ops import BoxMean, candidate_outputs

RUNTIMES = ("eager", "inductor", "onnxruntime", "executorch")

# Modules whose children run in the order they are registered (timm's blocks and stems), so a
# Conv2d registered right before a BatchNorm2d feeds it. tests/test_ops.py checks every backbone.
_SEQUENTIAL_CHILDREN = (InvertedResidual, DepthwiseSeparableConv, ConvBnAct, BasicBlock,
                        Bottleneck, EfficientNet, MobileNetV3, ResNet, nn.Sequential)


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as the per-channel ``x * scale + shift`` it computes."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        scale, shift = bn_affine(bn)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (scale, shift) an eval-mode BatchNorm2d computes."""
    scale = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, in place (eval mode
    only: the folded model computes what the eval-mode model computes, to float rounding).

    timm's ``BatchNormAct2d`` keeps its activation (and dropout) as a module of its own. An
    enhancer's BatchNorm cannot be folded into a convolution (it follows a pooling op, and a
    ReLU6 separates it from the depthwise convolution before): it becomes a ``ChannelAffine``
    and its h-swish runs in place on that fresh output (``deployable`` lowers it instead).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: call model.eval() first")
    for module in model.modules():
        if isinstance(module, (MetaPoolEnhancer, FixedEnhancer)) and \
                isinstance(module.bn, nn.BatchNorm2d):
            module.bn = ChannelAffine(module.bn)
            module.act = nn.Hardswish(inplace=True)
    for parent in model.modules():
        if not isinstance(parent, _SEQUENTIAL_CHILDREN):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            after: list[nn.Module] = []
            if isinstance(bn, nn.Sequential) and len(bn) and isinstance(bn[0], nn.BatchNorm2d):
                bn, after = bn[0], list(bn)[1:]  # a BN followed by an output gate
            if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None), *after)
                    if m is not None and not isinstance(m, nn.Identity)]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    return model


def _linear_kernel(op: nn.Module) -> int | None:
    """The box size of a linear candidate (``skip``: 1, ``avg_pool_k``: k); None otherwise."""
    if isinstance(op, nn.Identity):
        return 1
    if isinstance(op, BoxMean):
        return op.kernel
    return None


class DeployedEnhancer(nn.Module):
    """A fixed enhancer in eval mode, lowered (module docstring): ``h_swish(linear(x) +
    affine(sum of the other ops(x)))`` with the BatchNorm inside ``linear`` and ``affine``.

    ``export``: the form for an exporter (ONNX Runtime, ExecuTorch): every affine a depthwise
    convolution. Otherwise the form for PyTorch (eager, inductor): PyTorch's CPU depthwise 1x1
    convolution takes a slow path (4-5x the baseline's whole latency with one in every block),
    so a 1x1 affine stays an ``addcmul``.
    """

    def __init__(self, enhancer: FixedEnhancer, export: bool = False) -> None:
        super().__init__()
        if enhancer.training:
            raise ValueError("DeployedEnhancer needs an eval-mode enhancer")
        self.channels, self.enhanced = enhancer.channels, enhancer.enhanced
        scale, shift = bn_affine(enhancer.bn)
        c = self.enhanced
        boxes = [k for k in map(_linear_kernel, enhancer.ops) if k is not None]
        others = [op for op in enhancer.ops if _linear_kernel(op) is None]
        # max pools stay the suite's MaxPool: torch's own max_pool2d, a 7x7 as a 7x1 then a
        # 1x7 (exported as two MaxPool nodes: faster than one 7x7 on ONNX Runtime and
        # ExecuTorch too); the average's custom backward never reaches an exporter (linear)
        self.others = nn.ModuleList(others)
        self.linear: nn.Module | None = None
        self.affine: nn.Module | None = None
        size = max(boxes, default=0)
        if size > 1 or (size == 1 and export):
            kernel = torch.zeros(c, 1, size, size)
            for k in boxes:  # zero-padded box means (skip: k = 1) summed into one kernel
                lo = (size - k) // 2
                kernel[:, :, lo:lo + k, lo:lo + k] += 1.0 / (k * k)
            self.linear = _depthwise(kernel * scale.view(c, 1, 1, 1), shift)
        elif size == 1:  # skip alone, for PyTorch: the BatchNorm as x * scale + shift
            self.linear = _Affine(scale, shift)
        if others:
            bias = shift if self.linear is None else None
            self.affine = _depthwise(scale.view(c, 1, 1, 1), bias) if export else \
                _Affine(scale, bias)
        self.act = nn.Hardswish(inplace=True)  # its input is always a fresh tensor
        self.eval()

    def _enhance(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.others:
            outs = candidate_outputs(x, self.others)  # a larger max pool from a smaller one
            rest = outs[0]
            for y in outs[1:]:
                rest = rest + y
            out = self.affine(rest)
        if self.linear is not None:
            out = self.linear(x) if out is None else self.linear(x) + out
        return self.act(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enhanced == self.channels:
            return self._enhance(x)
        return torch.cat([self._enhance(x[:, : self.enhanced]), x[:, self.enhanced:]], dim=1)


def _depthwise(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    c, _, k, _ = weight.shape
    conv = nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=bias is not None)
    conv.weight.data.copy_(weight)
    if bias is not None:
        conv.bias.data.copy_(bias)
    return conv


class _Affine(nn.Module):
    """``x * scale (+ shift)`` per channel."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("scale", scale.view(1, -1, 1, 1).clone())
        self.register_buffer("shift", None if shift is None else shift.view(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale if self.shift is None else torch.addcmul(self.shift, x, self.scale)


def deployable(model: nn.Module, export: bool = False) -> nn.Module:
    """The inference copy of ``model`` a runtime gets (module docstring): CPU, float32, eval
    mode, frozen enhancers exported, BatchNorm folded, enhancers lowered (``export``: in the
    form for an exporter, ``DeployedEnhancer``)."""
    net = copy.deepcopy(model).cpu().float().eval()
    if any(isinstance(m, MetaPoolEnhancer) for m in net.modules()):
        export_fixed(net)  # raises when a layer is still searching
        net.eval()
    for name, module in list(net.named_modules()):
        if isinstance(module, FixedEnhancer):
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, DeployedEnhancer(module, export))
    return fold_batchnorm(net)


# ------------------------------------------------------------------ runtimes
def _eager(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    net = model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return net(xc)
    return run


def _inductor(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    net = torch.compile(model.to(memory_format=torch.channels_last), mode="max-autotune-no-cudagraphs")
    xc = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return net(xc)
    run()  # compile now, not inside the timing
    return run


def export_onnx(model: nn.Module, path: str | Path, img_size: int = 224) -> Path:
    """``model`` (a ``deployable`` copy) as an ONNX file (opset 17, batch 1, float32)."""
    import warnings

    x = torch.zeros(1, 3, img_size, img_size)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"])
    return Path(path)


def onnx_session(path: str | Path, threads: int, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with every graph optimisation on, ``threads`` intra-op
    threads (and one inter-op); with ``profile_prefix``, its profiler on, writing there."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _onnxruntime(model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
    with tempfile.TemporaryDirectory() as tmp:
        session = onnx_session(export_onnx(model, Path(tmp) / "model.onnx", x.shape[-1]),
                               threads)
    feed = {"image": x.numpy()}
    return lambda: session.run(None, feed)


def executorch_program(model: nn.Module, img_size: int = 224) -> bytes:
    """``model`` (a ``deployable`` copy) as an ExecuTorch program lowered to XNNPACK, the
    runtime PyTorch ships for phones (``torch.export``, then ``to_edge_transform_and_lower``)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    x = torch.zeros(1, 3, img_size, img_size)
    exported = torch.export.export(model, (x,))
    return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]) \
        .to_executorch().buffer


def _executorch(model: nn.Module, x: torch.Tensor, threads: int) -> Callable[[], object]:
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(threads)  # XNNPACK's thread pool, not torch's
    # the program reads its buffer in place: both must live as long as the method
    buffer = executorch_program(model, x.shape[-1])
    program = Runtime.get().load_program(buffer)
    method = program.load_method("forward")

    def run(_keep=(program, buffer)):
        return method.execute([x])
    return run


def runner(runtime: str, model: nn.Module, img_size: int = 224,
           threads: int = 1) -> Callable[[], object]:
    """A batch-1 inference call of ``deployable(model)`` on ``runtime`` (eager and inductor:
    channels_last; ONNX Runtime and ExecuTorch: the export form, their own layouts)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")
    net = deployable(model, export=runtime in ("onnxruntime", "executorch"))
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    if runtime == "eager":
        return _eager(net, x)
    if runtime == "inductor":
        return _inductor(net, x)
    if runtime == "executorch":
        return _executorch(net, x, threads)
    return _onnxruntime(net, x, threads)


@dataclass
class Latency:
    """One model on one runtime, measured interleaved with the reference model."""

    model: str
    runtime: str
    threads: int
    ms: float               # median per-call time over the rounds
    ratio: float            # median over rounds of (this / reference), both timed in the round
    ratio_low: float        # the rounds' ratios: first and third quartile
    ratio_high: float
    reference_ms: float
    rounds: int


def _block_ms(call: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure_latency(models: dict[str, nn.Module], reference: str, runtimes: list[str],
                    img_size: int = 224, threads: int = 1, rounds: int = 15, calls: int = 5,
                    on_skip: Callable[[str, str, Exception], None] | None = None,
                    prepare: Callable[..., Callable[[], object]] | None = None
                    ) -> list[Latency]:
    """Batch-1 latency of every model on every runtime, as a ratio to ``models[reference]``
    on the same runtime: per round, a block of ``calls`` calls of the reference, then of the
    model (each block's median), so that drift and noise hit both alike. Threads: torch's and
    ONNX Runtime's intra-op threads are set to ``threads``. A model a runtime cannot run (an
    inductor compile that fails) is skipped and reported to ``on_skip``. ``prepare`` (default
    ``runner``) turns (runtime, model, img_size, threads) into the call that is timed."""
    prepare = prepare or runner
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: list[Latency] = []
    try:
        for runtime in runtimes:
            ref = prepare(runtime, models[reference], img_size, threads)
            for _ in range(3):
                ref()
            for name, model in models.items():
                try:
                    call = ref if name == reference else prepare(runtime, model, img_size,
                                                                 threads)
                except Exception as exc:  # noqa: BLE001 - a runtime that cannot compile it
                    if on_skip is None:
                        raise
                    on_skip(name, runtime, exc)
                    continue
                for _ in range(3):
                    call()
                pairs = [(_block_ms(ref, calls), _block_ms(call, calls)) for _ in range(rounds)]
                ratios = [m / r for r, m in pairs]
                q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
                out.append(Latency(name, runtime, threads, statistics.median(m for _, m in pairs),
                                   statistics.median(ratios), q1, q3,
                                   statistics.median(r for r, _ in pairs), rounds))
    finally:
        torch.set_num_threads(before)
    return out


def onnx_operator_profile(model: nn.Module, img_size: int = 224, threads: int = 1,
                          calls: int = 50, net: nn.Module | None = None) -> dict[str, float]:
    """Milliseconds per call spent in each ONNX Runtime operator type (the optimised graph's
    nodes: ``FusedConv``, ``MaxPool``, ``ReorderInput``, ...) of ``deployable(model)`` (or of
    ``net``, an inference copy prepared otherwise), from ONNX Runtime's own profiler."""
    import json

    net = net if net is not None else deployable(model, export=True)
    with tempfile.TemporaryDirectory() as tmp:
        session = onnx_session(export_onnx(net, Path(tmp) / "model.onnx", img_size), threads,
                               profile_prefix=str(Path(tmp) / "ort_profile"))
        feed = {"image": torch.randn(1, 3, img_size, img_size).numpy()}
        for _ in range(calls):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000 / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
