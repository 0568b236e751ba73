"""The ``metapool`` command: ``profile``, ``data prepare``, ``train``, ``compare``, ``report``."""
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
        kwargs["genotype"] = args.genotype
    if not args.model.startswith("metapool_") and args.genotype:
        raise SystemExit(f"error: --genotype needs a metapool_* model, not {args.model}")
    try:
        model = timm.create_model(args.model, **kwargs)
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    prof = profile_model(model, args.model, args.img_size, latency=not args.no_latency)
    print(json.dumps(prof.as_dict(), indent=2) if args.json else format_table(prof))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metapool",
        description="Progressive Meta-Pooling Learning: reproduction and ablation suite.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="parameters, MACs, enhancers and CPU latency of a model")
    p.add_argument("model", help="timm model name, e.g. mobilenetv2_100 or metapool_mobilenetv2_100")
    p.add_argument("--genotype", help="genotype JSON: build the fixed (adapted) model")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_profile)

    try:
        from data_pipelines.cli import add_data_parser
        from experiments.cli import add_experiment_parsers
    except ImportError:  # the sibling packages are optional at import time
        return parser
    add_data_parser(sub)
    add_experiment_parsers(sub)
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
