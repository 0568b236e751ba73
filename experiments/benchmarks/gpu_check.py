"""The prepared GPU check (``scripts/gpu_check.sh``, ``make gpu-check``): one command that
measures and checks everything the GPU path needs, and writes it as JSON and markdown.

    python -m experiments.benchmarks.gpu_check --out OUT            # on the GPU machine (about 6 minutes)
    python -m experiments.benchmarks.gpu_check --out OUT --cpu-smoke   # the same code, tiny, on the CPU (CI)

1. throughput: baseline, PMPL search and adapted MobileNetV2 steps (and timm's own
   ``mobilenetv2_100``) at 224 px, batch 256, bf16, channels_last, eager and compiled
   (``experiments.benchmarks.gpu``), then the ``--estimate-gpus 8`` run time of ``paper`` and
   ``standard``;
2. correctness: one PMPL step (same weights, same batch, float32) on the GPU and on the CPU -
   loss, weight gradients and alpha's hypergradient agree to 1e-3 (relative); a bf16 step is
   finite and its loss within 2% of float32's; compiled and eager forwards agree to 1e-3; the
   exact second-order hypergradient runs and is finite (its distance to the finite-difference
   one is reported: across ReLU6 and max-pool kinks the two legitimately differ);
3. end to end: a generated dataset, then ``metapool train`` of PMPL and of the baseline with the
   torchvision loader, under ``torchrun --nproc_per_node=1`` (so the NCCL process group and
   DDP run), their epoch lines and metrics saved;
4. ``gpu_check.json`` and ``gpu_check.md``: everything above with the GPU, driver and torch.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
# (img_size, batch, steps, warmup) of the throughput rows; classes and images of the run
FULL = {"bench": (224, 256, 20, 5), "check": (64, 16), "classes": 10, "train": 300, "val": 40,
        "size": 72, "img": 64, "batch": 32, "epochs": 3, "workers": 6, "threads": 4}
SMOKE = {"bench": (32, 4, 1, 1), "check": (64, 8), "classes": 3, "train": 16, "val": 6,
         "size": 36, "img": 32, "batch": 8, "epochs": 2, "workers": 1, "threads": 1}


TOLERANCE = 1e-4  # the device's float32 PMPL step against float64 on the CPU (relative)
FD_TOLERANCE = 5e-2  # DARTS' finite-difference second-order term against the exact one
SMOOTH = ("skip", "avg_pool_3x3", "avg_pool_5x5", "avg_pool_7x7")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])


def environment(device: torch.device) -> dict:
    """experiments.provenance's record of this machine, plus the GPU driver."""
    from experiments.provenance import provenance

    info = provenance(device, world_size=1, compiled=device.type == "cuda")
    if device.type == "cuda":
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    return info


def throughput(device: torch.device, sizes: dict, compile_models: bool) -> list[dict]:
    """experiments.benchmarks.gpu's rows (eager, then compiled where asked)."""
    from experiments.benchmarks import gpu as bench_gpu

    img, batch, steps, warmup = sizes["bench"]
    args = argparse.Namespace(device=str(device), img_size=img, batch=batch, steps=steps,
                              warmup=warmup)
    rows = []
    for compiled in ([False, True] if compile_models else [False]):
        for name, (make, pmpl) in bench_gpu.STEPS.items():
            if compiled and pmpl:
                continue  # a search is compiled only once it has ended (every freeze recompiles)
            rows.append(bench_gpu.bench(name, make(), pmpl, args, compiled))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def estimate(device: torch.device, sizes: dict, gpus: int = 8) -> list[dict]:
    """``bench_gpu --estimate-gpus``: run time of the ImageNet recipes on ``gpus`` GPUs."""
    from experiments.benchmarks import gpu as bench_gpu

    img, _, steps, warmup = sizes["bench"]
    argv = ["--device", str(device), "--steps", str(steps), "--warmup",
            str(warmup), "--no-compile", "--estimate-gpus", str(gpus), "--estimate-only",
            "--params", str(REPO / "params.yaml")]
    if img != 224:  # the CPU smoke: tiny steps for the recipes too
        argv += ["--recipe-img-size", str(img), "--recipe-batch", str(gpus * sizes["bench"][1])]
    return bench_gpu.main(argv)


class SmoothSearchNet(torch.nn.Module):
    """conv-BN-SiLU, enhancer, strided conv-BN-SiLU, enhancer, linear: a searchable network
    whose PMPL step is well conditioned. MobileNetV2's is not, at any size a check can afford:
    train-mode BatchNorm over channels that ReLU6 left constant and max pools breaking near-ties
    make its hypergradient move by 0.4-100% under a 1e-7 perturbation of the weights, in
    float64 already (measured on the CPU), so no device could be judged against it."""

    def __init__(self) -> None:
        from torch import nn

        from metapool.enhancer import MetaPoolEnhancer

        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.e1 = MetaPoolEnhancer(16, SMOOTH)
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
                               nn.SiLU())
        self.e2 = MetaPoolEnhancer(32, SMOOTH)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.e2(self.b(self.e1(self.a(x)))).mean((2, 3)))


def correctness(device: torch.device, sizes: dict, compile_backend: str) -> dict:
    """The same PMPL step (first order, finite-difference and exact second order) on ``device``
    and in float64 on the CPU, finite differences against the exact hypergradient, a bf16 step
    of MobileNetV2's search against float32, compiled against eager."""
    from metapool.models import build_model
    from metapool.pmpl import PMPLConfig, ProgressiveMetaPooling, rng_state

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    torch.backends.cudnn.allow_tf32 = False
    img, batch = sizes["check"]
    torch.manual_seed(0)
    smooth, mobilenet = SmoothSearchNet(), build_model("mobilenetv2_100", "search",
                                                       num_classes=10)
    for net in (smooth, mobilenet):
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("alpha"):
                    p.normal_(0, 0.5)  # a search under way, not its uniform start
    g = torch.Generator().manual_seed(1)
    batches = {size: ((torch.randn(batch, 3, size, size, generator=g),
                       torch.randint(0, 10, (batch,), generator=g)),
                      (torch.randn(batch, 3, size, size, generator=g),
                       torch.randint(0, 10, (batch,), generator=g))) for size in (16, img)}

    def pmpl_step(base, size: int, dev: torch.device, cfg: PMPLConfig, autocast: bool = False,
                  dtype: torch.dtype = torch.float32):
        support, query = batches[size]
        net = copy.deepcopy(base).to(dev, dtype).train()
        search = ProgressiveMetaPooling(net, cfg, F.cross_entropy)
        s = (support[0].to(dev, dtype), support[1].to(dev))
        q = (query[0].to(dev, dtype), query[1].to(dev))
        rng = rng_state(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(net(s[0]), s[1])
        loss.backward()
        g_w = [p.grad if p.grad is not None else torch.zeros_like(p) for p in search.weights]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            g_alpha = search.hypergradient(s, q, g_w, rng)
        return loss.item(), _flat(g_w), _flat(g_alpha)

    # The reference is independent of the device under test: float64 on the CPU (on the CPU
    # smoke too, so that a broken comparison fails there as well).
    cpu = torch.device("cpu")
    first = PMPLConfig(inner_lr=0.01, order="first")
    loss_c, gw_c, ga_c = pmpl_step(smooth, 16, cpu, first, dtype=torch.float64)
    loss_d, gw_d, ga_d = pmpl_step(smooth, 16, device, first)
    result = {"tolerance": TOLERANCE, "reference": "float64 on the CPU",
              "loss_rel": abs(loss_d - loss_c) / abs(loss_c),
              "weight_grad_rel": _relative(gw_d, gw_c), "alpha_grad_rel": _relative(ga_d, ga_c)}
    result["gpu_matches_cpu"] = all(result[k] < TOLERANCE for k in
                                    ("loss_rel", "weight_grad_rel", "alpha_grad_rel"))
    exact = PMPLConfig(inner_lr=0.01, order="second", second_order_method="exact")
    fd = PMPLConfig(inner_lr=0.01, order="second")
    _, _, ga_x = pmpl_step(smooth, 16, device, exact)
    _, _, ga_x64 = pmpl_step(smooth, 16, cpu, exact, dtype=torch.float64)
    _, _, ga_f = pmpl_step(smooth, 16, device, fd)
    _, _, ga_f64 = pmpl_step(smooth, 16, cpu, fd, dtype=torch.float64)
    result["exact_second_order_finite"] = bool(torch.isfinite(ga_x).all())
    result["exact_vs_reference_rel"] = _relative(ga_x, ga_x64)
    result["exact_matches_reference"] = result["exact_vs_reference_rel"] < TOLERANCE
    result["finite_difference_vs_reference_rel"] = _relative(ga_f, ga_f64)
    result["finite_difference_matches_reference"] = \
        result["finite_difference_vs_reference_rel"] < TOLERANCE
    # DARTS' finite difference approximates the exact term (eps 0.01 / |dw|): a few percent
    result["finite_difference_vs_exact_rel"] = _relative(ga_f64, ga_x64)
    result["finite_difference_approximates_exact"] = \
        result["finite_difference_vs_exact_rel"] < FD_TOLERANCE
    # bf16 autocast of MobileNetV2's own search step against its float32 loss
    loss_f, _, _ = pmpl_step(mobilenet, img, device, first)
    loss_b, gw_b, _ = pmpl_step(mobilenet, img, device, first, autocast=True)
    result["bf16_loss_rel"] = abs(loss_b - loss_f) / abs(loss_f)
    result["bf16_ok"] = bool(torch.isfinite(gw_b).all()) and result["bf16_loss_rel"] < 2e-2
    # torch.compile of a fixed network against eager; the CPU smoke traces with the "eager"
    # backend (dynamo without code generation), so the branch runs in CI without a compiler
    net = build_model("mobilenetv2_100", "fixed", fixed_op="strip_pool",
                      num_classes=10).to(device).eval()
    x = batches[img][0][0].to(device)
    torch._dynamo.reset()
    with torch.no_grad():
        eager, compiled = net(x), torch.compile(net, backend=compile_backend)(x)
    result["compile_backend"] = compile_backend
    result["compiled_vs_eager_rel"] = _relative(compiled, eager)
    result["compiled_ok"] = result["compiled_vs_eager_rel"] < 1e-3
    print(json.dumps(result), flush=True)
    return result


def end_to_end(out: Path, sizes: dict, port: int | None = None) -> dict:
    """A generated dataset and two short runs through torchrun (1 process: the NCCL path)."""
    from experiments.distributed import free_port
    from experiments.metrics import read_metrics

    port = port or free_port()
    # data and runs outside OUT: only the logs come back (the device tool returns few files)
    work = Path(tempfile.mkdtemp(prefix="metapool-gpu-check-"))
    sets = [f"data.out_dir={work / 'data'}", f"runs_dir={work / 'runs'}",
            "data.loader.backend=torchvision", f"data.loader.workers={sizes['workers']}",
            f"data.default.classes={sizes['classes']}",
            f"data.default.train_per_class={sizes['train']}",
            f"data.default.val_per_class={sizes['val']}", f"data.default.size={sizes['size']}",
            f"recipes.default.img_size={sizes['img']}", f"recipes.default.batch_size={sizes['batch']}",
            f"recipes.default.lr_base_batch={sizes['batch']}",
            f"recipes.default.epochs={sizes['epochs']}", f"train.threads={sizes['threads']}"]
    cli = [sys.executable, "-m", "experiments.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    set_args = [a for s in sets for a in ("--set", s)]
    prep = subprocess.run([*cli, "data", "prepare", "--params", str(REPO / "params.yaml"),
                           "--out", str(work / "data"), *set_args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    (out / "prepare.log").write_text(prep.stdout + prep.stderr)
    runs = {"prepare_exit": prep.returncode}
    for variant in ("baseline", "pmpl"):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
             f"--master_port={port}", "-m", "experiments.cli", "train", "--params",
             str(REPO / "params.yaml"), "--variant", variant, "--seed", "0", *set_args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        log = proc.stdout + proc.stderr
        (out / f"train_{variant}.log").write_text(log)
        found = sorted((work / "runs").glob(f"*/{variant}/seed0/metrics.json"))  # runs/GROUP/...
        metrics = read_metrics(found[0]).model_dump(exclude_none=True) if found else {}
        runs[variant] = {
            "exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "epoch_lines": [json.loads(line) for line in log.splitlines()
                            if line.startswith('{"epoch"')],
            **{k: metrics.get(k) for k in ("top1", "val_loss", "world_size", "train_images_per_s",
                                           "frozen_ops") if k in metrics}}
        print(json.dumps({variant: {k: v for k, v in runs[variant].items()
                                    if k != "epoch_lines"}}), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return runs


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env['device_name']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), driver "
             f"{env.get('driver', '-')}, timm {env['timm']}, Python {env['python']}; "
             f"{report['seconds']:.0f} s in all.", "",
             "## Training step throughput", "",
             "| step | compiled | img | batch | images/s | step ms | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["throughput"]:
        lines.append(f"| {r['model']} | {r['compile']} | {r['img_size']} | {r['batch']} | "
                     f"{r['images_per_s']} | {r['step_ms']} | {r['peak_mem_gib']} |")
    lines += ["", "## Run-time estimate (8 GPUs)", "",
              "| recipe | batch/GPU | baseline h | PMPL h | published h | baseline GPU-h | "
              "PMPL GPU-h | published GPU-h |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in report["estimate"]:
        pub = e.get("published", {})
        lines.append(f"| {e['recipe']} | {e['batch_per_gpu']} | {e['baseline']['hours']} | "
                     f"{e['pmpl']['hours']} | {pub.get('hours', '-')} | "
                     f"{e['baseline']['gpu_hours']} | {e['pmpl']['gpu_hours']} | "
                     f"{pub.get('gpu_hours', '-')} |")
    lines += ["", "## Correctness", "", "| check | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in report["correctness"].items()]
    lines += ["", "## End to end (torchrun, 1 process, torchvision loader)", "",
              "| run | exit | seconds | top-1 | world size |", "| --- | --- | --- | --- | --- |"]
    for variant in ("baseline", "pmpl"):
        r = report["end_to_end"].get(variant, {})
        lines.append(f"| {variant} | {r.get('exit')} | {r.get('seconds')} | {r.get('top1')} | "
                     f"{r.get('world_size')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json/.md and the logs")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        device, sizes, compile_models = torch.device("cpu"), SMOKE, False
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device: run it on the GPU machine, or add --cpu-smoke",
              file=sys.stderr)
        return 2
    else:
        device, sizes, compile_models = torch.device("cuda"), FULL, True
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    report = {"environment": environment(device), "mode": "cpu-smoke" if args.cpu_smoke else "gpu"}
    report["throughput"] = throughput(device, sizes, compile_models)
    report["estimate"] = estimate(device, sizes)
    report["correctness"] = correctness(device, sizes,
                                        "inductor" if compile_models else "eager")
    report["end_to_end"] = end_to_end(out, sizes)
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    failed = [k for k in ("gpu_matches_cpu", "bf16_ok", "exact_second_order_finite",
                          "exact_matches_reference", "finite_difference_matches_reference",
                          "finite_difference_approximates_exact", "compiled_ok") if report["correctness"].get(k) is False]
    failed += [v for v in ("baseline", "pmpl") if report["end_to_end"][v]["exit"] != 0]
    print(f"gpu_check: wrote {out}/gpu_check.json and gpu_check.md in "
          f"{report['seconds']:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
