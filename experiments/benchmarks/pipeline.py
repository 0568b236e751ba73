"""The pipeline's training rate beside the machine's reference rate, in one process.

    python -m experiments.benchmarks.pipeline                    # baseline on the default
    python -m experiments.benchmarks.pipeline --variant pmpl --epochs 3

Needs the prepared data of ``params.yaml`` (``dvc repro data``). Builds the Trainer a DVC stage
builds for ``--variant`` (FFCV loaders, the recipe's optimizer and schedule) and alternates: a
reference measurement (``experiments.benchmarks.reference``: plain MobileNetV2 on synthetic
tensors), one epoch of ``Trainer.train_one_epoch`` (loading included), and so on. Prints each
epoch's images/s, the reference beside it and their ratio (target for the baseline: >= 0.9),
and the start-up: building the trainer (loaders compiled) and the first epoch's excess over
the steady ones (numba compilation, first batches).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from experiments.benchmarks.reference import reference_rate
from experiments.config import load_params
from experiments.distributed import Dist, StopSignal
from experiments.runs import resolve_run
from experiments.train import Trainer, keep_freed_memory


def measure(params_path: str, variant: str, epochs: int, overrides: list[str]) -> dict:
    params = load_params(params_path, overrides)
    keep_freed_memory()  # as run_training does on the CPU
    with tempfile.TemporaryDirectory() as tmp:
        run = resolve_run(params, variant, 0, f"{tmp}/run", checkpoints=f"{tmp}/ck")
        start = time.perf_counter()
        trainer = Trainer(run, Dist())
        build_s = time.perf_counter() - start
        rows = []
        stop = StopSignal()
        try:
            if trainer.phase is not None:
                trainer.phase.start_epoch(0)
            for epoch in range(epochs):
                ref = reference_rate(img_size=run.recipe.img_size,
                                     batch=run.recipe.batch_size,
                                     threads=run.train.threads, steps=10)
                t0 = time.perf_counter()
                row = trainer.train_one_epoch(epoch, stop)
                rows.append({"epoch": epoch, "seconds": round(time.perf_counter() - t0, 2),
                             "images_per_s": round(row["train_images_per_s"], 1),
                             "reference_images_per_s": ref["reference_images_per_s"],
                             "ratio": round(row["train_images_per_s"] /
                                            ref["reference_images_per_s"], 3)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            stop.restore()
    steady = rows[1:] or rows
    return {"variant": variant, "epochs": epochs, "trainer_build_s": round(build_s, 2),
            "first_epoch_excess_s": round(rows[0]["seconds"] - statistics.median(
                r["seconds"] for r in steady), 2),
            "median_images_per_s": statistics.median(r["images_per_s"] for r in steady),
            "median_reference_images_per_s": statistics.median(
                r["reference_images_per_s"] for r in steady),
            "median_ratio": statistics.median(r["ratio"] for r in steady)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variant", default="baseline")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    print(json.dumps(measure(args.params, args.variant, args.epochs, args.set)), flush=True)


if __name__ == "__main__":
    main()
