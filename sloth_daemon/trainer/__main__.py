"""Child-process entry point.

`python -m sloth_daemon.trainer JOB.json` runs one job (loads the base, trains, saves) and prints JSON lines.
`python -m sloth_daemon.trainer --serve DIR` is a warm trainer (`warm.py`): it reads one request per stdin line,
`{"job": JOB.json, "log": trainer.log}`, sends its stderr to that log, runs the job on the base model it keeps
loaded between jobs (loaded again only when the base, quantisation or device changes), prints the job's JSON lines
ending with its result, and waits for the next line; end of input ends it. With `"preload": true` it only loads
the job's base and trains the job's batches once into a scratch folder (a warm-up: on CUDA the Triton kernels
compile there, not in the first update), then prints `{"event": "loaded"}`. When the LoRA layers cannot be taken out of the base again it
prints `{"event": "closing"}` before the result and exits after it. A job that raises ends the process
(exit code 1, traceback in the job's log): a half-trained base is never reused.
Under torchrun (WORLD_SIZE > 1; `python -m sloth_daemon.trainer.distributed`) each worker runs its part of one
distributed update (`fsdp.py`); only process 0 prints.
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

    def load(spec: TrainJob, announce: bool = True) -> dict:
        nonlocal loaded_key, base, tokenizer
        key = (spec.base_model, spec.quantize, spec.device)
        if key == loaded_key:
            return {}
        base = tokenizer = None  # the old base goes before the new one loads
        started = time.monotonic()
        base, tokenizer = load_base(spec)
        loaded_key = key
        if announce:  # a phase of the update being run; a preload is no update's phase
            emit({"event": "phase", "phase": "load", "time": time.time()})
        return {"load": round(time.monotonic() - started, 4)}

    for line in sys.stdin:
        request = json.loads(line)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 2)
        os.close(log)
        job = TrainJob.model_validate_json(open(request["job"]).read())
        if request.get("preload"):  # load the base now, so that the first update finds it loaded
            seconds = load(job, announce=False).get("load", 0.0)
            if job.batches:  # and train a throwaway step: the kernels compile now, not in the first update
                import tempfile

                with tempfile.TemporaryDirectory() as scratch:
                    _, base = train_on(base, tokenizer, job.model_copy(update={"output_dir": scratch}),
                                       lambda event: None, warm=True)
                if base is None:
                    return 0
            emit({"event": "loaded", "seconds": seconds})
            continue
        phases = load(job)
        result, base = train_on(base, tokenizer, job, emit, warm=not phases, phases=phases)
        if base is None:
            loaded_key = None
            emit({"event": "closing"})  # this process cannot reuse its base: it ends after this result
        emit({"event": "result", **result.model_dump()})
        if base is None:
            return 0
    return 0


def main() -> int:
    die_with_parent()
    if sys.argv[1:2] == ["--serve"]:  # its second argument (the daemon's runs folder) only labels the process
        return serve()
    job = TrainJob.model_validate_json(open(sys.argv[1]).read())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of torchrun's workers (`trainer.distributed`)
        from .fsdp import run as run_part

        result = run_part(job, emit)
        if result is not None:  # process 0 only
            emit({"event": "result", **result.model_dump()})
        return 0
    result = run(job, emit)
    emit({"event": "result", **result.model_dump()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
