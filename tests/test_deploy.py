"""Deployment: the lowered enhancers compute what the trained ones compute, the exported models
run on ONNX Runtime and ExecuTorch with eager's outputs, and the latency table is what it says."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metapool.deploy import (
    DeployedEnhancer,
    deployable,
    measure_latency,
    onnx_operator_profile,
    runner,
)
from metapool.enhancer import FixedEnhancer
from metapool.models import build_model


def _calibrated(model: nn.Module, size: int = 32) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, then eval mode."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, size, size))
    return model.eval()


@pytest.mark.parametrize("ops,split", [
    (["skip"], 1.0), (["avg_pool_3x3"], 1.0), (["avg_pool_5x5", "avg_pool_7x7"], 1.0),
    (["max_pool_3x3"], 1.0), (["max_pool_3x3", "max_pool_5x5"], 1.0),
    (["skip", "strip_pool"], 1.0), (["avg_pool_3x3", "max_pool_7x7"], 1.0),
    (["skip", "max_pool_3x3"], 0.5)])
@pytest.mark.parametrize("export", [False, True])
def test_lowered_enhancer_computes_the_fixed_one(ops, split, export):
    torch.manual_seed(1)
    enh = FixedEnhancer(16, ops, split)
    nn.init.uniform_(enh.bn.weight, -1.5, 1.5)  # negative scales too
    nn.init.uniform_(enh.bn.bias, -0.5, 0.5)
    with torch.no_grad():
        enh.train()(torch.randn(4, 16, 9, 7))
    enh.eval()
    low = DeployedEnhancer(enh, export=export)
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(low(x), enh(x), rtol=1e-5, atol=1e-5)
    convs = [m for m in low.modules() if isinstance(m, nn.Conv2d)]
    linear = [o for o in ops if o == "skip" or o.startswith("avg")]
    # linear ops and the BN are one depthwise convolution (for PyTorch a lone skip is an addcmul)
    if linear and (export or linear != ["skip"]):
        assert low.linear is not None and low.linear.groups == low.enhanced
    assert all(c.groups == c.in_channels for c in convs if c is low.linear or c is low.affine)


def _small_variants() -> dict[str, nn.Module]:
    genotype = {"layers": [{"layer": n, "ops": ops, "probs": [], "step": 0, "epoch": 0,
                            "reason": "margin"}
                           for n, ops in zip(
                               [f"blocks.{s}.{b}" for s, k in ((1, 2), (2, 3), (3, 4), (4, 3),
                                                               (5, 3), (6, 1)) for b in range(k)],
                               [["max_pool_3x3"], ["avg_pool_5x5"], ["skip", "strip_pool"],
                                ["max_pool_5x5", "max_pool_7x7"]] * 4, strict=True)],
                "candidates": ["skip", "strip_pool", "max_pool_3x3", "max_pool_5x5",
                               "max_pool_7x7", "avg_pool_3x3", "avg_pool_5x5", "avg_pool_7x7"],
                "split_ratio": 1.0}
    return {"adapted": _calibrated(build_model("mobilenetv2_100", "fixed", genotype=genotype,
                                               num_classes=10)),
            "published": _calibrated(build_model("mobilenetv2_100", "none", output_gates=True,
                                                 head="published", num_classes=10))}


@pytest.mark.parametrize("runtime", ["onnxruntime", "executorch", "eager"])
def test_exported_models_run_with_eagers_outputs(runtime):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, model in _small_variants().items():
        with torch.no_grad():
            want = model(x)
        call = runner(runtime, model, img_size=32)
        out = call()
        got = torch.as_tensor(out[0] if isinstance(out, (list, tuple)) else out)
        while isinstance(got, (list, tuple)):
            got = torch.as_tensor(got[0])
        assert got.shape == want.shape, name
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, scale), name


def test_onnx_graph_has_no_layout_breaking_elementwise_ops():
    model = _small_variants()["adapted"]
    prof = onnx_operator_profile(model, img_size=32, calls=3)
    # the lowered enhancers leave ONNX Runtime convolutions, pools and the gates' ops; the
    # BatchNorm as Mul + Add (and their reorders) would show up here
    assert prof and all(v >= 0 for v in prof.values())
    assert any("Conv" in op for op in prof)
    assert "Add" not in prof or prof["Add"] < sum(prof.values())


def test_latency_table_interleaves_with_the_reference():
    base = _calibrated(build_model("mobilenetv2_100", "none", num_classes=10))
    heavy = _small_variants()["adapted"]
    rows = measure_latency({"base": base, "heavy": heavy}, "base", ["eager", "onnxruntime"],
                           img_size=32, threads=1, rounds=4, calls=2)
    assert [(r.runtime, r.model) for r in rows] == [("eager", "base"), ("eager", "heavy"),
                                                    ("onnxruntime", "base"),
                                                    ("onnxruntime", "heavy")]
    for r in rows:
        assert r.threads == 1 and r.rounds == 4 and r.ms > 0 and r.reference_ms > 0
        assert r.ratio_low <= r.ratio <= r.ratio_high
    for r in rows:
        if r.model == "base":  # the reference against itself: an A/A of the method
            assert 0.5 < r.ratio < 2.0
    skipped = []
    measure_latency({"base": base}, "base", ["eager"], img_size=32, rounds=3, calls=1,
                    on_skip=lambda *a: skipped.append(a))
    assert not skipped
    with pytest.raises(ValueError, match="unknown runtime"):
        runner("tvm", base)


def test_deployable_exports_a_frozen_search_model():
    torch.manual_seed(0)
    model = build_model("mobilenetv2_100", "search", num_classes=10)
    for i, (_, enh) in enumerate(m for m in model.named_modules()
                                 if type(m[1]).__name__ == "MetaPoolEnhancer"):
        enh.freeze([i % 3 + 2])  # max pools
    model = _calibrated(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployable(copy.deepcopy(model))(x), model(x),
                                   rtol=1e-4, atol=1e-4)


def test_metapool_profile_prints_costs_and_latency_beside_the_reference():
    import json

    from tests.helpers import metapool

    proc = metapool("profile", "metapool_published_mobilenetv2_100", "--json", "--runtime",
                    "onnxruntime", "--rounds", "3", "--img-size", "64")
    out = json.loads(proc.stdout)
    base = out["models"]["mobilenetv2_100"]
    assert base["params"] == 3_504_872 and base["enhancers"] == 0
    pub = out["models"]["metapool_published_mobilenetv2_100"]
    assert pub["params"] == 5_181_686
    assert [(r["runtime"], r["model"]) for r in out["latency"]] == [
        ("onnxruntime", "mobilenetv2_100"), ("onnxruntime", "metapool_published_mobilenetv2_100")]
    assert all(r["threads"] == 1 and r["ms"] > 0 and r["rounds"] == 3 for r in out["latency"])
    table = metapool("profile", "mobilenetv2_100").stdout  # MACs at 224 px by default
    assert "300,774,272" in table and "3,504,872" in table
