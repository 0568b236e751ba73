"""The ``metapool`` command: ``profile``, ``data prepare``, ``train``, ``compare``, ``report``.

Every sub-command that reads ``params.yaml`` validates it (and its ``--set`` overrides) first;
errors (bad parameters, missing files, a full disk, a NaN) are one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys


def _profile(args: argparse.Namespace) -> None:
    import timm

    import metapool  # noqa: F401  (registers the models)
    from metapool.profile import format_table, profile_model

    kwargs = {"num_classes": args.num_classes}
    if args.genotype:
        if not args.model.startswith("metapool_"):
            raise ValueError(f"--genotype needs a metapool_* model, not {args.model}")
        kwargs["genotype"] = args.genotype
    try:
        model = timm.create_model(args.model, **kwargs)
    except RuntimeError as exc:  # timm: unknown model name
        raise ValueError(str(exc)) from None
    prof = profile_model(model, args.model, args.img_size, latency=not args.no_latency)
    print(json.dumps(prof.as_dict(), indent=2) if args.json else format_table(prof))


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
    from experiments.config import load_params, resolve_run
    from experiments.launch import relaunch_with_torchrun
    from experiments.train import run_training

    params = load_params(args.params, args.set)
    run = resolve_run(params, args.variant, args.seed, args.out, args.mode, args.genotype,
                      args.checkpoints)
    relaunch_with_torchrun(params, sys.argv[1:])  # returns only when no torchrun is needed
    metrics = run_training(run)
    if metrics:
        print(f"{run.variant} seed {run.seed}: top-1 {metrics['top1']:.2f}% "
              f"top-5 {metrics['top5']:.2f}% -> {run.out}/metrics.json")


def _compare(args: argparse.Namespace) -> None:
    from experiments.compare import run_compare
    from experiments.config import load_params

    params = load_params(args.params, args.set)
    out = args.out or params.compare.out_dir
    result = run_compare(args.runs or params.runs_dir, out, params.compare,
                         only=params.pipeline_runs())
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
    html = render_report(params, args.results or params.compare.out_dir, args.out)
    print(f"wrote {html}")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set pmpl.inner_lr=0.01 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metapool",
        description="Progressive Meta-Pooling Learning: reproduction and ablation suite.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="parameters, MACs, enhancers and CPU latency of a model")
    p.add_argument("model", help="timm model name, e.g. mobilenetv2_100 or metapool_mobilenetv2_100")
    p.add_argument("--genotype", help="genotype JSON: build the fixed (adapted) model")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_profile)

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
    t.add_argument("--mode", choices=["baseline", "pmpl", "retrain", "fixed", "attention"],
                   help="without --variant: train this mode with the params' defaults")
    t.add_argument("--genotype", help="retrain mode: the genotype JSON to train")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="output folder (default: runs/VARIANT/seedS)")
    t.add_argument("--checkpoints", help="checkpoint folder (default: OUT/checkpoints)")
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
