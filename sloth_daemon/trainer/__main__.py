"""Child-process entry point.

`python -m sloth_daemon.trainer JOB.json` runs one job (loads the base, trains, saves) and prints JSON lines.
`python -m sloth_daemon.trainer --serve DIR` is a warm trainer (`warm.py`): it reads one request per stdin line,
`{"job": JOB.json, "log": trainer.log}`, sends its stderr to that log, runs the job on the base model it keeps
loaded between jobs (loaded again only when the base, quantisation or device changes), prints the job's JSON lines
ending with its result, and waits for the next line; end of input ends it. A job that raises ends the process
(exit code 1, traceback in the job's log): a half-trained base is never reused.
"""

import ctypes
import json
import os
import signal
import sys

from .job import TrainJob
from .recipe import load_base, run, train_on

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


def emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def serve() -> int:
    """The warm trainer's loop (see the module docstring)."""
    import time

    loaded_key, base, tokenizer = None, None, None
    for line in sys.stdin:
        request = json.loads(line)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 2)
        os.close(log)
        job = TrainJob.model_validate_json(open(request["job"]).read())
        key = (job.base_model, job.quantize, job.device)
        phases = {}
        warm = key == loaded_key
        if not warm:
            base = tokenizer = None  # the old base goes before the new one loads
            started = time.monotonic()
            base, tokenizer = load_base(job)
            loaded_key = key
            phases["load"] = round(time.monotonic() - started, 4)
            emit({"event": "phase", "phase": "load", "time": time.time()})
        result, base = train_on(base, tokenizer, job, emit, warm=warm, phases=phases)
        emit({"event": "result", **result.model_dump()})
    return 0


def main() -> int:
    die_with_parent()
    if sys.argv[1:2] == ["--serve"]:  # its second argument (the daemon's runs folder) only labels the process
        return serve()
    job = TrainJob.model_validate_json(open(sys.argv[1]).read())
    result = run(job, emit)
    emit({"event": "result", **result.model_dump()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
