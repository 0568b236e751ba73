"""``metapool report``: execute ``reports/report.ipynb`` with papermill and export it to HTML.

The notebook stays thin: it calls the loaders below, which read only pipeline outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

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
        row = {"knob": knob, "value": value}
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


def environment_table(runs_dir: str | Path) -> pd.DataFrame:
    """One row per environment that produced runs: commit, lock, versions, device, and which
    runs (variant/seed) it produced."""
    rows = []
    for path in sorted(Path(runs_dir).glob("*/seed*/metrics.json")):
        prov = json.loads(path.read_text()).get("provenance") or {}
        run = f"{path.parents[1].name}/{path.parent.name}"
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


def curves(runs_dir: str | Path, metric: str = "top1") -> pd.DataFrame:
    """Per-epoch ``metric`` of every run: columns variant, seed, epoch, value."""
    frames = []
    for tsv in sorted(Path(runs_dir).glob(f"*/seed*/live/plots/metrics/{metric}.tsv")):
        df = pd.read_csv(tsv, sep="\t")
        run = tsv.parents[3]
        frames.append(pd.DataFrame({"variant": run.parent.name,
                                    "seed": int(run.name.removeprefix("seed")),
                                    "epoch": df["step"], "value": df[metric]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["variant", "seed", "epoch", "value"])


def pmpl_runs(runs_dir: str | Path) -> list[Path]:
    """Run folders that hold a PMPL genotype."""
    return sorted(p.parents[1] for p in Path(runs_dir).glob("*/seed*/artifacts/genotype.json"))


def alpha_history(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "artifacts" / "alpha_history.csv")


def freeze_events(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "artifacts" / "freeze_events.csv")


def genotype_table(runs_dir: str | Path) -> pd.DataFrame:
    """Chosen op(s) per layer for every PMPL run: columns variant, seed, layer, position, ops."""
    rows = []
    for run in pmpl_runs(runs_dir):
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


def render_report(params, results_dir: str | Path, out_dir: str | Path) -> Path:
    """Execute the notebook on the pipeline outputs; write report.ipynb and report.html."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

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
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(out / "report.ipynb", as_version=4))
    atomic_write_text(out / "report.html", body)
    return out / "report.html"
