"""``metapool train`` (and the pipeline's later stages)."""
from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> None:
    from experiments.config import load_params
    from experiments.train import relaunch_with_torchrun, resolve_run, run_training

    params = load_params(args.params, args.set)
    spec, pmpl = resolve_run(params, args.variant, args.seed, args.out, args.mode, args.genotype,
                             args.checkpoints)
    relaunch_with_torchrun(params, sys.argv[1:])  # returns only when no torchrun is needed
    metrics = run_training(params, spec, pmpl)
    if metrics:
        print(f"{spec.variant} seed {spec.seed}: top-1 {metrics['top1']:.2f}% "
              f"top-5 {metrics['top5']:.2f}% -> {spec.out}/metrics.json")


def _compare(args: argparse.Namespace) -> None:
    from experiments.compare import CompareSettings, run_compare
    from experiments.config import load_params

    params = load_params(args.params, args.set)
    c = params.compare
    cfg = CompareSettings(confidence=c.confidence, resamples=c.resamples, min_seeds=c.min_seeds)
    out = args.out or c.out_dir
    result = run_compare(args.runs or params.runs_dir, out, c.extra_pairs, cfg)
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


def add_experiment_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one run (a variant of params.yaml, or a bare --mode)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--variant", help="a name under `variants:` in params.yaml")
    p.add_argument("--mode", choices=["baseline", "pmpl", "retrain", "fixed", "attention"],
                   help="without --variant: train this mode with the params' defaults")
    p.add_argument("--genotype", help="retrain mode: the genotype JSON to train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: runs/VARIANT/seedS)")
    p.add_argument("--checkpoints", help="checkpoint folder (default: OUT/checkpoints)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set pmpl.inner_lr=0.01 (repeatable)")
    p.set_defaults(func=_train)

    c = sub.add_parser("compare", help="statistics across seeds and variants -> results/")
    c.add_argument("--params", default="params.yaml")
    c.add_argument("--runs", help="runs folder (default: params runs_dir)")
    c.add_argument("--out", help="output folder (default: compare.out_dir)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(func=_compare)

    r = sub.add_parser("report", help="execute the report notebook (papermill) and export HTML")
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--results", help="compare outputs (default: compare.out_dir)")
    r.add_argument("--out", default="reports/output", help="folder for report.ipynb/.html")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.set_defaults(func=_report)
