"""Benchmark: the cost of ``metapool data prepare`` per worker process, by writer setting.

    python -m data_pipelines.corpus /tmp/corpus
    python -m data_pipelines.benchmarks.prepare /tmp/corpus

Screens every image (``betons.screen_image``: what ``prepare`` does before writing) and, for
comparison, decodes every image in full (the validation ``prepare`` did before the writer's
single decode), then writes all of them to one .beton for each ``max_resolution`` x
``compress_probability`` with ``--workers`` writer processes (default 1: the rate of one), and
prints one JSON line per setting: images/s per process of the screen, of a full decode (both
in this one process) and of writing (divided by ``--workers``), and the bytes per image
the .beton's allocation table records (the file itself is padded to FFCV's page size).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from data_pipelines.betons import check_image, check_images, write_beton
from data_pipelines.config import WriterConfig
from data_pipelines.manifest import build_subset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="an ILSVRC2012-layout folder (e.g. data_pipelines.corpus)")
    ap.add_argument("--resolutions", default="160,192,256")
    ap.add_argument("--compress", default="0,0.5,1")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--workers", type=int, default=1,
                    help="writer processes; rates are divided by it (per process)")
    args = ap.parse_args()
    from ffcv.reader import Reader

    records = build_subset(Path(args.root), None, None, None, 0, None)
    start = time.perf_counter()
    good, skipped = check_images(records, workers=1)
    screen = len(records) / (time.perf_counter() - start)
    start = time.perf_counter()
    for r in records:
        check_image(r.path)
    decode = len(records) / (time.perf_counter() - start)
    for res in (int(r) for r in args.resolutions.split(",")):
        for cp in (float(c) for c in args.compress.split(",")):
            cfg = WriterConfig(max_resolution=res, compress_probability=cp,
                               jpeg_quality=args.quality, workers=args.workers)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "bench.beton"
                start = time.perf_counter()
                write_beton(good, path, cfg)
                seconds = time.perf_counter() - start
                stored = int(Reader(str(path)).alloc_table["size"].sum())
            print(json.dumps({"images": len(good), "max_resolution": res,
                              "compress_probability": cp,
                              "screen_img_s_per_process": round(screen, 1),
                              "full_decode_img_s_per_process": round(decode, 1),
                              "writers": args.workers,
                              "write_img_s_per_process": round(
                                  len(good) / seconds / args.workers, 1),
                              "kb_per_image": round(stored / len(good) / 1024, 1)}), flush=True)


if __name__ == "__main__":
    main()
