"""Statistics against known results; the ERF on a network with a known receptive field."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from scipy import stats
from torch import nn

import metapool  # noqa: F401
from experiments.compare import (
    CompareSettings,
    bootstrap_ci,
    compare_pair,
    cost_table,
    holm,
    mcnemar_exact,
    probability_of_improvement,
    summarize,
)
from metapool.receptive_field import effective_rf, erf_extent, support_side, theoretical_rf
from tests.helpers import write_run_metrics

FAST = CompareSettings(resamples=2000, min_seeds=5)


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # 10 images: A alone right on 1, B alone right on 6 -> exact two-sided p = 2 * P(X <= 1),
    # X ~ Binomial(7, 1/2) = 2 * (1 + 7) / 128 = 0.125
    labels = np.zeros(10, dtype=int)
    a_correct = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    b_correct = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    pred_a, pred_b = np.where(a_correct, 0, 1), np.where(b_correct, 0, 1)
    result = mcnemar_exact(labels, pred_a, pred_b)
    assert (result["a_only"], result["b_only"]) == (1, 6)
    assert result["pvalue"] == pytest.approx(0.125)


def test_holm_matches_a_worked_example():
    # p = (0.01, 0.04, 0.03): sorted 0.01*3=0.03, 0.03*2=0.06, max(0.06, 0.04*1)=0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    corrected = holm([0.2, math.nan])
    assert corrected[0] == pytest.approx(0.2) and math.isnan(corrected[1])


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(70, 1, 5), rng.normal(70, 1, 200)
    lo_s, hi_s = bootstrap_ci(small, cfg=FAST)
    lo_l, hi_l = bootstrap_ci(large, cfg=FAST)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < hi_s - lo_s
    assert all(math.isnan(v) for v in bootstrap_ci([1.0], cfg=FAST))


def test_decision_rule():
    a, b = np.arange(8, dtype=float) + 1, np.arange(8, dtype=float)
    assert probability_of_improvement(a, b, FAST)["verdict"] == "better"
    assert probability_of_improvement(b, a, FAST)["verdict"] == "worse"
    assert probability_of_improvement(a[:3], b[:3], FAST)["verdict"] == "not resolved at 3 seeds"
    mixed = probability_of_improvement(np.array([1, 0, 1, 0, 1, 0.0]), np.full(6, 0.5), FAST)
    assert mixed["p"] == 0.5 and mixed["verdict"] == "not resolved at 6 seeds"


def _runs(top1s, preds):
    return {s: {"top1": t, "top5": 100.0, "predictions": p}
            for s, (t, p) in enumerate(zip(top1s, preds, strict=True))}


def test_compare_pair_paired_test_and_pooled_mcnemar():
    labels = np.zeros(20, dtype=int)
    def preds(n_right):
        return np.stack([labels, np.where(np.arange(20) < n_right, 0, 1)], axis=1)
    a = _runs([60.0, 55.0, 70.0], [preds(12), preds(11), preds(14)])
    b = _runs([50.0, 50.0, 60.0], [preds(10), preds(10), preds(12)])
    out = compare_pair(a, b, FAST)
    assert out["test"] == "paired t"
    from scipy import stats
    assert out["test_pvalue"] == pytest.approx(stats.ttest_rel([60, 55, 70], [50, 50, 60]).pvalue)
    assert out["diff_top1"] == pytest.approx(25 / 3)
    assert out["mcnemar_pooled"]["a_only"] == 2 + 1 + 2 and out["mcnemar_pooled"]["b_only"] == 0
    assert out["mcnemar_pooled"]["pvalue"] == pytest.approx(2 * 0.5 ** 5)
    unpaired = compare_pair(a, {7: b[0], 8: b[1]}, FAST)
    assert unpaired["test"] == "welch t"
    summary = summarize(a, FAST)
    assert summary["n"] == 3 and summary["top1"]["mean"] == pytest.approx(185 / 3)


class ConvStack(nn.Module):
    """n 3x3 convs, stride 1, no padding tricks: receptive field 2n+1."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(n)])
        for conv in self.layers:
            nn.init.constant_(conv.weight, 1.0 / 9)

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_erf_support_equals_the_theoretical_receptive_field(n):
    net = ConvStack(n)
    erf = effective_rf(net, torch.randn(4, 1, 31, 31), "layers")
    assert support_side(erf) == (2 * n + 1, 2 * n + 1)
    assert erf_extent(erf, 1.0) == 2 * n + 1
    if n == 1:  # one box filter: a flat 3x3 field, the centre holding 1/9 of it
        assert erf_extent(erf, 0.5) == 3 and erf_extent(erf, 1 / 9) == 1
    else:  # a stack of boxes peaks in the middle: half the field sits well inside it
        assert erf_extent(erf, 0.5) < 2 * n + 1


def test_theoretical_rf_grows_with_pooling_enhancers():
    base = theoretical_rf(timm.create_model("mobilenetv2_100"), 224)
    pooled = theoretical_rf(timm.create_model("metapool_mobilenetv2_100", fixed_op="max_pool_7x7"), 224)
    strip = theoretical_rf(timm.create_model("metapool_mobilenetv2_100", fixed_op="strip_pool"), 224)
    assert [r["layer"] for r in base] == [r["layer"] for r in pooled]
    assert base[0]["rf"] == 3 and base[1]["rf"] == 3 + 2 * 2  # stem 3x3/2, then dw 3x3
    assert all(p["rf"] >= b["rf"] for p, b in zip(pooled, base, strict=True))
    assert pooled[2]["rf"] > base[2]["rf"]
    assert strip[2]["rf"] == 224  # a strip gate sees whole rows and columns


def test_cost_table_puts_latency_per_runtime_and_throughput_beside_macs():
    from experiments.report import cost_view

    def run(mode, seconds, backbone="mobilenetv2_100", genotype_from=None):
        return {"mode": mode, "backbone": backbone, "params": 3_504_872, "macs_224": 300_774_272,
                "train_seconds": seconds, "train_images_per_s": 880 * 4 / seconds,
                "genotype_from": genotype_from}

    runs = {"baseline": {0: run("baseline", 10.0), 1: run("baseline", 12.0)},
            "pmpl": {0: run("pmpl", 16.5), 1: run("pmpl", 16.5)},
            "two-stage": {0: run("retrain", 11.0, genotype_from="pmpl")},
            "resnet18-pmpl": {0: run("pmpl", 40.0, backbone="resnet18")}}

    def lat(run_, rt, ms, rel, lo, hi):
        return {"run": run_, "variant": run_.split("/")[0], "runtime": rt, "threads": "1",
                "latency_ms": str(ms), "vs_baseline": str(rel), "vs_baseline_low": str(lo),
                "vs_baseline_high": str(hi)}

    latency = [lat("baseline/seed0", "onnxruntime", 5.0, 1.0, 0.98, 1.02),
               lat("baseline/seed1", "onnxruntime", 5.0, 1.0, 0.98, 1.02),
               lat("pmpl/seed0", "onnxruntime", 7.5, 1.5, 1.4, 1.6),  # two genotypes
               lat("pmpl/seed1", "onnxruntime", 6.5, 1.3, 1.25, 1.45),
               lat("pmpl/seed0", "eager", 20.0, 2.0, 1.9, 2.1)]
    rows = {r["variant"]: r for r in cost_table(runs, latency=latency)}
    assert rows["pmpl"]["latency_vs_baseline_onnxruntime"] == pytest.approx(1.4)  # mean of 2
    assert rows["pmpl"]["latency_vs_baseline_onnxruntime_low"] == pytest.approx(1.25)
    assert rows["pmpl"]["latency_vs_baseline_onnxruntime_high"] == pytest.approx(1.6)
    assert rows["pmpl"]["latency_ms_eager"] == pytest.approx(20.0)
    assert rows["pmpl"]["train_time_vs_baseline"] == pytest.approx(1.5)
    # two-stage's time includes the search that found its genotype (pmpl seed 0)
    assert rows["two-stage"]["train_seconds"] == pytest.approx(11.0 + 16.5)
    assert math.isnan(rows["resnet18-pmpl"]["train_time_vs_baseline"])  # no resnet18 baseline
    assert "latency_ms_onnxruntime" not in rows["resnet18-pmpl"]
    view = cost_view(pd.DataFrame(list(rows.values())))
    assert view.loc["pmpl", "ONNX Runtime / baseline"] == "1.40x [1.25-1.60]"
    assert view.loc["pmpl", "ONNX Runtime (ms)"] == "7.0"
    assert view.loc["resnet18-pmpl", "ONNX Runtime / baseline"] == "-"
    assert view.loc["baseline", "parameters (M)"] == "3.50"
    assert view.loc["baseline", "MACs at 224 px (M)"] == "300.8"


def _seed_runs(values: dict[str, list[float]]) -> dict[str, dict[int, dict]]:
    return {v: {s: {"top1": x, "mode": "baseline", "backbone": "mobilenetv2_100"}
                for s, x in enumerate(xs)} for v, xs in values.items()}


CONTROLS = CompareSettings(resamples=500, min_seeds=5,
                           controls=[("baseline-aa", "baseline", "no difference"),
                                     ("baseline-short", "baseline", "worse")])


def test_controls_come_out_as_expected_on_seed_noise_and_a_real_effect():
    rng = np.random.default_rng(0)
    base = 70 + rng.normal(0, 1.5, 5)
    runs = _seed_runs({"baseline": list(base), "baseline-aa": list(70 + rng.normal(0, 1.5, 5)),
                  "baseline-short": list(base - 15 + rng.normal(0, 1.5, 5))})
    from experiments.compare import controls
    rows = {r["a"]: r for r in controls(runs, CONTROLS)}
    assert rows["baseline-aa"]["verdict"] == "no difference" and rows["baseline-aa"]["passed"]
    assert rows["baseline-short"]["verdict"] == "worse" and rows["baseline-short"]["passed"]


def test_a_control_that_misbehaves_is_flagged():
    # an "A/A" pair where A wins every seed (a leak, or a bug in seeding) must not pass
    runs = _seed_runs({"baseline": [70, 71, 72, 69, 70], "baseline-aa": [75, 76, 77, 74, 75],
                  "baseline-short": [70.5, 71.5, 72.5, 69.5, 70.5]})
    from experiments.compare import controls
    rows = {r["a"]: r for r in controls(runs, CONTROLS)}
    assert rows["baseline-aa"]["verdict"] == "better" and not rows["baseline-aa"]["passed"]
    assert rows["baseline-short"]["verdict"] == "better" and not rows["baseline-short"]["passed"]


def test_few_seeds_give_ranges_and_no_probability_interval():
    from experiments.compare import interval_kind, summarize, wins_needed
    cfg = CompareSettings(resamples=500, min_seeds=5)
    runs = _seed_runs({"a": [70.0, 72.0], "b": [69.0, 70.0]})
    s = summarize({k: {**v, "top5": 90.0} for k, v in runs["a"].items()}, cfg)
    assert s["interval_kind"] == "range" and s["top1"]["ci"] == [70.0, 72.0]
    c = compare_pair(runs["a"], runs["b"], cfg)
    assert c["interval_kind"] == "range" and c["diff_ci"] == [1.0, 2.0]
    assert all(math.isnan(v) for v in c["prob_improvement"]["ci"])
    assert c["prob_improvement"]["verdict"] == "not resolved at 2 seeds"
    assert interval_kind(5, cfg) == "95% bootstrap"
    assert wins_needed(5, cfg) == 5 and wins_needed(2, cfg) is None


def test_compare_pairs_the_shared_seeds():
    runs = _seed_runs({"a": [70.0, 71.0, 72.0], "b": [60.0, 61.0]})  # seed 2 of a has no partner
    c = compare_pair(runs["a"], runs["b"], CompareSettings(resamples=500))
    assert c["paired_seeds"] == [0, 1] and c["test"] == "paired t"
    assert c["diff_top1"] == pytest.approx(10.0)


def test_runs_left_from_an_earlier_configuration_stay_out(tmp_path):
    # `dvc exp run -S seeds=[0,1]` and back to [0]: runs/<variant>/seed1 is still on disk

    from experiments.compare import run_compare
    from experiments.config import Params
    from experiments.report import curves, environment_table

    for variant, seed, top1 in (("baseline", 0, 70.0), ("pmpl", 0, 60.0), ("pmpl", 1, 99.0)):
        run = tmp_path / "runs" / variant / f"seed{seed}"
        (run / "live" / "plots" / "metrics").mkdir(parents=True)
        write_run_metrics(run, top1=top1, top5=99.0, variant=variant, seed=seed,
                          mode="pmpl" if variant == "pmpl" else "baseline",
                          provenance={"git_commit": variant})
        (run / "live" / "plots" / "metrics" / "top1.tsv").write_text(f"step\ttop1\n0\t{top1}\n")
    params = Params(seeds=[0], control_seeds=[0, 1, 2, 3, 4],
                    variants={"baseline": {}, "pmpl": {"mode": "pmpl"}},
                    stages={"controls": ["baseline"], "search": ["pmpl"]},
                    compare={"controls": []})
    assert params.pipeline_runs() == {f"baseline/seed{k}" for k in range(5)} | {"pmpl/seed0"}
    result = run_compare(tmp_path / "runs", tmp_path / "results",
                         CompareSettings(resamples=200), only=params.pipeline_runs())
    assert result["runs"] == ["baseline/seed0", "pmpl/seed0"]
    assert result["ignored_runs"] == ["pmpl/seed1"]
    assert result["variants"]["pmpl"]["top1"]["mean"] == 60.0
    assert result["variants"]["pmpl"]["seeds"] == [0]
    assert set(curves(tmp_path / "runs", only=result["runs"])["seed"]) == {0}
    assert "pmpl/seed1" not in " ".join(environment_table(tmp_path / "runs",
                                                          only=result["runs"])["runs"])
    # with no stage groups every run counts, as before
    assert Params().pipeline_runs() is None


def test_power_figures_by_hand():
    from statsmodels.stats.power import TTestPower

    from experiments.compare import power, seeds_for_t_test

    cfg = CompareSettings(min_seeds=5)
    p = power(noise_sd=2.0, effect=2.3, n=5, cfg=cfg)
    assert p["wins_needed"] == 5  # 5 of 5: lower bound of the bootstrap interval above 0.5
    assert p["p_win"] == pytest.approx(stats.norm.cdf(2.3 / 2.0))
    assert p["p_resolved"] == pytest.approx(p["p_win"] ** 5)
    need = p["seeds_for_t_test"]
    analysis = TTestPower()
    assert analysis.power(effect_size=1.15, nobs=need, alpha=0.05) >= 0.8
    assert analysis.power(effect_size=1.15, nobs=need - 1, alpha=0.05) < 0.8
    # the noncentral t by hand agrees with statsmodels where statsmodels answers ...
    from experiments.compare import t_test_power

    for effect, n in ((1.15, need), (0.5, 20), (2.0, 3)):
        assert t_test_power(effect, n) == pytest.approx(
            analysis.power(effect_size=effect, nobs=n, alpha=0.05), abs=1e-6)
    # ... and answers where it gives up (NaN for a large effect at 2 seeds)
    assert seeds_for_t_test(20.0) == 2 and t_test_power(20.0, 2) >= 0.8
    assert math.isnan(power(0.0, 2.3, 5, cfg)["p_win"])  # no noise estimate, no power


def test_noise_comes_from_the_aa_control_and_the_val_set():
    from experiments.compare import noise

    cfg = CompareSettings(controls=[("baseline-aa", "baseline", "no difference")])
    base = [70.0, 72.0, 71.0, 69.0, 73.0]
    shift = [0.5, -0.25, 1.0, 0.0, -1.5]
    preds = np.zeros((400, 2), dtype=int)
    runs = {"baseline": {s: {"top1": v, "mode": "baseline", "backbone": "m",
                             "predictions": preds} for s, v in enumerate(base)},
            "baseline-aa": {s: {"top1": v + d, "mode": "baseline", "backbone": "m"}
                            for s, (v, d) in enumerate(zip(base, shift, strict=True))}}
    out = noise(runs, cfg)
    assert out["source"] == "baseline-aa - baseline, 5 seeds"
    assert out["sd_diff"] == pytest.approx(np.std(shift, ddof=1))
    p = np.mean(base) / 100
    assert out["val_images"] == 400
    assert out["val_sd_points"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 400))
