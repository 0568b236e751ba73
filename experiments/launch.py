"""torchrun, as ``metapool train`` uses it: the same arguments, one-line failures.

    python -m experiments.launch --nproc_per_node=8 -m experiments.cli train --variant pmpl

This is torchrun's own launcher (``torch.distributed.run``) run in this process, so a SIGTERM
reaches its agent, which forwards it to every rank. A failing rank has already printed its
one-line error; instead of torchrun's traceback this adds one line and exits with the rank's
code (or 128 + signal when the launcher was stopped).
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

if TYPE_CHECKING:  # the launcher process itself never needs the schema (or timm)
    from experiments.config import Params


def relaunch_with_torchrun(params: Params, argv: list[str]) -> None:
    """When ``train.nproc``/``nnodes`` ask for it and we are not under torchrun, become torchrun.

    ``exec`` (not a child process) so that a SIGTERM from DVC, SLURM or the user reaches
    torchrun's agent (``experiments.launch``), which forwards it to every rank.
    """
    t = params.train
    if (t.nproc == 1 and t.nnodes == 1) or "LOCAL_RANK" in os.environ:
        return
    cmd = [sys.executable, "-m", "experiments.launch", f"--nproc_per_node={t.nproc}",
           f"--nnodes={t.nnodes}", f"--node_rank={t.node_rank}",
           f"--master_addr={t.master_addr}", f"--master_port={t.master_port}",
           "-m", "experiments.cli", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        print(f"metapool train: rank {rank} exited with code {failure.exitcode}: fix the error "
              "it printed above, then rerun the same command (finished epochs are kept)",
              file=sys.stderr)
        return code
    except SignalException as stop:
        print(f"metapool train: stopped by signal {int(stop.sigval)}; every rank saved its "
              "place: rerun the same command to resume", file=sys.stderr)
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
