"""``metapool cost``: what each trained architecture costs where it would be deployed.

Every distinct architecture among the pipeline's finished runs (the baseline's five seeds are
one architecture; two PMPL seeds with different genotypes are two) is loaded from its
``model_final.pt``, made ``metapool.deploy.deployable`` and timed batch-1 at ``cost.img_size``
on every runtime of ``cost.runtimes``, interleaved with the plain baseline of its backbone on
the same runtime (``metapool.deploy.measure_latency``). Writes ``results/latency.csv``: one row
per (run, runtime) with the architecture's median latency, its ratio to the baseline and the
spread of that ratio over the rounds, and the threads used.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import torch

from experiments.compare import finished_runs, is_plain_baseline, run_name
from experiments.config import CostSettings
from experiments.metrics import RunMetrics, read_metrics
from metapool.io import atomic_write_csv


def load_final_model(run: Path) -> torch.nn.Module:
    """The model a run ended with (the adapted, fixed model for PMPL), on the CPU, eval mode:
    rebuilt from the constructor arguments saved with its weights."""
    from metapool.models import build_model

    saved = torch.load(run / "artifacts" / "model_final.pt", map_location="cpu",
                       weights_only=False)
    model = build_model(**saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def architectures(runs_dir: str | Path, only: Collection[str] | None = None
                  ) -> tuple[dict[str, list[str]], dict[str, RunMetrics], dict[str, Path]]:
    """Distinct architectures of the finished runs: architecture id -> the runs (variant/seedK)
    that have it, id -> the metrics record of the first such run, and id -> its folder. The id is
    the first run's name; runs share an architecture when ``model_args`` (genotype included)
    are equal."""
    by_args: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    metrics: dict[str, RunMetrics] = {}
    folders: dict[str, Path] = {}
    for run in finished_runs(runs_dir, only):
        saved = torch.load(run / "artifacts" / "model_final.pt", map_location="cpu",
                           weights_only=False)
        key = json.dumps(saved["model_args"], sort_keys=True)
        arch = by_args.setdefault(key, run_name(run))
        members.setdefault(arch, []).append(run_name(run))
        if arch == run_name(run):
            metrics[arch] = read_metrics(run)
            folders[arch] = run
    return members, metrics, folders


def run_cost(runs_dir: str | Path, out_dir: str | Path, cfg: CostSettings,
             only: Collection[str] | None = None, log=print) -> list[dict]:
    """Measure every architecture (``architectures``) against its backbone's plain baseline;
    write ``out_dir/latency.csv`` and return its rows."""
    from metapool.deploy import measure_latency

    members, metrics, folders = architectures(runs_dir, only)
    if not members:
        raise FileNotFoundError(f"no finished runs under {runs_dir}: run the training stages first")
    rows: list[dict] = []
    backbones = sorted({m.backbone for m in metrics.values()})
    for backbone in backbones:
        archs = [a for a, m in metrics.items() if m.backbone == backbone]
        refs = [a for a in archs if is_plain_baseline(metrics[a].model_dump())]
        if not refs:
            log(f"cost: no plain baseline of {backbone} among the runs: its "
                f"{len(archs)} architectures are not timed")
            continue
        ref = refs[0]
        models = {a: load_final_model(folders[a]) for a in archs}
        log(f"cost: {len(archs)} architectures of {backbone} on {', '.join(cfg.runtimes)}, "
            f"{cfg.threads} thread(s), {cfg.rounds} interleaved rounds each")
        timed = measure_latency(
            models, ref, list(cfg.runtimes), cfg.img_size, cfg.threads, cfg.rounds, cfg.calls,
            on_skip=lambda name, runtime, exc: log(f"cost: {name} does not run on {runtime}: "
                                                   f"{type(exc).__name__}: {exc}"[:300]))
        for lat in timed:
            for run in members[lat.model]:
                rows.append({"run": run, "variant": run.split("/")[0], "architecture": lat.model,
                             "runtime": lat.runtime, "threads": lat.threads,
                             "img_size": cfg.img_size, "latency_ms": lat.ms,
                             "vs_baseline": lat.ratio, "vs_baseline_low": lat.ratio_low,
                             "vs_baseline_high": lat.ratio_high, "baseline": ref,
                             "baseline_ms": lat.reference_ms, "rounds": lat.rounds})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "latency.csv", rows, list(rows[0]) if rows else ["run"])
    return rows
