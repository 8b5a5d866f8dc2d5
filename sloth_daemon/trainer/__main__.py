"""Child-process entry point: `python -m sloth_daemon.trainer JOB.json` runs the recipe and prints JSON lines."""

import ctypes
import json
import os
import signal
import sys

from .job import TrainJob
from .recipe import run

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """If the daemon is killed (even with SIGKILL) this trainer dies too, instead of training on as an orphan."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return  # not Linux: the daemon's start-up still marks the update failed and removes its staging folder
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def main() -> int:
    die_with_parent()
    job = TrainJob.model_validate_json(open(sys.argv[1]).read())

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    result = run(job, emit)
    emit({"event": "result", **result.model_dump()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
