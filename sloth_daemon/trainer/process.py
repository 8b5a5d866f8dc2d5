"""Running a `TrainJob` in a child process and following it.

Contract: `run_training(job, run_dir, on_progress, timeout_s)` writes `run_dir/job.json` (0600 in a 0700 folder: it
holds the training data until retention strips the texts, `housekeeping.strip_job_texts`), starts
`python -P -m sloth_daemon.trainer` in `run_dir` (`-P` and `PYTHONSAFEPATH`: no module is imported from the daemon's
working directory or the run folder; `SLOTH_API_KEY` not in its environment), passes each progress event to
`on_progress`, appends the child's stderr to `run_dir/trainer.log`, and returns the `TrainResult`; a child that
crashes, exits non-zero, prints no result or runs past `timeout_s` raises `TrainerFailed` (the child is killed
first). `cancel()` kills a running child.
`TrainerProcess(launch)` starts it as `launch` says (`launch.py`: one process, or torchrun over several devices,
with the placement's environment added).
The child runs in its own process group so a signal to it never reaches the daemon, and its staging folder is the
caller's to remove.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Callable

from sloth_kernels.allocator import with_expandable_segments

from .job import TrainJob, TrainResult
from .launch import Launch

# Secrets the child has no use for (its job file carries all it needs): not passed on.
SECRET_ENV = ("SLOTH_API_KEY",)


def trainer_env(environ) -> dict[str, str]:
    """The trainer child's environment: ours without the API key (`SECRET_ENV`), unbuffered, with a safe import path
    (`PYTHONSAFEPATH`), with the kernels' allocator setting unless the user configured the allocator
    (`sloth_kernels.allocator`)."""
    env = {k: v for k, v in with_expandable_segments(environ).items() if k not in SECRET_ENV}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}


def write_job_file(job_file: Path, job_json: str) -> None:
    """The job file (0600: it holds a copy of the training data) in its folder (0700), for a worker thread."""
    job_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(job_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(job_json)


def _prepare_run_dir(run_dir: Path, job_file: Path, job_json: str):
    """The run folder (0700), the job file (0600) and the open trainer log (runs in a worker thread: file I/O)."""
    write_job_file(job_file, job_json)
    return open(run_dir / "trainer.log", "ab")


class TrainerFailed(RuntimeError):
    pass


def kill_group(proc: asyncio.subprocess.Process | None) -> None:
    """SIGKILL the process group of a trainer child that still runs (it was started in a session of its own)."""
    if proc is not None and proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class TrainerProcess:
    def __init__(self, launch: Launch | None = None) -> None:
        self.launch = launch or Launch()  # one process, or torchrun over several devices (`launch.py`)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def cancel(self) -> None:
        kill_group(self._proc)

    async def wait_gone(self) -> None:
        """Kill the child if it still runs and wait until it has exited (so it writes no more files)."""
        self.cancel()
        if self._proc is not None:
            await self._proc.wait()

    async def run(self, job: TrainJob, run_dir: Path, on_progress: Callable[[dict], None], timeout_s: float) -> TrainResult:
        job_file = run_dir / "job.json"
        log = await asyncio.to_thread(_prepare_run_dir, run_dir, job_file, job.model_dump_json())
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.launch.command(str(job_file)),
                stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
                env={**trainer_env(os.environ), **self.launch.env}, cwd=run_dir,
            )
            try:
                result = await asyncio.wait_for(self._follow(on_progress), timeout_s)
            except asyncio.TimeoutError:
                self.cancel()
                await self._proc.wait()
                raise TrainerFailed(f"trainer ran past its {timeout_s:.0f}s limit and was killed") from None
            except BaseException:
                self.cancel()
                raise
        finally:
            log.close()
        code = await self._proc.wait()
        if code != 0:
            raise TrainerFailed(f"trainer exited with code {code}; see {run_dir / 'trainer.log'}")
        if result is None:
            raise TrainerFailed(f"trainer printed no result; see {run_dir / 'trainer.log'}")
        return result

    async def _follow(self, on_progress: Callable[[dict], None]) -> TrainResult | None:
        assert self._proc and self._proc.stdout
        result = None
        async for raw in self._proc.stdout:
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a library printing to stdout; not ours
            if event.get("event") == "result":
                event.pop("event")
                result = TrainResult.model_validate(event)
            else:
                on_progress(event)
        await self._proc.wait()
        return result
