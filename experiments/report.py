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
                        "img_size": params.active_recipe.img_size})
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(out / "report.ipynb", as_version=4))
    atomic_write_text(out / "report.html", body)
    return out / "report.html"
