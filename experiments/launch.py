"""torchrun, as ``metapool train`` uses it: the same arguments, one-line failures.

    python -m experiments.launch --nproc_per_node=8 -m metapool.cli train --variant pmpl

This is torchrun's own launcher (``torch.distributed.run``) run in this process, so a SIGTERM
reaches its agent, which forwards it to every rank. A failing rank has already printed its
one-line error; instead of torchrun's traceback this adds one line and exits with the rank's
code (or 128 + signal when the launcher was stopped).
"""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


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
