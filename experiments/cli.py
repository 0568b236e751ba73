"""The ``metapool`` command: ``profile``, ``data prepare``, ``train``, ``cost``, ``compare``,
``report``.

Every sub-command that reads ``params.yaml`` validates it (and its ``--set`` overrides) first;
errors (bad parameters, missing files, a full disk, a NaN) are one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from experiments.metrics import RunMetrics


def _profile(args: argparse.Namespace) -> None:
    import timm

    import metapool  # noqa: F401  (registers the models)
    from metapool.deploy import measure_latency
    from metapool.profile import profile_model

    def create(name: str, genotype: str | None = None):
        kwargs = {"num_classes": args.num_classes}
        if genotype:
            if not name.startswith("metapool_"):
                raise ValueError(f"--genotype needs a metapool_* model, not {name}")
            kwargs["genotype"] = genotype
        try:
            return timm.create_model(name, **kwargs).eval()
        except RuntimeError as exc:  # timm: unknown model name
            raise ValueError(str(exc)) from None

    models = {args.reference: create(args.reference), args.model: create(args.model,
                                                                          args.genotype)}
    rows = {n: profile_model(m, n, args.img_size).as_dict() for n, m in models.items()}
    latencies = [] if not args.runtime else measure_latency(
        models, args.reference, args.runtime, args.img_size, args.threads, args.rounds)
    if args.json:
        print(json.dumps({"models": rows, "latency": [vars(lat) for lat in latencies]},
                         indent=2))
        return
    base = rows[args.reference]
    print(f"{'model':<40} {'params':>12} {'MACs':>14} {'enhancers':>9}")
    for name, r in rows.items():
        print(f"{name:<40} {r['params']:>12,} {r['macs']:>14,} {r['enhancers']:>9}"
              f"   params x{r['params'] / base['params']:.3f}, MACs x{r['macs'] / base['macs']:.3f}")
    if latencies:
        print(f"\nbatch-1 latency at {args.img_size} px, {args.threads} thread(s), "
              f"{args.rounds} rounds interleaved with {args.reference}:")
        print(f"{'runtime':<12} {'model':<40} {'ms':>8} {'/ reference':>12} {'quartiles':>16}")
        for lat in latencies:
            print(f"{lat.runtime:<12} {lat.model:<40} {lat.ms:>8.2f} {lat.ratio:>11.3f}x "
                  f"{lat.ratio_low:>7.3f}-{lat.ratio_high:.3f}")


def _cost(args: argparse.Namespace) -> None:
    from experiments.config import load_params
    from experiments.cost import run_cost

    params = load_params(args.params, args.set)
    out = args.out or params.compare.out_dir
    rows = run_cost(args.runs or params.runs_dir, out, params.cost, only=params.pipeline_runs())
    print(f"wrote {out}/latency.csv ({len(rows)} rows)")


# flags of `data prepare` that set a key of the data section
PREPARE_FLAGS = ("imagenet_root", "classes", "train_per_class", "val_per_class", "class_list",
                 "seed", "meta_split")
WRITER_FLAGS = ("max_resolution", "jpeg_quality", "compress_probability", "workers")


def _prepare(args: argparse.Namespace) -> None:
    from data_pipelines.prepare import estimate, format_estimate, prepare
    from experiments.config import load_params

    flags = [f"data.{k}={getattr(args, k)}" for k in PREPARE_FLAGS if getattr(args, k) is not None]
    flags += [f"data.writer.{k}={getattr(args, k)}" for k in WRITER_FLAGS
              if getattr(args, k) is not None]
    params = load_params(args.params, [*args.set, *flags])
    if args.estimate:
        print(format_estimate(estimate(args.out, params.data)))
        return
    report = prepare(args.out, params.data)
    print(f"wrote {args.out}: {report['images']} images of {report['classes']} classes "
          f"({report['dataset']}); skipped {report['skipped']} unreadable files")


def _train(args: argparse.Namespace) -> None:
    from experiments.config import load_params
    from experiments.launch import relaunch_with_torchrun
    from experiments.runs import resolve_run
    from experiments.train import run_training

    params = load_params(args.params, args.set)
    if args.group is not None:
        if args.group not in params.stages:
            raise ValueError(f"unknown stage group {args.group!r}: choose from "
                             f"{', '.join(params.stages)} (params.yaml's stages)")
        if args.variant or args.mode or args.seed or args.out:
            raise ValueError("--group trains the group's variants at their pipeline seeds: give "
                             "no --variant, --mode, --seed or --out with it")
        pairs = [(v, s) for v in params.stages[args.group] for s in params.variant_seeds(v)]
    else:
        seeds = args.seed or [0]
        if len(seeds) > 1 and args.out:
            raise ValueError("--out names one run's folder: give one --seed, or leave --out out "
                             "(runs go to runs_dir/GROUP/VARIANT/seedS)")
        pairs = [(args.variant, s) for s in seeds]
    several = args.group is not None or len(pairs) > 1
    runs = [resolve_run(params, variant, seed, args.out, args.mode, args.genotype,
                        str(Path(args.checkpoints) / (variant if args.group else "") / f"seed{seed}")
                        if args.checkpoints and several else args.checkpoints)
            for variant, seed in pairs]
    relaunch_with_torchrun(params, sys.argv[1:])  # returns only when no torchrun is needed
    if args.group is not None and args.checkpoints:
        Path(args.checkpoints).mkdir(parents=True, exist_ok=True)  # a DVC output, runs or none
    results = run_training(runs)
    for run, metrics in zip(runs, results, strict=True):
        if metrics:
            print(f"{run.variant} seed {run.seed}: top-1 {metrics.top1:.2f}% "
                  f"top-5 {metrics.top5:.2f}% -> {run.out}/metrics.json")
    if args.group is not None and (results == [] or any(results)):
        summary = write_group_summary(Path(params.runs_dir), args.group, results)
        print(f"wrote {summary}")


def write_group_summary(runs_dir: Path, group: str, results: list[RunMetrics]) -> Path:
    """``runs_dir/GROUP.json``: each run's headline metrics by variant and seed, the DVC metrics
    file of the group's stage (``dvc exp show`` columns ``VARIANT.seedK.top1`` ...). The
    group's folder exists afterwards even when the group trains nothing (a DVC output)."""
    from metapool.io import atomic_write_text

    keys = ("top1", "top5", "val_loss", "train_seconds", "train_images_per_s", "params",
            "macs_224")
    summary: dict[str, dict] = {}
    for m in results:
        summary.setdefault(m.variant, {})[f"seed{m.seed}"] = {k: getattr(m, k) for k in keys}
    (runs_dir / group).mkdir(parents=True, exist_ok=True)
    path = runs_dir / f"{group}.json"
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path


def _compare(args: argparse.Namespace) -> None:
    from experiments.compare import run_compare
    from experiments.config import load_params

    params = load_params(args.params, args.set)
    out = args.out or params.compare.out_dir
    result = run_compare(args.runs or params.runs_dir, out, params.compare,
                         only=params.pipeline_runs(), latency_csv=Path(out) / "latency.csv")
    if result["ignored_runs"]:
        print(f"left out {len(result['ignored_runs'])} finished runs this configuration does not "
              f"train (an earlier configuration's): {', '.join(result['ignored_runs'])}")
    for row in result["comparisons"]:
        verdict = row["prob_improvement"]["verdict"]
        print(f"{row['a']:>20} vs {row['b']:<18} {row['diff_top1']:+6.2f} pts  {verdict}")
    print(f"wrote {out}/compare.json")


def _report(args: argparse.Namespace) -> None:
    from experiments.config import load_params
    from experiments.report import render_report

    params = load_params(args.params, args.set)
    html = render_report(params, args.results or params.compare.out_dir, args.out,
                         params_path=args.params)
    print(f"wrote {html}")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set pmpl.inner_lr=0.01 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metapool",
        description="Progressive Meta-Pooling Learning: reproduction and ablation suite.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="parameters, MACs and deployed latency of a model beside "
                                       "a reference, on the runtimes asked for")
    p.add_argument("model", help="timm model name, e.g. metapool_published_mobilenetv2_100")
    p.add_argument("--genotype", help="genotype JSON: build the fixed (adapted) model")
    p.add_argument("--reference", default="mobilenetv2_100",
                   help="the model every ratio is to (default: mobilenetv2_100)")
    p.add_argument("--runtime", action="append",
                   choices=["eager", "inductor", "onnxruntime", "executorch"],
                   help="time batch-1 inference on this runtime (repeatable; none: no timing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per runtime")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_profile)

    k = sub.add_parser("cost", help="deployed latency of every trained architecture, per "
                                    "runtime, interleaved with its baseline -> results/latency.csv")
    k.add_argument("--params", default="params.yaml")
    k.add_argument("--runs", help="runs folder (default: params runs_dir)")
    k.add_argument("--out", help="output folder (default: compare.out_dir)")
    _add_set(k)
    k.set_defaults(func=_cost)

    data = sub.add_parser("data", help="prepare datasets (ImageNet subsets, the default, .beton)")
    dsub = data.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="write train/meta/val .beton files, manifest, report.json")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--params", help="read the data section from this params.yaml "
                                    "(default: the schema's defaults)")
    _add_set(d)
    d.add_argument("--imagenet-root", help="ILSVRC2012 root; omit to generate the default dataset")
    d.add_argument("--classes", type=int, help="number of classes (default: all)")
    d.add_argument("--train-per-class", type=int, help="train images per class (default: all)")
    d.add_argument("--val-per-class", type=int, help="val images per class (default: all)")
    d.add_argument("--class-list", help="file with one wnid per line (e.g. ImageNet-100)")
    d.add_argument("--seed", type=int)
    d.add_argument("--meta-split", type=float, help="share of train held out for alpha")
    d.add_argument("--max-resolution", type=int)
    d.add_argument("--jpeg-quality", type=int)
    d.add_argument("--compress-probability", type=float)
    d.add_argument("--workers", type=int)
    d.add_argument("--estimate", action="store_true",
                   help="scan the folder, decode and write a seeded sample, print the expected "
                        "time, disk and image count; write nothing")
    d.set_defaults(func=_prepare)

    t = sub.add_parser("train", help="train one run (a variant of params.yaml, or a bare --mode)")
    t.add_argument("--params", default="params.yaml")
    t.add_argument("--variant", help="a name under `variants:` in params.yaml")
    t.add_argument("--mode", help="without --variant: train this mode with the params' defaults "
                                  "(one of experiments.config.Mode)")
    t.add_argument("--genotype", help="retrain mode: the genotype JSON to train")
    t.add_argument("--seed", type=int, nargs="+", help="seed(s), trained one after the other in "
                   "this process (default: 0)")
    t.add_argument("--group", help="train every variant of this stage group (params.yaml's "
                                   "stages) at its pipeline seeds, one after the other in this "
                                   "process, and write runs_dir/GROUP.json (the DVC stages)")
    t.add_argument("--out", help="output folder of one run (default: runs/GROUP/VARIANT/seedS)")
    t.add_argument("--checkpoints", help="checkpoint folder (default: OUT/checkpoints); with "
                                         "several runs, the parent of one [VARIANT/]seedS "
                                         "folder each")
    _add_set(t)
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", help="statistics across seeds and variants -> results/")
    c.add_argument("--params", default="params.yaml")
    c.add_argument("--runs", help="runs folder (default: params runs_dir)")
    c.add_argument("--out", help="output folder (default: compare.out_dir)")
    _add_set(c)
    c.set_defaults(func=_compare)

    r = sub.add_parser("report", help="execute the report notebook (papermill) and export HTML")
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--results", help="compare outputs (default: compare.out_dir)")
    r.add_argument("--out", default="reports/output", help="folder for report.ipynb/.html")
    _add_set(r)
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, FloatingPointError) as exc:  # OSError: missing files, full disk
        print(f"metapool {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
