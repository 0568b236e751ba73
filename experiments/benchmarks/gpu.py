"""GPU benchmark: training images/s and peak memory of baseline and PMPL steps.

    python -m experiments.benchmarks.gpu                      # 224px, batch 256, bf16, channels_last
    python -m experiments.benchmarks.gpu --device cpu --img-size 64 --batch 8 --steps 2   # smoke

Synthetic tensors (no data loader in the measurement). Rows: timm's own ``mobilenetv2_100``
step, this suite's baseline (same architecture, torchvision init), the searchable PMPL step
(first order), and the adapted (fixed genotype) model; each eager and with ``torch.compile``.

With ``--estimate-gpus N`` it then measures the steps again at each ImageNet recipe's per-GPU
batch (``paper``, ``standard``, ``paper-final`` of ``params.yaml``; the published model's step
too) and prints the expected training time and GPU-hours of one run on N GPUs (see
``estimate_hours``). Every step autocasts to bfloat16; ``paper-final`` as ran used float16 with
a gradient scaler, which costs about the same on current GPUs.
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch
import torch.nn.functional as F

import metapool  # noqa: F401
from experiments.config import load_params
from metapool.models import build_model
from metapool.pmpl import PMPLConfig, ProgressiveMetaPooling


def _measure(step, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def bench(name: str, model: torch.nn.Module, pmpl: bool, args, compile_model: bool) -> dict:
    device = torch.device(args.device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    fwd = torch.compile(model) if compile_model else model
    if pmpl:
        search = ProgressiveMetaPooling(model, PMPLConfig(), F.cross_entropy)
        search.model = fwd  # the support pass through the compiled module
        opt = torch.optim.SGD(search.weight_parameters(), lr=1e-4, momentum=0.9)

        def step():
            with autocast:
                search.step((x, y), (x, y), epoch=0)
            opt.step()
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
    seconds, peak = _measure(step, device, args.steps, args.warmup)
    return {"model": name, "compile": compile_model, "img_size": args.img_size,
            "batch": args.batch, "images_per_s": round(args.batch / seconds, 1),
            "step_ms": round(seconds * 1000, 2), "peak_mem_gib": round(peak, 2)}


# the steps measured: name -> (model factory, PMPL search step?)
STEPS = {
    "timm mobilenetv2_100": (lambda: timm.create_model("mobilenetv2_100"), False),
    "baseline": (lambda: build_model("mobilenetv2_100", "none"), False),
    "search": (lambda: build_model("mobilenetv2_100", "search"), True),
    "adapted": (lambda: build_model("mobilenetv2_100", "fixed", fixed_op="strip_pool"), False),
    # the authors' published mp_mobilenet_v2 (METHOD.md 4b): 11 output gates and their head
    "published": (lambda: build_model("mobilenetv2_100", "none", output_gates=True,
                                      head="published"), False),
}

IMAGENET_TRAIN_IMAGES = 1_281_167


def estimate_hours(images_per_s: dict[str, float], epochs: int, deadline_epoch: int,
                   gpus: int, meta_split: float,
                   train_images: int = IMAGENET_TRAIN_IMAGES) -> dict[str, dict[str, float]]:
    """Wall time and GPU-hours of one run from per-GPU training throughput.

    ``images_per_s`` holds per-GPU images/s of the ``baseline``, ``search`` (PMPL step: support
    and query pass) and ``adapted`` steps, and optionally ``published`` (the authors' model).
    Every variant trains its weights on the train split minus the meta split; PMPL searches
    until ``deadline_epoch`` and trains the adapted model after it. Assumes linear DDP scaling
    and a loader that keeps up (FFCV); evaluation excluded.
    """
    per_epoch = train_images * (1 - meta_split) / gpus  # images per GPU per epoch
    search_epochs = min(deadline_epoch, epochs)
    seconds = {
        "baseline": epochs * per_epoch / images_per_s["baseline"],
        "pmpl": (search_epochs * per_epoch / images_per_s["search"]
                 + (epochs - search_epochs) * per_epoch / images_per_s["adapted"]),
    }
    if "published" in images_per_s:
        seconds["published"] = epochs * per_epoch / images_per_s["published"]
    return {k: {"hours": round(s / 3600, 2), "gpu_hours": round(gpus * s / 3600, 1)}
            for k, s in seconds.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    """Print (and return, for ``experiments.benchmarks.gpu_check``) the throughput and estimate rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--estimate-gpus", type=int, default=0,
                    help="also estimate paper/standard run time on this many GPUs")
    ap.add_argument("--estimate-only", action="store_true", help="skip the throughput rows")
    ap.add_argument("--recipe-img-size", type=int, help="measure the recipes at this size "
                    "instead of theirs (a CPU smoke test)")
    ap.add_argument("--recipe-batch", type=int, help="global batch instead of the recipes'")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    modes = [False] if args.no_compile else [False, True]
    steps = STEPS
    rows = []
    for compile_model in [] if args.estimate_only else modes:
        for name, (make, pmpl) in steps.items():
            rows.append(bench(name, make(), pmpl, args, compile_model))
            print(json.dumps(rows[-1]), flush=True)
    if args.estimate_gpus:
        params = load_params(args.params, [])
        for recipe_name in ("paper", "standard", "paper-final"):
            r = params.recipes[recipe_name]
            batch = args.recipe_batch or r.batch_size
            run_args = argparse.Namespace(**{**vars(args),
                                             "img_size": args.recipe_img_size or r.img_size,
                                             "batch": batch // args.estimate_gpus})
            ips = {name: bench(name, steps[name][0](), steps[name][1], run_args,
                               params.train.compile)["images_per_s"]
                   for name in ("baseline", "search", "adapted", "published")}
            rows.append({"recipe": recipe_name, "gpus": args.estimate_gpus,
                         "batch_per_gpu": run_args.batch, "img_size": run_args.img_size,
                         "epochs": r.epochs, "deadline_epoch": r.deadline_epoch,
                         "images_per_s_per_gpu": ips,
                         **estimate_hours(ips, r.epochs, r.deadline_epoch, args.estimate_gpus,
                                          params.data.meta_split)})
            print(json.dumps(rows[-1]), flush=True)
    return [r for r in rows if "recipe" in r]


if __name__ == "__main__":
    main()
