"""The report's tables print what the CSVs hold, at the stated precision; the search control,
the geometry and the per-backbone genotype tables say what the runs did."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import findings, report
from experiments.compare import compare_all, write_results
from experiments.config import CompareSettings
from metapool.models import slot_names
from metapool.receptive_field import enhancer_map_sizes
from tests.helpers import write_run_metrics

CFG = CompareSettings(resamples=200, min_seeds=5,
                      controls=[("baseline-aa", "baseline", "no difference")])


def _runs() -> dict[str, dict[int, dict]]:
    """Top-1s on a 400-image val set (steps of 0.25) whose means need 2 decimals: the issue's
    72.65 / 65.75 / 18.75 / 99.25 cases."""
    def m(top1, top5, mode="baseline", **extra):
        return {"top1": top1, "top5": top5, "mode": mode, "backbone": "mobilenetv2_100",
                "recipe": "default", "params": 2_236_682, "macs_224": 299_522_432,
                "train_seconds": 20.0, "train_images_per_s": 400.0, "dataset": "embedded-default",
                "img_size": 48, "epochs": 4, **extra}

    base = [72.25, 73.0, 71.5, 74.0, 72.5]  # mean 72.65
    return {"baseline": {s: m(v, 99.25) for s, v in enumerate(base)},
            "baseline-aa": {s: m(v + 0.25 * (s % 2), 99.5) for s, v in enumerate(base)},
            "attn-se": {0: m(65.75, 99.25, mode="attention")},
            "fixed-max3": {0: m(18.75, 70.0, mode="fixed")},
            "pmpl": {0: m(20.25, 70.25, mode="pmpl"), 1: m(25.5, 71.0, mode="pmpl")},
            "published": {0: m(73.25, 99.75, head="published", output_gates=True)}}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = compare_all(_runs(), [["pmpl", "attn-se"], ["published", "pmpl"]], CFG)
    write_results(json.loads(json.dumps(result, default=float)), out)
    return json.loads((out / "compare.json").read_text()), out


def _csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_variants_table_prints_the_csv_at_two_decimals(written):
    result, out = written
    view = report.variants_view(result)
    for row in _csv(out / "variants.csv"):
        assert view.loc[row["variant"], "top-1 (%)"] == f"{float(row['top1_mean']):.2f}"
        assert view.loc[row["variant"], "top-5 (%)"] == f"{float(row['top5_mean']):.2f}"
    # the misprints the issue found: 72.65 shown as 72.70, 99.25 as 99.20
    assert view.loc["baseline", "top-1 (%)"] == "72.65"
    assert view.loc["attn-se", "top-5 (%)"] == "99.25"
    assert view.loc["fixed-max3", "top-1 (%)"] == "18.75"
    assert view.loc["baseline", "seeds"] == "seeds 0, 1, 2, 3, 4"


def test_comparisons_table_prints_the_csv_at_two_decimals(written):
    result, out = written
    view = report.comparisons_view(result)
    for row in _csv(out / "comparisons.csv"):
        assert view.loc[f"{row['a']} vs {row['b']}", "A - B (points)"] == \
            f"{float(row['diff_top1']):+.2f}"


def test_gap_table_gain_is_the_difference_of_the_figures_beside_it(written):
    result, _ = written
    gap = report.gap_view(result)
    pmpl = gap.loc["MobileNetV2 + Meta-Pooling (the searched model), top-1"]
    base = gap.loc["MobileNetV2 baseline, top-1 (the seeds of pmpl)"]
    gain = gap.loc["gain of pmpl over MobileNetV2 (points)"]
    assert pmpl["seeds"] == base["seeds"] == gain["seeds"] == "seeds 0, 1"
    # pmpl 22.875 against the baseline's seeds 0 and 1 (72.625), not its 5-seed mean
    assert float(pmpl["measured"]) == pytest.approx((20.25 + 25.5) / 2, abs=0.005)
    assert float(base["measured"]) == pytest.approx((72.25 + 73.0) / 2, abs=0.005)
    assert float(gain["measured"]) == pytest.approx(float(pmpl["measured"]) -
                                                     float(base["measured"]), abs=0.011)
    pub = gap.loc["gain of published over MobileNetV2 (points)"]
    assert pub["seeds"] == "seed 0" and float(pub["measured"]) == pytest.approx(1.0)


def test_summary_rows_name_their_seeds_and_the_published_parts(written):
    result, _ = written
    summary = report.summary_table(result).set_index("claim")
    row = summary.loc["Meta-Pooling (the searched model) beats MobileNetV2 under the same recipe"]
    assert row["seeds"] == "seeds 0, 1" and row["measured"].startswith("-49.75 points")
    assert row["verdict"] == "not resolved: 2 seeds, the rule needs 5"
    pub = summary.loc["The authors' published model (11 gates + their head) beats MobileNetV2, "
                      "same recipe"]
    assert pub["measured"].startswith("+1.00 points") and pub["seeds"] == "seed 0"
    assert "The searched model against the published one" in summary.index


def test_cost_line_gives_macs_and_latency_on_the_deployment_runtime():
    cost = pd.DataFrame([
        {"variant": "baseline", "macs_224": 300.0e6, "latency_vs_baseline_onnxruntime": 1.0,
         "latency_vs_baseline_eager": 1.0, "latency_threads": 1},
        {"variant": "pmpl", "macs_224": 301.2e6, "latency_vs_baseline_onnxruntime": 1.46,
         "latency_vs_baseline_eager": 2.0, "latency_threads": 1}])
    line = report.cost_line(cost, ["pmpl", "absent"])
    assert "ONNX Runtime" in line and "`pmpl` MACs +0.4%, latency +46%" in line
    assert "absent" not in line


def test_erf_extents_print_as_whole_pixels():
    view = report.erf_view([{"model": "baseline", "layer": "blocks.2",
                             "95% of the gradient within (px)": 43.0, "50% within (px)": 11.0}])
    assert view.iloc[0].tolist() == ["43", "11"]


def _genotype(layers: list[str], ops: list[str], reasons: list[str] | None = None) -> dict:
    reasons = reasons or ["margin"] * len(layers)
    return {"layers": [{"layer": name, "ops": op.split("+"), "probs": [], "reason": why,
                        "step": 3 + i if why == "margin" else 22, "epoch": 0}
                       for i, (name, op, why) in enumerate(zip(layers, ops, reasons,
                                                                strict=True))],
            "candidates": ["skip"], "split_ratio": 1.0}


def _write_run(root: Path, variant: str, seed: int, backbone: str, geno: dict) -> None:
    folder = root / "search" / variant / f"seed{seed}"
    (folder / "artifacts").mkdir(parents=True)
    (folder / "artifacts" / "genotype.json").write_text(json.dumps(geno))
    write_run_metrics(folder, backbone=backbone, top1=1.0, mode="pmpl", variant=variant, seed=seed)


def test_every_backbone_gets_a_genotype_table_with_its_own_layers(tmp_path):
    cands = ["skip", "max_pool_3x3", "avg_pool_5x5", "strip_pool", "max_pool_7x7"]
    runs = {}
    for variant, backbone in (("pmpl", "mobilenetv2_100"), ("resnet18-pmpl", "resnet18"),
                              ("mnv3-pmpl", "mobilenetv3_large_100")):
        layers = slot_names(backbone)
        ops = [cands[i % len(cands)] for i in range(len(layers))]
        ops[-1] = "skip+strip_pool"
        _write_run(tmp_path, variant, 0, backbone, _genotype(layers, ops))
        runs[backbone] = (variant, layers, ops)
    tables = report.genotype_tables(tmp_path)
    assert set(tables) == set(runs)
    for backbone, (variant, layers, ops) in runs.items():
        table = tables[backbone]
        assert list(table.index) == layers and list(table.columns) == [f"{variant}/seed0"]
        for layer, op in zip(layers, ops, strict=True):
            assert table.loc[layer, f"{variant}/seed0"].startswith(op + " ")  # every choice shown


def test_the_search_control_says_noise_when_it_looks_like_noise():
    layers = [f"blocks.{i}" for i in range(16)]
    cands = ["skip", "max_pool_3x3", "max_pool_5x5", "avg_pool_3x3"]
    rng = np.random.default_rng(0)

    def random_geno(freeze_by_margin: int) -> dict:
        ops = [cands[i] for i in rng.integers(0, len(cands), 16)]
        reasons = ["margin"] * freeze_by_margin + ["deadline"] * (16 - freeze_by_margin)
        return _genotype(layers, ops, reasons)

    noisy = {"pmpl/seed0": random_geno(11), "pmpl/seed1": random_geno(12),
             "pmpl-permuted/seed0": random_geno(10)}
    between = findings.shared_choices(noisy["pmpl/seed0"], noisy["pmpl/seed1"])
    expected, upper = findings.chance_agreement(noisy["pmpl/seed0"], noisy["pmpl/seed1"])
    assert between <= upper and 0 < expected < 16
    verdict = findings.search_control(noisy)
    assert verdict["alike"] is True
    assert "the search decides from noise at this scale" in verdict["text"]
    # two real searches that agree everywhere: the choices are reproducible, not noise
    same = dict(noisy, **{"pmpl/seed1": noisy["pmpl/seed0"]})
    verdict = findings.search_control(same)
    assert verdict["alike"] is False and "decides from noise" not in verdict["text"]
    # a control that freezes nothing by the margin: the labels matter
    quiet = dict(noisy, **{"pmpl-permuted/seed0": random_geno(0)})
    assert findings.search_control(quiet)["alike"] is False
    assert findings.search_control({"pmpl/seed0": noisy["pmpl/seed0"]})["alike"] is None


def test_geometry_of_mobilenetv2_at_48_and_224_px():
    small, big = (enhancer_map_sizes("mobilenetv2_100", s) for s in (48, 224))
    assert len(small) == len(big) == 16
    assert (small[0]["height"], big[0]["height"]) == (12, 56)  # blocks.1.0: stride 4
    assert (small[-1]["height"], big[-1]["height"]) == (2, 7)  # the last stage: stride 32
    assert findings.window_coverage(small) == {3: 11, 5: 11, 7: 14}
    assert findings.window_coverage(big) == {3: 0, 5: 0, 7: 4}
    doubled = enhancer_map_sizes("mobilenetv2_100", 48, stem_stride=1)
    assert [r["height"] for r in doubled[:2]] == [24, 24]
    table = findings.geometry_table({"48 px": small, "224 px": big})
    assert table.loc["blocks.6.0", "48 px"] == "2 x 2" and table.loc["blocks.1.0", "224 px"] == \
        "56 x 56"


def test_opening_paragraph_carries_the_numbers_of_the_run(written):
    result, _ = written
    layers = [f"blocks.{i}" for i in range(16)]
    genos = {"pmpl/seed0": _genotype(layers, ["skip"] * 16, ["margin"] * 9 + ["deadline"] * 7)}
    geometry = {"48 px": enhancer_map_sizes("mobilenetv2_100", 48)}
    text = findings.opening(result, genos, geometry, classes=10)
    assert "72.65% top-1 over 5 seeds (chance 10%)" in text
    assert "9 of 16 froze by the margin at 9 different steps" in text
    assert "at 48 px 11 of 16 enhancers see maps of 3x3 or less" in text
    assert "None of it predicts ImageNet" in text
    assert not math.isnan(result["variants"]["baseline"]["top1"]["mean"])
