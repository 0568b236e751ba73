"""``metapool report``: execute ``reports/report.ipynb`` with papermill and export it to HTML.

The notebook stays thin: it calls the loaders below, which read only pipeline outputs.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import pandas as pd
import torch

from experiments.compare import finished_runs, run_name
from metapool.models import build_model

NOTEBOOK = Path(__file__).resolve().parents[1] / "reports" / "report.ipynb"


# The `paper` recipe against the authors' launch script (run_meta_rf.sh, METHOD.md section 4):
# knob -> (what the script said, whether the code ran it as written)
PAPER_SCRIPT = {
    "epochs": ("--epochs 250", True),
    "batch_size": ("4 GPUs x -b 64 = 256", True),
    "img_size": ("224 (timm's default for the model)", True),
    "momentum": ("unused by LAMB", True),
    "decay_rate": ("unused by cosine", True),
    "decay_epochs": ("unused by cosine", True),
    "mixup": ("no --mixup (off; also off during the search)", True),
    "cutmix": ("no --cutmix", True),
    "scale": ("timm's default 0.08-1.0", True),
    "seed_base": ("--seed 666", True),
    "opt": ("--opt lamb", True),
    "opt_eps": ("--opt-eps 1e-6", True),
    "lr": ("--lr 5e-3 (for batch 2048; 6.25e-4 at 256)", True),
    "lr_base_batch": ("linear scaling", True),
    "weight_decay": ("--weight-decay 0.1", True),
    "sched": ("--sched cosine", True),
    "sched_on_updates": ("timm of 2022: lr stepped per epoch", True),
    "warmup_epochs": ("--warmup-epochs 5", True),
    "warmup_lr": ("--warmup-lr 1e-6", True),
    "min_lr": ("--min-lr 1e-5", True),
    "lr_noise": ("--lr-noise 0.42 0.9", True),
    "label_smoothing": ("not set: timm's default 0.1", True),
    "randaugment": ("--aa rand-m9-mstd0.5", True),
    "interpolation": ("--train-interpolation bicubic", True),
    "reprob": ("--reprob 0.2 --remode pixel", True),
    "drop_rate": ("--drop 0.1", True),
    "drop_path_rate": ("--drop-path 0.08: ignored by the model builder", False),
    "ema_decay": ("no --model-ema", True),
    "amp": ("--amp: not applied in the meta trainer's step (float32)", False),
    "clip_grad": ("norm 5 in the meta trainer's step", True),
    "deadline_epoch": ("layers fixed at epoch 50 of 250", True),
    "alpha_lr": ("Adam 3e-4, betas (0.5, 0.999), wd 1e-3", True),
}


def recipe_card(name: str, values: dict) -> pd.DataFrame:
    """Every knob of the recipe that produced the runs; for ``paper`` also what the launch
    script said and whether the authors' code ran it as written."""
    rows = []
    for knob, value in values.items():
        row = {"knob": knob, "value": str(value)}  # as written: 5e-3 must not print as 0.01
        if name == "paper":
            script, ran = PAPER_SCRIPT.get(knob, ("-", None))
            row.update({"launch script": script,
                        "ran as written": {True: "yes", False: "no", None: "-"}[ran]})
        rows.append(row)
    return pd.DataFrame(rows)


# cost.csv's columns, as the report names them
COST_COLUMNS = {
    "variant": "variant",
    "params": "parameters (M)",
    "macs_224": "MACs at 224 px (M)",
    "cpu_latency_ms_224": "CPU latency, batch 1, 224 px (ms)",
    "latency_vs_baseline": "latency / baseline",
    "train_images_per_s": "training images/s",
    "train_time_vs_baseline": "training time / baseline",
}


def cost_view(cost: pd.DataFrame) -> pd.DataFrame:
    """``cost.csv`` for a reader: what each variant costs in parameters and MACs, and in time
    (deployed latency, training throughput), side by side, rounded, columns in words."""
    view = cost[list(COST_COLUMNS)].copy()
    view["params"] = (view["params"] / 1e6).round(3)
    view["macs_224"] = (view["macs_224"] / 1e6).round(1)
    view["cpu_latency_ms_224"] = view["cpu_latency_ms_224"].round(2)
    view["train_images_per_s"] = view["train_images_per_s"].round(0).astype(int)
    for col in ("latency_vs_baseline", "train_time_vs_baseline"):
        view[col] = view[col].map(lambda r: "-" if pd.isna(r) else f"{r:.2f}x")
    return view.rename(columns=COST_COLUMNS).set_index("variant")


# what must agree between runs that are compared (the rest is listed, not judged)
CONFOUNDS = ("git_commit", "git_dirty", "lock_sha256", "device_type", "device_name")


def environment_table(runs_dir: str | Path, only: Collection[str] | None = None
                      ) -> pd.DataFrame:
    """One row per environment that produced runs (those named in ``only``, when given):
    commit, lock, versions, device, and which runs (variant/seed) it produced."""
    rows = []
    for folder in finished_runs(runs_dir, only):
        prov = json.loads((folder / "metrics.json").read_text()).get("provenance") or {}
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


def genotype_table(runs_dir: str | Path, only: Collection[str] | None = None) -> pd.DataFrame:
    """Chosen op(s) per layer for every PMPL run (named in ``only``, when given): columns
    variant, seed, layer, position, ops."""
    rows = []
    for run in pmpl_runs(runs_dir, only):
        geno = json.loads((run / "artifacts" / "genotype.json").read_text())
        for i, layer in enumerate(geno["layers"]):
            rows.append({"variant": run.parent.name, "seed": int(run.name.removeprefix("seed")),
                         "layer": layer["layer"], "position": i, "ops": "+".join(layer["ops"]),
                         "reason": layer["reason"], "epoch": layer["epoch"]})
    return pd.DataFrame(rows)


def load_final_model(run: Path) -> torch.nn.Module:
    """The model a run ended with (the adapted, fixed model for PMPL), on the CPU, eval mode:
    rebuilt from the constructor arguments saved with its weights."""
    saved = torch.load(run / "artifacts" / "model_final.pt", map_location="cpu", weights_only=False)
    model = build_model(**saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def val_images(data_dir: str | Path, img_size: int, count: int) -> torch.Tensor:
    """``count`` normalised validation images (centre crops) from the prepared dataset."""
    from data_pipelines.loaders import LoaderConfig, ffcv_stream

    stream = ffcv_stream(str(Path(data_dir) / "val.beton"), False,
                         LoaderConfig(img_size=img_size, batch_size=count, workers=1))
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


def render_report(params, results_dir: str | Path, out_dir: str | Path) -> Path:
    """Execute the notebook on the pipeline outputs; write report.ipynb and report.html."""
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
                        "data_dir": params.data.out_dir,
                        "img_size": params.active_recipe.img_size, "recipe_name": params.recipe,
                        "recipe_values": params.active_recipe.model_dump(mode="json")})
    atomic_write_text(out / "report.html", export_html(nbformat.read(out / "report.ipynb",
                                                                     as_version=4)))
    return out / "report.html"


# ------------------------------------------------------------------ tables for a reader
# One row per claim of the paper: (claim, what the paper says, variant A, variant B)
CLAIMS = [
    ("Meta-Pooling beats MobileNetV2 under the same recipe", "+2.3 points (74.6 vs 72.3)",
     "pmpl", "baseline"),
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


def _interval(lo, hi, kind: str, digits: int = 1, signed: bool = True) -> str:
    """``kind [lo, hi]``; ``signed`` (differences) shows the signs unless a range is all >= 0."""
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return "-"
    sign = "+" if signed and (kind != "range" or lo < 0) else ""
    return f"{kind} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


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
    """One row per claim of the paper: what the suite measured, where, with how many seeds,
    the interval (labelled with its kind) and the verdict in words."""
    min_seeds = result["settings"]["min_seeds"]
    rows = []
    base = result["variants"].get("pmpl")
    if base:
        kind = base["interval_kind"]
        rows.append({"claim": "PMPL's top-1", "paper": "74.6% on ImageNet-1k",
                     "measured": f"{base['top1']['mean']:.1f}%",
                     "interval": _interval(*base["top1"]["ci"], kind, signed=False),
                     "seeds": base["n"],
                     "verdict": "not comparable in absolute terms (another dataset and scale)"
                     if result.get("context", {}).get("dataset") != "imagenet" else "-"})
    for claim, paper, a, b in CLAIMS:
        c, sign = _comparison(result, a, b)
        if c is None:
            continue
        lo, hi = c["diff_ci"]
        if sign < 0 and lo is not None and hi is not None:
            lo, hi = -hi, -lo
        rows.append({"claim": claim, "paper": paper,
                     "measured": f"{sign * c['diff_top1']:+.1f} points ({a} - {b})",
                     "interval": _interval(lo, hi, c["interval_kind"]),
                     "seeds": len(c["paired_seeds"]),
                     "verdict": verdict_words(c, sign, min_seeds)})
    return pd.DataFrame(rows)


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
    rows = []
    for v, s in result["variants"].items():
        rows.append({"variant": v, "seeds": s["n"], "top-1 (%)": round(s["top1"]["mean"], 1),
                     "top-1 interval": _interval(*s["top1"]["ci"], s["interval_kind"],
                                                 signed=False),
                     "top-5 (%)": round(s["top5"]["mean"], 1)})
    return pd.DataFrame(rows).set_index("variant")


def comparisons_view(result: dict) -> pd.DataFrame:
    min_seeds = result["settings"]["min_seeds"]
    rows = []
    for c in result["comparisons"]:
        n = len(c["paired_seeds"])
        pi = c["prob_improvement"]
        rows.append({
            "A vs B": f"{c['a']} vs {c['b']}", "seeds": n,
            "A - B (points)": f"{c['diff_top1']:+.2f}",
            "interval": _interval(*c["diff_ci"], c["interval_kind"], digits=2),
            "P(A > B)": f"{pi['p']:.2f}" if n >= min_seeds else f"{pi['p']:.2f} (no interval)",
            "McNemar p, Holm": "-" if c["mcnemar_pooled"].get("pvalue_holm") is None else
            f"{c['mcnemar_pooled']['pvalue_holm']:.2g}",
            "verdict": verdict_words(c, 1, min_seeds)})
    return pd.DataFrame(rows).set_index("A vs B")


def styled(df: pd.DataFrame, caption: str):
    """A table for the HTML: captioned, numbers rounded, long text wrapped, no index clutter."""
    sty = df.style.set_caption(caption).format(precision=2, na_rep="-")
    return sty.set_table_styles([
        {"selector": "caption", "props": "caption-side: top; text-align: left; "
                                         "font-weight: bold; padding: 4px 0;"},
        {"selector": "td, th", "props": "max-width: 28em; white-space: normal; "
                                        "text-align: left; padding: 2px 8px;"}])
