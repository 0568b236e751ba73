"""torch.distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # by torchrun: a process group (NCCL/gloo) and DDP, even for 1 process

    @property
    def enabled(self) -> bool:
        return self.launched or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def ddp(self, module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """``module`` under DistributedDataParallel on this process's device."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (e.g. a stop signal)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def same_everywhere(self, values: list[int]) -> bool:
        """True when every rank holds the same ``values``."""
        if not self.enabled:
            return True
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        low, high = t.clone(), t.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(torch.equal(low, high))

    def on_main(self, fn: Callable[..., T], *args, **kwargs) -> T | None:
        """``fn(*args, **kwargs)`` on rank 0 (its result), None on the other ranks: the one
        way rank-0-only work (files, logs, prints) is done."""
        return fn(*args, **kwargs) if self.is_main else None

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (for a local torchrun)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StopSignal:
    """While it lives, SIGTERM/SIGINT only set ``signum``: the training loop then saves a
    checkpoint and exits cleanly (``restore`` puts the old handlers back)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def cpu_threads(threads: int, dist: Dist) -> int:
    """``train.threads``, capped on the CPU so the processes of one machine do not
    oversubscribe its cores (spinning OpenMP threads slow training down by 10x or more)."""
    if dist.device.type != "cpu":
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    fits = max(1, (cores or 1) // local_procs)
    if threads > fits:
        if dist.local_rank == 0:
            print(f"train.threads={threads} x {local_procs} processes exceeds the {cores} "
                  f"cores: using {fits} threads per process", flush=True)
        return fits
    return threads


def init_distributed(device: str = "auto") -> Dist:
    """NCCL on GPUs, gloo on CPUs; a plain process (no torchrun) is rank 0 of 1. Under torchrun
    the process group and DDP are set up whatever the world size, so one process on one GPU
    runs the same code path (NCCL included) as eight. ``device`` (``train.device``): ``auto``
    takes this process's GPU when CUDA is available, ``cpu`` never touches CUDA, ``cuda``
    requires it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device={device!r} is invalid: choose from auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available here: use auto or cpu")
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if (launched or world > 1) and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device, launched)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
