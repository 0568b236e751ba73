"""``metapool compare``: what the suite concludes, with intervals (METHOD.md section 6).

Pure functions over run outputs (``runs/<variant>/seed<k>/metrics.json`` and
``artifacts/predictions.csv``), then ``results/compare.json`` and CSV tables.

Decision rule (Bouthillier et al., MLSys 2021): pair runs of A and B by seed; P(A > B) is the
share of paired seeds A wins (ties count half) with a percentile-bootstrap interval; A is better
only when the interval's lower bound is above 0.5 and its upper bound above 0.75 (worse: the
mirror image). With fewer than ``min_seeds`` pairs no verdict is given ("not resolved at N
seeds"): with 4 pairs even 4 wins out of 4 has a one-sided sign-test p of 1/16.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection
from pathlib import Path

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from experiments.config import CompareSettings
from metapool.io import atomic_write_csv, atomic_write_text

PAPER_CLAIMS = {  # published numbers (ImageNet top-1, %), labelled as such wherever shown
    "pmpl_top1": 74.6,
    "baseline_top1": 72.3,
    "gain": 2.3,
}


def finished_runs(runs_dir: str | Path, only: Collection[str] | None = None) -> list[Path]:
    """The finished run folders ``.../<variant>/seed<k>`` under ``runs_dir`` (those with a
    ``metrics.json``; the pipeline keeps them in one folder per stage group), sorted by name
    ``variant/seedK`` and restricted to the names in ``only`` when given: runs left over from an
    earlier configuration (more seeds, a variant since removed) stay out of the comparison."""
    runs = sorted((p.parent for p in Path(runs_dir).rglob("seed*/metrics.json")), key=run_name)
    if only is None:
        return runs
    wanted = set(only)
    return [r for r in runs if run_name(r) in wanted]


def run_name(run: Path) -> str:
    """``variant/seedK`` of a run folder."""
    return f"{run.parent.name}/{run.name}"


def run_folder(runs_dir: str | Path, name: str) -> Path:
    """The folder of finished run ``variant/seedK`` under ``runs_dir``."""
    found = [r for r in finished_runs(runs_dir) if run_name(r) == name]
    if not found:
        raise FileNotFoundError(f"no finished run {name} under {runs_dir}: train it first")
    return found[0]


def load_runs(runs_dir: str | Path, only: Collection[str] | None = None
              ) -> dict[str, dict[int, dict]]:
    """variant -> seed -> metrics (with ``predictions`` as an int array [n, 2] when present)
    of ``finished_runs(runs_dir, only)``."""
    runs: dict[str, dict[int, dict]] = {}
    for metrics_path in (r / "metrics.json" for r in finished_runs(runs_dir, only)):
        metrics = json.loads(metrics_path.read_text())
        pred_path = metrics_path.parent / "artifacts" / "predictions.csv"
        if pred_path.is_file():
            with pred_path.open() as fh:
                rows = list(csv.DictReader(fh))
            metrics["predictions"] = np.array([[int(r["label"]), int(r["pred"])] for r in rows])
        seed = int(metrics_path.parent.name.removeprefix("seed"))
        runs.setdefault(metrics_path.parent.parent.name, {})[seed] = metrics
    return runs


def bootstrap_ci(values, statistic=np.mean, cfg: CompareSettings = CompareSettings()) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic``; NaNs when fewer than two values."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return (math.nan, math.nan)
    if np.all(values == values[0]):
        v = float(statistic(values))
        return (v, v)
    res = stats.bootstrap((values,), statistic, confidence_level=cfg.confidence,
                          n_resamples=cfg.resamples, method="percentile",
                          random_state=np.random.default_rng(cfg.seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def interval_kind(n: int, cfg: CompareSettings = CompareSettings()) -> str:
    """What an interval over ``n`` seeds is: a bootstrap interval from ``min_seeds`` seeds on,
    below that only the range of the values (a percentile bootstrap of 2 values is their
    [min, max], which covers the true mean about half the time)."""
    return f"{cfg.confidence:.0%} bootstrap" if n >= cfg.min_seeds else "range"


def interval(values, cfg: CompareSettings = CompareSettings()) -> list[float]:
    """The interval ``interval_kind`` names: bootstrap, or [min, max] below min_seeds."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:  # one value has no spread to show
        return [math.nan, math.nan]
    if len(values) < cfg.min_seeds:
        return [float(values.min()), float(values.max())]
    return list(bootstrap_ci(values, cfg=cfg))


def summarize(per_seed: dict[int, dict], cfg: CompareSettings = CompareSettings()) -> dict:
    """Mean, sd and interval (``interval_kind``) of top-1 and top-5 over seeds."""
    out = {"seeds": sorted(per_seed), "n": len(per_seed),
           "interval_kind": interval_kind(len(per_seed), cfg)}
    for key in ("top1", "top5"):
        vals = np.array([per_seed[s][key] for s in sorted(per_seed)], dtype=float)
        out[key] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1
                    else math.nan, "ci": interval(vals, cfg), "values": vals.tolist()}
    return out


def probability_of_improvement(a: np.ndarray, b: np.ndarray,
                               cfg: CompareSettings = CompareSettings()) -> dict:
    """P(A > B) over paired seeds, its bootstrap interval, and the verdict."""
    wins = (a > b).astype(float) + 0.5 * (a == b)
    p = float(wins.mean())
    n = len(wins)
    if n < cfg.min_seeds:  # no interval: with so few pairs it would only restate the wins
        return {"p": p, "ci": [math.nan, math.nan], "verdict": f"not resolved at {n} seeds"}
    lo, hi = bootstrap_ci(wins, cfg=cfg)
    if math.isnan(lo):
        verdict = f"not resolved at {n} seeds"
    elif lo > 0.5 and hi > 0.75:
        verdict = "better"
    elif hi < 0.5 and lo < 0.25:
        verdict = "worse"
    else:
        verdict = f"not resolved at {n} seeds"
    return {"p": p, "ci": [lo, hi], "verdict": verdict}


def mcnemar_exact(labels: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """Exact McNemar test on per-image correctness of A and B (same images, same order)."""
    ca, cb = pred_a == labels, pred_b == labels
    table = [[int(np.sum(ca & cb)), int(np.sum(ca & ~cb))],
             [int(np.sum(~ca & cb)), int(np.sum(~ca & ~cb))]]
    result = mcnemar(table, exact=True)
    return {"a_only": table[0][1], "b_only": table[1][0], "pvalue": float(result.pvalue)}


def compare_pair(a: dict[int, dict], b: dict[int, dict],
                 cfg: CompareSettings = CompareSettings()) -> dict:
    """A against B: difference of top-1 with interval, seed-level test, McNemar, P(A > B)."""
    paired = sorted(set(a) & set(b))  # seeds both ran: the others do not pair
    out: dict = {"paired_seeds": paired, "interval_kind": interval_kind(len(paired), cfg)}
    if paired:
        da = np.array([a[s]["top1"] for s in paired])
        db = np.array([b[s]["top1"] for s in paired])
        diff = da - db
        out["test"] = "paired t"
        out["test_pvalue"] = (float(stats.ttest_rel(da, db).pvalue)
                              if len(paired) > 1 and np.any(diff != diff[0]) else math.nan)
        out["prob_improvement"] = probability_of_improvement(da, db, cfg)
    else:
        da = np.array([a[s]["top1"] for s in sorted(a)])
        db = np.array([b[s]["top1"] for s in sorted(b)])
        diff = None
        out["test"] = "welch t"
        out["test_pvalue"] = (float(stats.ttest_ind(da, db, equal_var=False).pvalue)
                              if len(da) > 1 and len(db) > 1 else math.nan)
        out["prob_improvement"] = {"p": math.nan, "ci": [math.nan, math.nan],
                                   "verdict": "not resolved: seeds do not pair"}
    out["diff_top1"] = float(da.mean() - db.mean())
    out["diff_ci"] = interval(diff, cfg) if diff is not None else [math.nan, math.nan]
    out["identical_predictions"] = bool(paired) and all(
        a[s].get("predictions") is not None and b[s].get("predictions") is not None
        and np.array_equal(a[s]["predictions"], b[s]["predictions"]) for s in paired)
    per_seed, pooled = [], {"a_only": 0, "b_only": 0}
    for s in paired:
        pa, pb = a[s].get("predictions"), b[s].get("predictions")
        if pa is None or pb is None or len(pa) != len(pb) or not np.array_equal(pa[:, 0], pb[:, 0]):
            continue
        m = mcnemar_exact(pa[:, 0], pa[:, 1], pb[:, 1])
        per_seed.append({"seed": s, **m})
        pooled["a_only"] += m["a_only"]
        pooled["b_only"] += m["b_only"]
    out["mcnemar_per_seed"] = per_seed
    if per_seed:
        n = pooled["a_only"] + pooled["b_only"]
        pooled["pvalue"] = float(stats.binomtest(pooled["a_only"], n, 0.5).pvalue) if n else 1.0
    else:
        pooled["pvalue"] = math.nan
    out["mcnemar_pooled"] = pooled  # exact McNemar on discordant pairs summed over seeds
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm-corrected p-values (NaNs stay NaN)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    out = [math.nan] * len(pvalues)
    if idx:
        corrected = multipletests([pvalues[i] for i in idx], method="holm")[1]
        for i, p in zip(idx, corrected, strict=True):
            out[i] = float(p)
    return out


def reference_baselines(runs: dict[str, dict[int, dict]],
                        controls: tuple[str, ...] = ()) -> dict[tuple[str, str], str]:
    """(backbone, recipe) -> the baseline every variant of that backbone is measured against.
    The controls (the "a" side of ``compare.controls``) are baseline-mode runs too, but never
    the reference."""
    baselines = {}
    for v, seeds in sorted(runs.items(), reverse=True):  # "baseline" before "baseline-x"
        m = next(iter(seeds.values()))
        if is_plain_baseline(m) and v not in controls:
            baselines[(m["backbone"], m.get("recipe"))] = v
    return baselines


def is_plain_baseline(metrics: dict) -> bool:
    """A run of the plain backbone: baseline mode without the published model's gates or head
    (those are variants measured against it)."""
    return (metrics["mode"] == "baseline" and metrics.get("head", "plain") == "plain"
            and not metrics.get("output_gates", False))


def default_pairs(runs: dict[str, dict[int, dict]], extra: list[list[str]],
                  controls: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Every variant against the baseline of its backbone (same recipe), plus ``extra`` pairs.
    The controls are not compared here: ``controls()`` judges them."""
    baselines = reference_baselines(runs, controls)
    pairs = []
    for v, seeds in sorted(runs.items()):
        m = next(iter(seeds.values()))
        base = baselines.get((m["backbone"], m.get("recipe")))
        if not is_plain_baseline(m) and base and v not in controls:
            pairs.append((v, base))
    pairs += [(a, b) for a, b in extra if a in runs and b in runs and (a, b) not in pairs]
    return pairs


def wins_needed(n: int, cfg: CompareSettings = CompareSettings()) -> int | None:
    """The fewest wins out of ``n`` paired seeds with which the rule says "better" (None: no
    count resolves at ``n`` seeds)."""
    for k in range(n + 1):
        wins = np.array([1.0] * k + [0.0] * (n - k))
        if probability_of_improvement(wins, np.full(n, 0.5), cfg)["verdict"] == "better":
            return k
    return None


def power(noise_sd: float, effect: float, n: int, cfg: CompareSettings = CompareSettings()) -> dict:
    """What the rule can detect, given the seed-to-seed sd of a paired difference: the chance
    that a true ``effect`` (points) is resolved at ``n`` seeds, and the seeds a paired t-test
    needs for 80% power at 5% (two-sided)."""
    out = {"noise_sd": noise_sd, "effect": effect, "seeds": n, "wins_needed": wins_needed(n, cfg)}
    if not noise_sd > 0 or not math.isfinite(noise_sd):
        return {**out, "p_win": math.nan, "p_resolved": math.nan, "seeds_for_t_test": math.nan}
    p_win = float(stats.norm.cdf(effect / noise_sd))
    k = out["wins_needed"]
    out["p_win"] = p_win
    out["p_resolved"] = float(stats.binom.sf(k - 1, n, p_win)) if k is not None else 0.0
    out["seeds_for_t_test"] = seeds_for_t_test(effect / noise_sd)
    return out


def t_test_power(effect_size: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t-test on ``n`` pairs at a standardised effect (the
    noncentral t; statsmodels' TTestPower returns NaN for large effects at small n)."""
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect_size * math.sqrt(n)
    value = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if math.isfinite(value):
        return value
    # scipy's noncentral t fails far in its tail: T = (Z + nc) / sqrt(V / df), V ~ chi2(df),
    # so the power is E_V[Phi(nc - c s) + Phi(-c s - nc)] with s = sqrt(V / df)
    from scipy.integrate import quad

    def integrand(v: float) -> float:
        s = math.sqrt(v / df)
        return (stats.norm.cdf(nc - crit * s) + stats.norm.cdf(-crit * s - nc)) * \
            stats.chi2.pdf(v, df)

    return float(quad(integrand, 0, math.inf, limit=200)[0])


def seeds_for_t_test(effect_size: float, power: float = 0.8, alpha: float = 0.05,
                     most: int = 100_000) -> int | float:
    """The fewest paired seeds (at least 2) with which a two-sided paired t-test at ``alpha``
    detects a standardised effect with probability ``power`` (NaN beyond ``most``)."""
    def enough(n: int) -> bool:
        return t_test_power(effect_size, n, alpha) >= power

    lo, hi = 2, 2  # power grows with n: double until enough, then bisect for the smallest
    while not enough(hi):
        if hi >= most:
            return math.nan
        lo, hi = hi + 1, min(2 * hi, most)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return lo


def controls(runs: dict[str, dict[int, dict]], cfg: CompareSettings) -> list[dict]:
    """The decision rule on the configured controls: what it said, what it should say."""
    rows = []
    for a, b, expected in cfg.controls:
        if a not in runs or b not in runs:
            continue
        c = compare_pair(runs[a], runs[b], cfg)
        verdict = c["prob_improvement"]["verdict"]
        said = verdict if verdict in ("better", "worse") else (
            "no difference" if len(c["paired_seeds"]) >= cfg.min_seeds else verdict)
        rows.append({"a": a, "b": b, "expected": expected, "verdict": said,
                     "passed": said == expected, "seeds": len(c["paired_seeds"]),
                     "diff_top1": c["diff_top1"], "diff_ci": c["diff_ci"],
                     "p_a_better": c["prob_improvement"]["p"]})
    return rows


def noise(runs: dict[str, dict[int, dict]], cfg: CompareSettings) -> dict:
    """Seed-to-seed noise of a paired top-1 difference (from the A/A control when there is
    one, else sqrt(2) x the baseline's sd) and the binomial noise of the val set's size."""
    out: dict = {"source": None, "sd_diff": math.nan, "val_images": None, "val_sd_points": math.nan}
    aa = [(a, b) for a, b, e in cfg.controls if e == "no difference" and a in runs and b in runs]
    if aa:
        a, b = aa[0]
        paired = sorted(set(runs[a]) & set(runs[b]))
        diff = [runs[a][s]["top1"] - runs[b][s]["top1"] for s in paired]
        if len(diff) > 1:
            out.update(source=f"{a} - {b}, {len(diff)} seeds", sd_diff=float(np.std(diff, ddof=1)))
    baselines = [v for v, seeds in runs.items()
                 if is_plain_baseline(next(iter(seeds.values()))) and len(seeds) > 1]
    if out["source"] is None and baselines:
        v = max(baselines, key=lambda name: len(runs[name]))
        vals = [m["top1"] for m in runs[v].values()]
        out.update(source=f"sqrt(2) x sd of {v}, {len(vals)} seeds",
                   sd_diff=float(np.sqrt(2) * np.std(vals, ddof=1)))
    base = next((seeds for v, seeds in runs.items() if v == "baseline"), None)
    if base:
        m = next(iter(base.values()))
        preds = m.get("predictions")
        n = len(preds) if preds is not None else None
        if n:
            p = np.mean([r["top1"] for r in base.values()]) / 100
            out.update(val_images=n, val_sd_points=float(100 * math.sqrt(p * (1 - p) / n)))
    return out


def compare_all(runs: dict[str, dict[int, dict]], extra_pairs: list[list[str]],
                cfg: CompareSettings = CompareSettings(),
                latency: list[dict] | None = None) -> dict:
    variants = {v: summarize(seeds, cfg) for v, seeds in runs.items()}
    control_runs = tuple(a for a, _, _ in cfg.controls)
    comparisons = []
    for a, b in default_pairs(runs, extra_pairs, control_runs):
        comparisons.append({"a": a, "b": b, **compare_pair(runs[a], runs[b], cfg)})
    for c, p in zip(comparisons, holm([c["test_pvalue"] for c in comparisons]), strict=True):
        c["test_pvalue_holm"] = p
    for c, p in zip(comparisons, holm([c["mcnemar_pooled"]["pvalue"] for c in comparisons]),
                    strict=True):
        c["mcnemar_pooled"]["pvalue_holm"] = p
    seed_noise = noise(runs, cfg)
    n_ablation = max((len(c["paired_seeds"]) for c in comparisons), default=0)
    return {"variants": variants, "comparisons": comparisons,
            "paper_gap": paper_gap(runs, variants, cfg),
            "cost": cost_table(runs, control_runs, latency),
            "controls": controls(runs, cfg), "noise": seed_noise,
            "power": {str(n): power(seed_noise["sd_diff"], PAPER_CLAIMS["gain"], n, cfg)
                      for n in sorted({n_ablation, cfg.min_seeds} - {0})},
            "context": _context(runs),
            "settings": cfg.model_dump(exclude={"extra_pairs", "out_dir", "controls"})}


def _context(runs: dict[str, dict[int, dict]]) -> dict:
    seeds = runs.get("baseline") or next(iter(runs.values()))
    any_run = next(iter(seeds.values()))
    return {k: any_run.get(k) for k in ("dataset", "recipe", "img_size", "epochs")}


def seeds_text(seeds: list[int]) -> str:
    """``seed 0`` / ``seeds 0, 1, 2``."""
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


# (claim, variant, paper's figure, baseline the variant's gain is taken against)
GAP_CLAIMS = [
    ("MobileNetV2 + Meta-Pooling (the searched model), top-1", "pmpl", "pmpl_top1"),
    ("the authors' published mp_mobilenet_v2, top-1", "published", "pmpl_top1"),
]


def paper_gap(runs: dict[str, dict[int, dict]], variants: dict,
              cfg: CompareSettings = CompareSettings()) -> list[dict]:
    """The paper's claims next to what this run measured, labelled with the setting. Each
    model's top-1, the baseline's and the gain beside them come from the same paired seeds
    (``seeds``): the gain is exactly the difference of the two figures shown."""
    ctx = _context(runs)
    label = (f"dataset={ctx['dataset']}, recipe={ctx['recipe']}, {ctx['img_size']}px, "
             f"{ctx['epochs']} epochs")
    rows = []
    base = reference_baselines(runs).get(("mobilenetv2_100", ctx.get("recipe")))
    for claim, variant, paper in GAP_CLAIMS:
        if variant not in runs or base is None:
            continue
        paired = sorted(set(runs[variant]) & set(runs[base]))
        if not paired:
            continue
        a = np.array([runs[variant][s]["top1"] for s in paired])
        b = np.array([runs[base][s]["top1"] for s in paired])
        c = compare_pair({s: runs[variant][s] for s in paired}, {s: runs[base][s] for s in paired},
                         cfg)
        seeds, kind = seeds_text(paired), interval_kind(len(paired), cfg)
        rows += [{"claim": claim, "paper": PAPER_CLAIMS[paper], "measured": float(a.mean()),
                  "ci": interval(a, cfg), "interval_kind": kind, "seeds": seeds,
                  "setting": label},
                 {"claim": f"MobileNetV2 baseline, top-1 (the seeds of {variant})",
                  "paper": PAPER_CLAIMS["baseline_top1"], "measured": float(b.mean()),
                  "ci": interval(b, cfg), "interval_kind": kind, "seeds": seeds,
                  "setting": label},
                 {"claim": f"gain of {variant} over MobileNetV2 (points)",
                  "paper": PAPER_CLAIMS["gain"], "measured": float(a.mean() - b.mean()),
                  "ci": c["diff_ci"], "interval_kind": kind, "seeds": seeds,
                  "setting": label}]
    for r in rows:
        r["note"] = ("paper: ImageNet-1k, 224px, its own recipe; measured: " + label +
                     ("" if ctx["dataset"] == "imagenet" else " - NOT comparable in absolute terms"))
    return rows


def cost_table(runs: dict[str, dict[int, dict]], controls: tuple[str, ...] = (),
               latency: list[dict] | None = None) -> list[dict]:
    """Params, MACs, training time and throughput per variant (means over seeds), training time
    relative to the reference baseline of the same backbone and recipe (``reference_baselines``;
    a two-stage run's time includes the search that found its genotype), and deployed latency
    per runtime from ``metapool cost``'s rows (``latency``: results/latency.csv): the
    architecture's median ms and its ratio to the baseline on the same runtime, measured
    interleaved, with the rounds' range (a variant whose seeds have different architectures:
    the mean over them, the range over all their rounds)."""
    rows = {}
    for v, seeds in runs.items():
        ms = list(seeds.values())
        seconds = []
        for seed, m in seeds.items():
            source = runs.get(m.get("genotype_from") or "", {}).get(seed)
            seconds.append(m["train_seconds"] + (source["train_seconds"] if source else 0.0))
        rows[v] = {"variant": v, "mode": ms[0]["mode"], "backbone": ms[0]["backbone"],
                   "seeds": len(ms),
                   "params": int(np.mean([m["params"] for m in ms])),
                   "macs_224": int(np.mean([m["macs_224"] for m in ms])),
                   "train_seconds": float(np.mean(seconds)),
                   "train_images_per_s": float(np.mean([m["train_images_per_s"] for m in ms]))}
    baselines = reference_baselines(runs, controls)
    for v, row in rows.items():
        m = next(iter(runs[v].values()))
        base = rows.get(baselines.get((m["backbone"], m.get("recipe")), ""))
        row["train_time_vs_baseline"] = (row["train_seconds"] / base["train_seconds"]
                                         if base else math.nan)
    for lat in latency or []:
        row = rows.get(lat["variant"])
        if row is None:
            continue
        rt = lat["runtime"]
        row.setdefault(f"_{rt}", []).append(lat)
    for row in rows.values():
        for key in [k for k in row if k.startswith("_")]:
            rt, lats = key[1:], row.pop(key)
            row[f"latency_ms_{rt}"] = float(np.mean([float(x["latency_ms"]) for x in lats]))
            row[f"latency_vs_baseline_{rt}"] = float(np.mean([float(x["vs_baseline"])
                                                              for x in lats]))
            row[f"latency_vs_baseline_{rt}_low"] = min(float(x["vs_baseline_low"]) for x in lats)
            row[f"latency_vs_baseline_{rt}_high"] = max(float(x["vs_baseline_high"])
                                                        for x in lats)
            row["latency_threads"] = int(lats[0]["threads"])
    return list(rows.values())


def _flat_comparisons(result: dict) -> list[dict]:
    rows = []
    for c in result["comparisons"]:
        rows.append({"a": c["a"], "b": c["b"], "paired_seeds": len(c["paired_seeds"]),
                     "diff_top1": c["diff_top1"], "diff_ci_low": c["diff_ci"][0],
                     "diff_ci_high": c["diff_ci"][1], "interval": c["interval_kind"],
                     "identical_predictions": c["identical_predictions"], "test": c["test"],
                     "test_pvalue": c["test_pvalue"], "test_pvalue_holm": c["test_pvalue_holm"],
                     "mcnemar_a_only": c["mcnemar_pooled"]["a_only"],
                     "mcnemar_b_only": c["mcnemar_pooled"]["b_only"],
                     "mcnemar_pvalue": c["mcnemar_pooled"]["pvalue"],
                     "mcnemar_pvalue_holm": c["mcnemar_pooled"].get("pvalue_holm"),
                     "p_a_better": c["prob_improvement"]["p"],
                     "p_ci_low": c["prob_improvement"]["ci"][0],
                     "p_ci_high": c["prob_improvement"]["ci"][1],
                     "verdict": c["prob_improvement"]["verdict"]})
    return rows


def _flat_variants(result: dict) -> list[dict]:
    return [{"variant": v, "seeds": s["n"], "interval": s["interval_kind"],
             "top1_mean": s["top1"]["mean"], "top1_sd": s["top1"]["sd"],
             "top1_ci_low": s["top1"]["ci"][0], "top1_ci_high": s["top1"]["ci"][1],
             "top5_mean": s["top5"]["mean"], "top5_ci_low": s["top5"]["ci"][0],
             "top5_ci_high": s["top5"]["ci"][1]} for v, s in result["variants"].items()]


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(result: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(_json_safe(result), indent=2) + "\n")
    atomic_write_csv(out / "variants.csv", _flat_variants(result))
    atomic_write_csv(out / "comparisons.csv", _flat_comparisons(result))
    atomic_write_csv(out / "paper_gap.csv", [{**r, "ci": json.dumps(r["ci"])} for r in result["paper_gap"]])
    columns = list(dict.fromkeys(k for row in result["cost"] for k in row))
    atomic_write_csv(out / "cost.csv", result["cost"], columns)


def run_compare(runs_dir: str | Path, out_dir: str | Path, cfg: CompareSettings,
                only: Collection[str] | None = None, latency_csv: str | Path | None = None
                ) -> dict:
    """Compare the finished runs under ``runs_dir`` (those named in ``only``, when given: the
    pipeline's, ``Params.pipeline_runs``); write ``compare.json`` and the CSVs. ``compare.json``
    lists the runs used and those left out. ``latency_csv``: ``metapool cost``'s table (absent:
    no latency columns)."""
    runs = load_runs(runs_dir, only)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {runs_dir}: run the training stages first")
    latency = None
    if latency_csv is not None and Path(latency_csv).is_file():
        with Path(latency_csv).open() as fh:
            latency = list(csv.DictReader(fh))
    result = compare_all(runs, [list(p) for p in cfg.extra_pairs], cfg, latency)
    found = [run_name(r) for r in finished_runs(runs_dir)]
    wanted = set(found if only is None else only)
    result["runs"] = [r for r in found if r in wanted]
    result["ignored_runs"] = [r for r in found if r not in wanted]
    write_results(result, out_dir)
    return result
