"""``metapool report``: execute ``reports/report.ipynb`` with papermill and export it to HTML.

The notebook stays thin: it calls the loaders below, which read only pipeline outputs.

One formatting rule for every table (the views format numbers into strings, the Styler adds
none): accuracies and their differences in points to 2 decimals (a 400-image val set moves in
steps of 0.25, a mean over seeds needs the second), ratios to 2 decimals with an ``x``,
latency in ms to 1 decimal, parameters in millions to 2, MACs in millions to 1, and counts,
seeds and pixels as integers.
"""
from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path

import pandas as pd
import torch

from experiments.compare import (  # noqa: F401 (run_folder: the notebook's)
    PAPER_CLAIMS,
    finished_runs,
    run_folder,
    run_name,
)
from experiments.metrics import read_metrics

NOTEBOOK = Path(__file__).resolve().parents[1] / "reports" / "report.ipynb"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x) -> str:
    """An accuracy in percent, 2 decimals."""
    return "-" if _missing(x) else f"{x:.2f}"


def points(x) -> str:
    """A signed difference in points, 2 decimals."""
    return "-" if _missing(x) else f"{x:+.2f}"


def ratio(x) -> str:
    """A ratio, 2 decimals, with its x."""
    return "-" if _missing(x) else f"{x:.2f}x"


def recipe_notes(params_text: str, recipe: str) -> dict[str, str]:
    """The comments of ``params.yaml`` on each knob of ``recipes.<recipe>`` (the inline comment,
    after the comment lines just above it): the one record of what the authors' scripts said
    and ran ("as written" / "as ran", METHOD.md sections 4 and 4b)."""
    notes: dict[str, str] = {}
    inside, pending = False, []
    for line in params_text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not inside:
            inside = indent == 2 and stripped == f"{recipe}:"
            continue
        if not stripped:
            continue
        if indent <= 2 and not stripped.startswith("#"):
            break
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        key, _, rest = stripped.partition(":")
        inline = rest.partition(" #")[2].strip() if " #" in rest else ""
        notes[key] = " ".join([*pending, inline]).strip()
        pending = []
    return notes


def recipe_card(name: str, values: dict, notes: dict[str, str] | None = None,
                device_type: str | None = None) -> pd.DataFrame:
    """Every knob of the recipe that produced the runs, its value as written in params.yaml
    (5e-3 must not print as 0.01), the comment params.yaml gives it (for the authors' recipes:
    what their script said and whether it ran so), and, on a CPU run, what did nothing there."""
    cpu_only = {"amp": "no effect on the CPU: these runs computed in float32",
                "amp_dtype": "no effect on the CPU: these runs computed in float32"}
    rows = []
    for knob, value in values.items():
        shown = "none" if value in ("", None) and knob in ("randaugment", "head_drop_rate",
                                                            "lr_noise", "opt_eps") else str(value)
        note = (notes or {}).get(knob, "")
        if device_type == "cpu" and knob in cpu_only:
            note = "; ".join(filter(None, [note, cpu_only[knob]]))
        rows.append({"knob": knob, "value": shown, "note (params.yaml)": note or "-"})
    return pd.DataFrame(rows)


RUNTIME_NAMES = {"eager": "PyTorch eager", "inductor": "torch.compile (inductor)",
                 "onnxruntime": "ONNX Runtime", "executorch": "ExecuTorch (XNNPACK)"}


def cost_view(cost: pd.DataFrame) -> pd.DataFrame:
    """``cost.csv`` for a reader: parameters and MACs, deployed latency on every runtime that was
    measured (median ms and the ratio to the baseline on the same runtime, with the range of
    the interleaved rounds), training throughput and time, in words and the report's units."""
    rows = []
    runtimes = [rt for rt in RUNTIME_NAMES if f"latency_ms_{rt}" in cost]
    for _, r in cost.iterrows():
        row = {"variant": r["variant"], "parameters (M)": f"{r['params'] / 1e6:.2f}",
               "MACs at 224 px (M)": f"{r['macs_224'] / 1e6:.1f}"}
        for rt in runtimes:
            name = RUNTIME_NAMES[rt]
            ms, rel = r.get(f"latency_ms_{rt}"), r.get(f"latency_vs_baseline_{rt}")
            row[f"{name} (ms)"] = "-" if _missing(ms) else f"{ms:.1f}"
            row[f"{name} / baseline"] = "-" if _missing(rel) else (
                f"{rel:.2f}x [{r[f'latency_vs_baseline_{rt}_low']:.2f}-"
                f"{r[f'latency_vs_baseline_{rt}_high']:.2f}]")
        row["training images/s"] = f"{r['train_images_per_s']:.0f}"
        row["training time / baseline"] = ratio(r["train_time_vs_baseline"])
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def cost_caption(cost: pd.DataFrame, label: str) -> str:
    threads = cost["latency_threads"].dropna() if "latency_threads" in cost else pd.Series([])
    timed = (f"deployed latency batch 1 at 224 px, {int(threads.iloc[0])} thread(s), each model "
             "interleaved with its baseline on the same runtime, median of the rounds [their "
             "quartiles]" if len(threads) else "no latency measured (the cost stage did not run)")
    return (f"What each variant costs (parameters and MACs as trained, with this dataset's "
            f"classifier): {timed}; trained on {label}")


# what must agree between runs that are compared (the rest is listed, not judged)
CONFOUNDS = ("git_commit", "git_dirty", "lock_sha256", "device_type", "device_name")


def environment_table(runs_dir: str | Path, only: Collection[str] | None = None
                      ) -> pd.DataFrame:
    """One row per environment that produced runs (those named in ``only``, when given):
    commit, lock, versions, device, and which runs (variant/seed) it produced."""
    rows = []
    for folder in finished_runs(runs_dir, only):
        prov = read_metrics(folder).provenance
        run = run_name(folder)
        rows.append({k: prov.get(k) for k in ("git_commit", "git_dirty", "lock_sha256", "python",
                                               "torch", "cuda", "timm", "ffcv", "device_type",
                                               "device_name", "world_size")} | {"run": run})
    if not rows:
        return pd.DataFrame(columns=["runs"])
    df = pd.DataFrame(rows).astype(object).fillna("-").astype(str)
    keys = [c for c in df.columns if c != "run"]
    table = df.groupby(keys, sort=False, dropna=False)["run"].agg(lambda r: ", ".join(r)).reset_index()
    table["git_commit"] = table["git_commit"].str[:12]
    table["lock_sha256"] = table["lock_sha256"].str[:12]
    return table.rename(columns={"run": "runs"})


def environment_warning(table: pd.DataFrame) -> str | None:
    """A warning when the compared runs come from different commits, dirty trees, locked
    environments or devices (a baseline on one GPU type and PMPL on another is a confound)."""
    if table.empty:
        return None
    mixed = [k for k in CONFOUNDS if k in table and table[k].nunique() > 1]
    dirty = "git_dirty" in table and (table["git_dirty"] == "True").any()
    parts = []
    if mixed:
        parts.append("runs from different " + ", ".join(mixed) + ": their comparison mixes "
                     "environments")
    if dirty:
        parts.append("some runs came from a working tree with uncommitted changes")
    return "WARNING: " + "; ".join(parts) if parts else None


def curves(runs_dir: str | Path, metric: str = "top1", only: Collection[str] | None = None
           ) -> pd.DataFrame:
    """Per-epoch ``metric`` of every finished run (named in ``only``, when given): columns
    variant, seed, epoch, value."""
    frames = []
    for run in finished_runs(runs_dir, only):
        tsv = run / "live" / "plots" / "metrics" / f"{metric}.tsv"
        if not tsv.is_file():
            continue
        df = pd.read_csv(tsv, sep="\t")
        frames.append(pd.DataFrame({"variant": run.parent.name,
                                    "seed": int(run.name.removeprefix("seed")),
                                    "epoch": df["step"], "value": df[metric]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["variant", "seed", "epoch", "value"])


def pmpl_runs(runs_dir: str | Path, only: Collection[str] | None = None) -> list[Path]:
    """Finished run folders (named in ``only``, when given) that hold a PMPL genotype."""
    return [r for r in finished_runs(runs_dir, only)
            if (r / "artifacts" / "genotype.json").is_file()]


def alpha_history(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "artifacts" / "alpha_history.csv")


def freeze_events(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "artifacts" / "freeze_events.csv")


def genotype_tables(runs_dir: str | Path, only: Collection[str] | None = None
                    ) -> dict[str, pd.DataFrame]:
    """Chosen op(s) per layer of every PMPL run (named in ``only``, when given), one table per
    backbone: rows are that backbone's own layer names in network order, columns
    ``variant/seedK``, cells the op(s) and why (``margin@step``, ``deadline``)."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    order: dict[str, list[str]] = {}
    for run in pmpl_runs(runs_dir, only):
        backbone = read_metrics(run).backbone
        geno = json.loads((run / "artifacts" / "genotype.json").read_text())
        column = tables.setdefault(backbone, {}).setdefault(run_name(run), {})
        for layer in geno["layers"]:
            how = (f"margin@{layer['step']}" if layer["reason"] == "margin"
                   else layer["reason"].replace("_", " "))
            column[layer["layer"]] = f"{'+'.join(layer['ops'])} ({how})"
            if layer["layer"] not in order.setdefault(backbone, []):
                order[backbone].append(layer["layer"])
    return {bb: pd.DataFrame(cols).reindex(order[bb]).fillna("-").rename_axis("layer")
            for bb, cols in tables.items()}


def val_images(data_dir: str | Path, recipe: dict, count: int) -> torch.Tensor:
    """``count`` normalised validation images from the prepared dataset, as the runs' recipe
    (``recipe_values``: its img_size and interpolation) evaluates them (centre crops)."""
    from data_pipelines.loaders import eval_stream
    from data_pipelines.prepared import beton_path

    stream = eval_stream(str(beton_path(data_dir, "val")), img_size=recipe["img_size"],
                         interpolation=recipe["interpolation"], batch_size=count)
    images, _ = next(iter(stream))
    return images


def export_html(nb) -> str:
    """The executed notebook as a report for a reader: no code, no parameter cells, no
    stderr (library warnings); the notebook itself keeps all of it."""
    from nbconvert import HTMLExporter

    nb.cells = [c for c in nb.cells if not {"parameters", "injected-parameters"}
                & set(c.get("metadata", {}).get("tags", []))]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    return body


def render_report(params, results_dir: str | Path, out_dir: str | Path,
                  params_path: str | Path = "params.yaml") -> Path:
    """Execute the notebook on the pipeline outputs; write report.ipynb and report.html.
    ``params_path``: the params.yaml the runs came from (its comments annotate the recipe)."""
    import nbformat
    import papermill

    from metapool.io import atomic_path, atomic_write_text

    results = Path(results_dir)
    if not (results / "compare.json").is_file():
        raise FileNotFoundError(f"{results / 'compare.json'} not found: run `metapool compare` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "report.ipynb") as tmp:
        papermill.execute_notebook(
            str(NOTEBOOK), str(tmp), kernel_name="python3", progress_bar=False,
            cwd=str(Path.cwd()),
            parameters={"results_dir": str(results), "runs_dir": params.runs_dir,
                        "data_dir": params.data.out_dir, "params_path": str(params_path),
                        "img_size": params.active_recipe.img_size, "recipe_name": params.recipe,
                        "recipe_values": params.active_recipe.model_dump(mode="json")})
    atomic_write_text(out / "report.html", export_html(nbformat.read(out / "report.ipynb",
                                                                     as_version=4)))
    return out / "report.html"


# ------------------------------------------------------------------ tables for a reader
# One row per claim of the paper, and per part of its published model: (claim, what the paper
# says, variant A, variant B); the paper's numbers are compare.PAPER_CLAIMS
_GAIN = (f"+{PAPER_CLAIMS['gain']} points ({PAPER_CLAIMS['pmpl_top1']} vs "
         f"{PAPER_CLAIMS['baseline_top1']}")
CLAIMS = [
    ("Meta-Pooling (the searched model) beats MobileNetV2 under the same recipe",
     _GAIN + ")", "pmpl", "baseline"),
    ("The authors' published model (11 gates + their head) beats MobileNetV2, same recipe",
     _GAIN + ", under different recipes)", "published", "baseline"),
    ("Their head alone (1x1 conv 1280 -> 1280, h-swish, dropout 0.2)", "(not in the paper)",
     "published-head", "baseline"),
    ("Their 11 output gates alone", "(not in the paper)", "published-gates", "baseline"),
    ("What the gates add on top of the head", "(not in the paper)", "published",
     "published-head"),
    ("The searched model against the published one", "the paper reports one number for both",
     "pmpl", "published"),
    ("Where the gate sits: after the projection (published) vs the enhancer slot (attn-coord)",
     "(not in the paper)", "published-gates", "attn-coord"),
    ("The searched model with the authors' head", "(not in the paper)", "pmpl-head", "pmpl"),
    ("The enhancer's tail alone (BN + h-swish, no pooling)", "(not in the paper)",
     "fixed-skip", "baseline"),
    ("Max pooling on top of the tail", "pooling enlarges the receptive field",
     "fixed-max3", "fixed-skip"),
    ("The search against its permuted-label control", "(not in the paper)",
     "pmpl", "pmpl-permuted"),
    ("Pooling beats attention at similar cost (SE)", "PMPL above SE", "pmpl", "attn-se"),
    ("Pooling beats attention at similar cost (coordinate attention)", "PMPL above CA",
     "pmpl", "attn-coord"),
    ("Progressive stopping helps (vs searching to the end)", "progressive stop is better",
     "pmpl", "pmpl-no-stop"),
    ("One stage is as good as search-then-retrain", "one-stage matches two-stage",
     "pmpl", "two-stage"),
    ("Defect 1 of the reference code: its stop rule (always candidate #1)",
     "(not in the paper)", "pmpl-refcode", "pmpl"),
    ("Defect 2 of the reference code: alpha trained on the val set", "(not in the paper)",
     "pmpl-leak", "pmpl"),
]


def load_result(results_dir: str | Path) -> dict:
    return json.loads((Path(results_dir) / "compare.json").read_text())


def setting(result: dict) -> str:
    """The dataset and scale every number of the report was measured at."""
    ctx = result.get("context", {})
    dataset = ctx.get("dataset") or "unknown"
    if dataset != "imagenet":
        dataset += " (NOT ImageNet-1k)"
    return (f"{dataset}, {ctx.get('img_size')} px, {ctx.get('epochs')} epochs, "
            f"recipe {ctx.get('recipe')}")


def _interval(lo, hi, kind: str, signed: bool = True) -> str:
    """``kind [lo, hi]`` in points (2 decimals); ``signed`` (differences) shows the signs
    unless a range is all >= 0."""
    if _missing(lo) or _missing(hi):
        return "-"
    sign = "+" if signed and (kind != "range" or lo < 0) else ""
    return f"{kind} [{lo:{sign}.2f}, {hi:{sign}.2f}]"


def _comparison(result: dict, a: str, b: str) -> tuple[dict | None, int]:
    """The comparison of a against b (sign 1) or of b against a (sign -1)."""
    for c in result["comparisons"]:
        if (c["a"], c["b"]) == (a, b):
            return c, 1
        if (c["a"], c["b"]) == (b, a):
            return c, -1
    return None, 1


def verdict_words(c: dict, sign: int, min_seeds: int) -> str:
    """The decision rule's verdict of A against B, in words."""
    if c.get("identical_predictions"):
        return "identical: this ablation changed nothing at this scale"
    v = c["prob_improvement"]["verdict"]
    n = len(c["paired_seeds"])
    if v in ("better", "worse"):
        if sign < 0:
            v = {"better": "worse", "worse": "better"}[v]
        return f"{v} (all of the rule's conditions met at {n} seeds)"
    if n < min_seeds:
        return f"not resolved: {n} seed{'s' if n != 1 else ''}, the rule needs {min_seeds}"
    return f"not resolved at {n} seeds: no difference the rule can see"


def summary_table(result: dict) -> pd.DataFrame:
    """One row per claim of the paper (and part of its published model): what the suite
    measured, where, on which seeds, the interval (labelled with its kind) and the verdict in
    words."""
    from experiments.compare import seeds_text

    min_seeds = result["settings"]["min_seeds"]
    rows = []
    for variant, name in (("pmpl", "PMPL's top-1"), ("published", "the published model's top-1")):
        v = result["variants"].get(variant)
        if v:
            rows.append({"claim": name, "paper": f"{PAPER_CLAIMS['pmpl_top1']}% on ImageNet-1k",
                         "measured": f"{pct(v['top1']['mean'])}%",
                         "interval": _interval(*v["top1"]["ci"], v["interval_kind"],
                                               signed=False),
                         "seeds": seeds_text(v["seeds"]),
                         "verdict": "not comparable in absolute terms (another dataset and "
                                    "scale)" if result.get("context", {}).get("dataset")
                         != "imagenet" else "-"})
    for claim, paper, a, b in CLAIMS:
        c, sign = _comparison(result, a, b)
        if c is None:
            continue
        lo, hi = c["diff_ci"]
        if sign < 0 and not _missing(lo) and not _missing(hi):
            lo, hi = -hi, -lo
        rows.append({"claim": claim, "paper": paper,
                     "measured": f"{points(sign * c['diff_top1'])} points ({a} - {b})",
                     "interval": _interval(lo, hi, c["interval_kind"]),
                     "seeds": seeds_text(c["paired_seeds"]) if c["paired_seeds"] else "unpaired",
                     "verdict": verdict_words(c, sign, min_seeds)})
    return pd.DataFrame(rows)


# What the paper's two numbers stand on (METHOD.md sections 4 and 4b): model and recipe
PAPER_RECIPES = {
    "baseline": (str(PAPER_CLAIMS["baseline_top1"]),
                 "the Coordinate Attention paper's MobileNetV2 baseline: 200 epochs, cosine lr, "
                 "no label smoothing, RandAugment, erasing or mixup"),
    "published": (str(PAPER_CLAIMS["pmpl_top1"]),
                  "procedure B (recipe paper-final): 320 epochs, LAMB, label smoothing 0.1, "
                  "RandAugment m9, erasing 0.2, mixup 0.15, float16 AMP"),
    "pmpl": ("-", "the search code's recipe (paper): 250 epochs, LAMB, RandAugment m9, erasing "
                  f"0.2, no mixup; the paper's {PAPER_CLAIMS['pmpl_top1']} is very likely not this "
                  "model (METHOD.md 4b)"),
}


def paper_card(models: list[tuple[str, str, torch.nn.Module]]) -> pd.DataFrame:
    """What the paper compared, at 1000 classes and 224 px: (name, ``PAPER_RECIPES`` key, model
    built at 1000 classes) for MobileNetV2 (first: the reference of the ratios), the searched
    model and the published model, each with its parameters and MACs beside the number and the
    recipe each figure of the paper stands on."""
    from metapool.profile import profile_model

    rows = []
    base = None
    for name, key, model in models:
        prof = profile_model(model, name, 224)
        base = base or prof
        top1, recipe = PAPER_RECIPES.get(key, ("-", "-"))
        rows.append({"model": name, "parameters (M)": f"{prof.params / 1e6:.2f}",
                     "vs MobileNetV2": f"{100 * (prof.params / base.params - 1):+.0f}%",
                     "MACs at 224 px (M)": f"{prof.macs / 1e6:.1f}",
                     "MACs vs MobileNetV2": f"{100 * (prof.macs / base.macs - 1):+.1f}%",
                     "paper's top-1": top1, "trained by": recipe})
    return pd.DataFrame(rows).set_index("model")


def cost_line(cost: pd.DataFrame, variants: list[str]) -> str:
    """The summary's cost row: MACs and deployed latency against the baseline, on the runtime
    a deployment would use (ONNX Runtime when measured, else PyTorch eager)."""
    runtime = next((rt for rt in ("onnxruntime", "eager") if f"latency_vs_baseline_{rt}" in cost),
                   None)
    base = cost[cost["variant"] == "baseline"]
    if base.empty:
        return ""
    parts = []
    for v in variants:
        row = cost[cost["variant"] == v]
        if row.empty:
            continue
        r = row.iloc[0]
        text = f"`{v}` MACs {100 * (r['macs_224'] / base.iloc[0]['macs_224'] - 1):+.1f}%"
        if runtime and not _missing(r.get(f"latency_vs_baseline_{runtime}")):
            text += f", latency {100 * (r[f'latency_vs_baseline_{runtime}'] - 1):+.0f}%"
        parts.append(text)
    where = (f" on {RUNTIME_NAMES[runtime]} (batch 1, 224 px, "
             f"{int(cost['latency_threads'].dropna().iloc[0])} thread(s))") if runtime else ""
    return f"**Cost against the baseline{where}:** " + "; ".join(parts) + "."


def controls_table(result: dict) -> pd.DataFrame:
    """The decision rule on its controls: expected and observed verdicts."""
    rows = [{"control": f"{c['a']} vs {c['b']}",
             "kind": "negative (A/A)" if c["expected"] == "no difference" else "positive",
             "difference (points)": f"{c['diff_top1']:+.2f}",
             "P(A > B)": f"{c['p_a_better']:.2f}", "seeds": c["seeds"],
             "expected": c["expected"], "the rule said": c["verdict"],
             "as expected": "yes" if c["passed"] else "NO"} for c in result.get("controls", [])]
    return pd.DataFrame(rows)


def power_text(result: dict) -> str:
    """What the seeds allow, in words: wins needed, the chance to resolve the paper's gain,
    the seeds a paired t-test would need, and the val set's own binomial noise."""
    noise = result.get("noise", {})
    lines = []
    for n, p in sorted(result.get("power", {}).items(), key=lambda kv: int(kv[0])):
        k = p["wins_needed"]
        rule = (f"the rule resolves a comparison only with {k} wins out of {n}"
                if k is not None else "the rule resolves nothing, whatever the wins")
        if p.get("p_win") is not None and not pd.isna(p.get("p_win")):
            rule += (f"; a true gain of {p['effect']} points (the paper's) wins a seed with "
                     f"probability {p['p_win']:.2f} and is resolved with probability "
                     f"{p['p_resolved']:.2f}")
        lines.append(f"- At {n} paired seeds, {rule}.")
    if not pd.isna(noise.get("sd_diff", float("nan"))):
        p = next(iter(result["power"].values()))
        lines.append(f"- The seed-to-seed sd of a paired top-1 difference is "
                     f"{noise['sd_diff']:.2f} points ({noise['source']}): a paired t-test would "
                     f"need {p['seeds_for_t_test']} seeds for 80% power to detect "
                     f"{p['effect']} points at the 5% level.")
    if noise.get("val_images"):
        lines.append(f"- McNemar's test compares two *fixed* models image by image: it measures "
                     f"the noise of the {noise['val_images']}-image val set only (binomial sd "
                     f"of a top-1 here: {noise['val_sd_points']:.1f} points), not the "
                     "seed-to-seed variation a claim about the method must beat.")
    return "\n".join(lines)


def variants_view(result: dict) -> pd.DataFrame:
    """Top-1 and top-5 of every variant over its seeds (the numbers of variants.csv at the
    report's precision)."""
    from experiments.compare import seeds_text

    rows = []
    for v, s in result["variants"].items():
        rows.append({"variant": v, "seeds": seeds_text(s["seeds"]),
                     "top-1 (%)": pct(s["top1"]["mean"]),
                     "top-1 interval": _interval(*s["top1"]["ci"], s["interval_kind"],
                                                 signed=False),
                     "top-5 (%)": pct(s["top5"]["mean"])})
    return pd.DataFrame(rows).set_index("variant")


def comparisons_view(result: dict) -> pd.DataFrame:
    """Every comparison: difference, interval, P(A > B), McNemar (Holm), verdict."""
    min_seeds = result["settings"]["min_seeds"]
    rows = []
    for c in result["comparisons"]:
        n = len(c["paired_seeds"])
        pi = c["prob_improvement"]
        rows.append({
            "A vs B": f"{c['a']} vs {c['b']}", "seeds": n,
            "A - B (points)": points(c["diff_top1"]),
            "interval": _interval(*c["diff_ci"], c["interval_kind"]),
            "P(A > B)": f"{pi['p']:.2f}" if n >= min_seeds else f"{pi['p']:.2f} (no interval)",
            "McNemar p, Holm": "-" if c["mcnemar_pooled"].get("pvalue_holm") is None else
            f"{c['mcnemar_pooled']['pvalue_holm']:.2g}",
            "verdict": verdict_words(c, 1, min_seeds)})
    return pd.DataFrame(rows).set_index("A vs B")


def gap_view(result: dict) -> pd.DataFrame:
    """The paper's numbers beside this run's (compare.json's paper_gap): every figure of a
    model, its baseline and the gain from the same seeds, named in the table."""
    rows = [{"claim": r["claim"], "paper": f"{r['paper']:.1f}",
             "measured": points(r["measured"]) if "gain" in r["claim"] else pct(r["measured"]),
             "interval": _interval(*r["ci"], r["interval_kind"], signed="gain" in r["claim"]),
             "seeds": r["seeds"], "note": r["note"]} for r in result.get("paper_gap", [])]
    return pd.DataFrame(rows).set_index("claim") if rows else pd.DataFrame()


def erf_view(rows: list[dict]) -> pd.DataFrame:
    """Effective receptive field extents in whole pixels (they are odd square sides)."""
    df = pd.DataFrame(rows)
    for col in [c for c in df.columns if c.endswith("(px)")]:
        df[col] = df[col].map(lambda v: f"{int(v)}")
    return df.set_index(["model", "layer"])


def styled(df: pd.DataFrame, caption: str):
    """A table for the HTML: captioned, long text wrapped. Numbers come formatted by the views
    (the module's formatting rule): the Styler rounds nothing."""
    sty = df.style.set_caption(caption).format(na_rep="-")
    return sty.set_table_styles([
        {"selector": "caption", "props": "caption-side: top; text-align: left; "
                                         "font-weight: bold; padding: 4px 0;"},
        {"selector": "td, th", "props": "max-width: 28em; white-space: normal; "
                                        "text-align: left; padding: 2px 8px;"}])
