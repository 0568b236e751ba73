"""Deployed latency of the enhancers, before and after lowering them, and where the time goes.

    python -m experiments.benchmarks.deployed                      # eager and ONNX Runtime
    python -m experiments.benchmarks.deployed --inductor           # + torch.compile (slow)

Models at 1000 classes with BatchNorm statistics from a few train-mode passes (so folding does
something): MobileNetV2, every enhancer fixed to one op (skip, max 3x3, avg 3x3, max 7x7), a
top-2 genotype (skip + max 3x3 everywhere, as the deadline's non-dominated set), the published
model and coordinate attention in the 16 slots. Two deployed forms, each timed interleaved with
MobileNetV2 in the same form on the same runtime (``metapool.deploy.measure_latency``):

- ``folded``: BatchNorm folded into the convolutions, the enhancer's BatchNorm an elementwise
  affine (``fold_batchnorm`` alone; ONNX: ``Mul`` + ``Add``);
- ``lowered``: ``metapool.deploy.deployable`` (the linear ops and the BatchNorm as depthwise
  convolutions the runtime fuses with the h-swish).

Then ONNX Runtime's own profiler splits each lowered model's time by operator type, and the
excess over MobileNetV2 is set beside a floor: one extra read and write of every enhanced map
(the ``skip`` model lowered: a single fused depthwise 1x1 + h-swish per enhancer).
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from metapool.deploy import (
    _eager,
    _executorch,
    _inductor,
    _onnxruntime,
    deployable,
    fold_batchnorm,
    measure_latency,
    onnx_operator_profile,
)
from metapool.models import build_model
from metapool.ops import DEFAULT_CANDIDATES


def models() -> dict[str, torch.nn.Module]:
    """The benchmark's models (1000 classes, calibrated BatchNorm, eval mode)."""
    torch.manual_seed(0)
    slots = [f"blocks.{s}.{b}" for s, n in ((1, 2), (2, 3), (3, 4), (4, 3), (5, 3), (6, 1))
             for b in range(n)]
    top2 = {"layers": [{"layer": name, "ops": ["skip", "max_pool_3x3"], "probs": [],
                        "step": 0, "epoch": 0, "reason": "deadline"} for name in slots],
            "candidates": list(DEFAULT_CANDIDATES), "split_ratio": 1.0}
    built = {
        "mobilenetv2": build_model("mobilenetv2_100", "none", num_classes=1000),
        "all skip": build_model("mobilenetv2_100", "fixed", fixed_op="skip", num_classes=1000),
        "all max 3x3": build_model("mobilenetv2_100", "fixed", fixed_op="max_pool_3x3",
                                   num_classes=1000),
        "all avg 3x3": build_model("mobilenetv2_100", "fixed", fixed_op="avg_pool_3x3",
                                   num_classes=1000),
        "all max 7x7": build_model("mobilenetv2_100", "fixed", fixed_op="max_pool_7x7",
                                   num_classes=1000),
        "top-2 skip+max 3x3": build_model("mobilenetv2_100", "fixed", genotype=top2,
                                          num_classes=1000),
        "published": build_model("mobilenetv2_100", "none", output_gates=True,
                                 head="published", num_classes=1000),
        "coord attention x16": build_model("mobilenetv2_100", "attention", attention="coord",
                                           num_classes=1000),
    }
    for model in built.values():
        with torch.no_grad():
            model(torch.randn(8, 3, 224, 224))
        model.eval()
    return built


def folded(runtime: str, model: torch.nn.Module, img_size: int, threads: int):
    """The ``folded`` form's call (BatchNorm folded, enhancers not lowered)."""
    net = fold_batchnorm(copy.deepcopy(model).eval())
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    if runtime == "eager":
        return _eager(net, x)
    if runtime == "inductor":
        return _inductor(net, x)
    if runtime == "executorch":
        return _executorch(net, x, threads)
    return _onnxruntime(net, x, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inductor", action="store_true", help="also torch.compile (~15 s a model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    nets = models()
    runtimes = ["eager", "onnxruntime", "executorch"] + (["inductor"] if args.inductor else [])
    for form, prepare in (("folded", folded), ("lowered", None)):
        for lat in measure_latency(nets, "mobilenetv2", runtimes, 224, args.threads,
                                   args.rounds, args.calls, prepare=prepare):
            print(json.dumps({"form": form, **vars(lat)}), flush=True)
    base = onnx_operator_profile(nets["mobilenetv2"], threads=args.threads)
    print(json.dumps({"onnx_profile": "mobilenetv2", "ms_per_op": base}), flush=True)
    for name in ("all skip", "all max 3x3", "all avg 3x3", "top-2 skip+max 3x3", "published"):
        for form, net in (("folded", fold_batchnorm(copy.deepcopy(nets[name]))),
                          ("lowered", deployable(nets[name], export=True))):
            prof = onnx_operator_profile(nets[name], threads=args.threads, net=net)
            print(json.dumps({"onnx_profile": name, "form": form, "ms_per_op": prof,
                              "total_ms": round(sum(prof.values()), 3),
                              "baseline_total_ms": round(sum(base.values()), 3)}), flush=True)


if __name__ == "__main__":
    main()
