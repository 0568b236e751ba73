"""What a run of the pipeline shows about itself: the search against its permuted-label control,
the feature-map geometry behind pooling's cost, and the opening paragraph of the report.

Pure functions over pipeline outputs (``results/compare.json``, the runs' genotypes and freeze
events); the report notebook displays them.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import pandas as pd

from experiments.compare import finished_runs, run_name

# the control of the search (METHOD.md section 2 tested against noise): same seed, same
# everything, but every query batch's labels permuted among its images
SEARCH, CONTROL = "pmpl", "pmpl-permuted"
# The search "decides from noise" when (1) the permuted search freezes about as many layers by
# the margin (within this many layers) and (2) two real searches (two seeds) share no more
# choices than two unrelated genotypes with the same op frequencies would (at most the 95th
# percentile of that chance agreement, a binomial over the layers).
ALIKE_MARGIN_FREEZES = 2


def genotypes(runs_dir: str | Path, only: Collection[str] | None = None) -> dict[str, dict]:
    """``variant/seedK`` -> its genotype.json, for every finished PMPL run."""
    out = {}
    for run in finished_runs(runs_dir, only):
        path = run / "artifacts" / "genotype.json"
        if path.is_file():
            out[run_name(run)] = json.loads(path.read_text())
    return out


def _choices(genotype: dict) -> dict[str, str]:
    return {layer["layer"]: "+".join(layer["ops"]) for layer in genotype["layers"]}


def shared_choices(a: dict, b: dict) -> int:
    """How many layers two genotypes fixed to the same op(s)."""
    ca, cb = _choices(a), _choices(b)
    return sum(ca[k] == cb.get(k) for k in ca)


def chance_agreement(a: dict, b: dict) -> tuple[float, int]:
    """The layers two genotypes would share if their choices were unrelated but kept their op
    frequencies (expected count), and the 95th percentile of that count (binomial)."""
    from collections import Counter

    from scipy import stats

    ca, cb = Counter(_choices(a).values()), Counter(_choices(b).values())
    n = len(a["layers"])
    p = sum(ca[op] * cb[op] for op in ca) / (n * n)
    return n * p, int(stats.binom.ppf(0.95, n, p))


def search_summary(genotype: dict) -> dict:
    """Layers, how many froze by the margin rule, and the steps at which they did."""
    margin = [layer for layer in genotype["layers"] if layer["reason"] == "margin"]
    steps = sorted(layer["step"] for layer in margin)
    return {"layers": len(genotype["layers"]), "froze_by_margin": len(margin),
            "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None,
            "distinct_steps": len(set(steps))}


def search_control(genos: dict[str, dict]) -> dict:
    """PMPL against its permuted-label control, seed by seed, and two seeds of PMPL against
    each other: the table rows and the verdict in words (``alike`` True: the search decides
    from noise at this scale; None: no control to judge by)."""
    rows = []
    for name in sorted(genos):
        variant, seed = name.split("/")
        if variant not in (SEARCH, CONTROL):
            continue
        s = search_summary(genos[name])
        partner = f"{SEARCH}/{seed}" if variant == CONTROL else f"{CONTROL}/{seed}"
        same = shared_choices(genos[name], genos[partner]) if partner in genos else None
        rows.append({"run": name, "layers": s["layers"],
                     "frozen by the margin": s["froze_by_margin"],
                     "first and last step": "-" if s["first_step"] is None else
                     f"{s['first_step']}-{s['last_step']}",
                     "distinct steps": s["distinct_steps"],
                     "same op(s) as the other label condition": "-" if same is None else str(same)})
    search_seeds = sorted(n for n in genos if n.split("/")[0] == SEARCH)
    pairs = [(f"{SEARCH}/{n.split('/')[1]}", n) for n in sorted(genos)
             if n.split("/")[0] == CONTROL and f"{SEARCH}/{n.split('/')[1]}" in genos]
    result = {"rows": rows, "search_seeds": search_seeds[:2], "pairs": len(pairs),
              "between_search_seeds": None, "chance": None, "alike": None, "text": ""}
    if not pairs:
        result["text"] = (f"No {CONTROL} run beside a {SEARCH} run of the same seed: the "
                          "search is not tested against noise here.")
        return result
    real, ctrl = pairs[0]
    sr, sc = search_summary(genos[real]), search_summary(genos[ctrl])
    n = sr["layers"]
    lines = [f"With true labels ({real}) {sr['froze_by_margin']} of {n} layers froze by the margin "
             f"(steps {sr['first_step']}-{sr['last_step']}); with the query labels permuted "
             f"({ctrl}) {sc['froze_by_margin']} of {n} did (steps "
             f"{sc['first_step']}-{sc['last_step']}), and the two chose the same op(s) in "
             f"{shared_choices(genos[real], genos[ctrl])} of {n} layers."]
    close = abs(sr["froze_by_margin"] - sc["froze_by_margin"]) <= ALIKE_MARGIN_FREEZES
    reproducible = None
    if len(search_seeds) >= 2:
        a, b = genos[search_seeds[0]], genos[search_seeds[1]]
        between = shared_choices(a, b)
        expected, upper = chance_agreement(a, b)
        result.update(between_search_seeds=between, chance=expected)
        reproducible = between > upper
        lines.append(f"Two seeds of {SEARCH} ({', '.join(search_seeds[:2])}) share {between} of "
                     f"their {n} choices; unrelated genotypes with the same op frequencies would "
                     f"share {expected:.1f} on average (95% of the time at most {upper}).")
    result["alike"] = close and reproducible is False
    if result["alike"]:
        lines.append("The permuted search freezes layers as readily as the real one, and two real "
                     "searches agree no more than chance: **the search decides from noise at "
                     "this scale**.")
    elif reproducible is None:
        result["alike"] = None
        lines.append(f"With one seed of {SEARCH} there is no agreement between searches to judge "
                     "the choices by.")
    else:
        lines.append("The rule for \"alike\" (margin freezes within "
                     f"{ALIKE_MARGIN_FREEZES} layers of the control's, and two real searches "
                     "agreeing no more than chance) does not hold: the labels do shape the "
                     "search here.")
    result["text"] = " ".join(lines)
    return result


def geometry_table(rows_by_setting: dict[str, list[dict]]) -> pd.DataFrame:
    """The map side every enhancer sees in each setting (``metapool.receptive_field.
    enhancer_map_sizes`` rows per setting name): one row per enhancer, one column per setting,
    as ``H x W`` (pixels of the enhancer's feature map)."""
    table: dict[str, dict[str, str]] = {}
    for setting, rows in rows_by_setting.items():
        for r in rows:
            table.setdefault(r["layer"], {"channels": str(r["channels"])})[setting] = \
                f"{r['height']} x {r['width']}"
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("enhancer")


def window_coverage(rows: list[dict], windows: tuple[int, ...] = (3, 5, 7)) -> dict[int, int]:
    """For each window size k: how many enhancers work on maps no larger than k x k, where a
    k x k window (padding k // 2) already covers the whole map from every position."""
    return {k: sum(max(r["height"], r["width"]) <= k for r in rows) for k in windows}


def coverage_line(name: str, rows: list[dict]) -> str:
    """One line: what a 3x3 / 5x5 / 7x7 window covers at ``name``'s map sizes."""
    cov = window_coverage(rows)
    sides = sorted({max(r["height"], r["width"]) for r in rows})
    return (f"{name}: maps of {sides[0]}-{sides[-1]} px; a 3x3 window already spans the whole "
            f"map in {cov[3]} of {len(rows)} enhancers, a 5x5 in {cov[5]}, a 7x7 in {cov[7]}.")


def _diff(result: dict, a: str, b: str) -> tuple[float, int] | None:
    for c in result["comparisons"]:
        if (c["a"], c["b"]) == (a, b):
            return c["diff_top1"], len(c["paired_seeds"])
        if (c["a"], c["b"]) == (b, a):
            return -c["diff_top1"], len(c["paired_seeds"])
    return None


def opening(result: dict, genos: dict[str, dict], geometry: dict[str, list[dict]],
            classes: int | None) -> str:
    """The report's first paragraph: what this run can and cannot show, with its numbers."""
    variants = result["variants"]
    parts = []
    base = variants.get("baseline")
    if base:
        chance = f" (chance {100 / classes:.0f}%)" if classes else ""
        parts.append(f"The baseline learns: {base['top1']['mean']:.2f}% top-1 over "
                     f"{base['n']} seeds{chance}.")
    controls = result.get("controls", [])
    if controls:
        passed = sum(c["passed"] for c in controls)
        parts.append(f"{passed} of {len(controls)} controls of the decision rule came out as "
                     "expected" + ("." if passed == len(controls) else
                                   ": read every verdict with suspicion."))
    search = next((genos[n] for n in sorted(genos) if n.split("/")[0] == SEARCH), None)
    if search:
        s = search_summary(search)
        parts.append(f"Layers freeze progressively: in {SEARCH} {s['froze_by_margin']} of "
                     f"{s['layers']} froze by the margin at {s['distinct_steps']} different "
                     f"steps, the rest at the deadline.")
    loss = _diff(result, "pmpl", "baseline")
    tail = _diff(result, "fixed-skip", "baseline")
    pool = _diff(result, "fixed-max3", "fixed-skip")
    if loss:
        text = (f"At this scale PMPL is {loss[0]:+.2f} points against the baseline "
                f"({loss[1]} paired seed{'s' if loss[1] != 1 else ''})")
        if tail and pool:
            text += (f"; its parts: the enhancer's tail alone (BN + h-swish on every hidden map, "
                     f"`fixed-skip`) is {tail[0]:+.2f} points against the baseline, and max "
                     f"pooling on top of it (`fixed-max3` against `fixed-skip`) {pool[0]:+.2f}")
        parts.append(text + ".")
    control = search_control(genos)
    if control["alike"] is not None:
        parts.append("The permuted-label control and two seeds of the search say that the search "
                     + ("decides from noise at this scale." if control["alike"] else
                        "does use the labels here."))
    if geometry:
        small = {name: window_coverage(rows)[3] for name, rows in geometry.items()}
        parts.append("Pooling works on tiny maps here: " + "; ".join(
            f"at {name} {n} of {len(geometry[name])} enhancers see maps of 3x3 or less"
            for name, n in small.items()) + ".")
    parts.append("None of it predicts ImageNet: another dataset, 48 px, a few epochs, one seed "
                 "per ablation.")
    return " ".join(parts)
