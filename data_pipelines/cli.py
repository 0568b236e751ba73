"""``metapool data ...`` subcommands."""
from __future__ import annotations

import argparse


def _prepare(args: argparse.Namespace) -> None:
    from data_pipelines.betons import WriterConfig
    from data_pipelines.prepare import PrepareConfig, prepare

    if args.params or args.set:
        from experiments.config import load_params

        params = load_params(args.params or "params.yaml", args.set)
        cfg, writer = params.prepare_config(), params.writer_config()
    else:
        cfg, writer = PrepareConfig(), WriterConfig()
    for key in ("imagenet_root", "classes", "train_per_class", "val_per_class", "class_list",
                "seed"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    for key in ("max_resolution", "jpeg_quality", "compress_probability", "workers",
                "meta_split"):
        value = getattr(args, key)
        if value is not None:
            setattr(writer, key, value)
    writer.seed = cfg.seed
    report = prepare(args.out, cfg, writer)
    print(f"wrote {args.out}: {report['images']} images of {report['classes']} classes "
          f"({report['dataset']}); skipped {report['skipped']} unreadable files")


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare datasets (ImageNet subsets, the default, .beton)")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("prepare", help="write train/meta/val .beton files and report.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--params", help="read defaults from this params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of --params, e.g. --set data.default.classes=5")
    p.add_argument("--imagenet-root", help="ILSVRC2012 root; omit to generate the default dataset")
    p.add_argument("--classes", type=int, help="number of classes (default: all)")
    p.add_argument("--train-per-class", type=int, help="train images per class (default: all)")
    p.add_argument("--val-per-class", type=int, help="val images per class (default: all)")
    p.add_argument("--class-list", help="file with one wnid per line (e.g. ImageNet-100)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-resolution", type=int)
    p.add_argument("--jpeg-quality", type=int)
    p.add_argument("--compress-probability", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--meta-split", type=float, help="share of train held out for alpha")
    p.set_defaults(func=_prepare)
