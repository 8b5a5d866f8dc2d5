"""A warm trainer: one long-lived trainer child process that keeps the (quantised) base model loaded between updates.

A fresh trainer process per update loads the base checkpoint and quantises it to NF4 every time (53 s of a 124 s
update for an 8B model on the H200, issue 17); a warm one pays that once. Isolation stays as with
`process.TrainerProcess`: the child runs `python -P -m sloth_daemon.trainer --serve DIR` in DIR (the runs folder:
no module is imported from the daemon's working directory) in its own process group (a signal to it never reaches
the daemon, and it dies with the daemon: PR_SET_PDEATHSIG), without the API key in its environment; one job at a
time.

Contract (the same `run`/`cancel`/`wait_gone` as `TrainerProcess`, so the updater can use either):
- `run(job, run_dir, on_progress, timeout_s)` writes `run_dir/job.json` (0600, as `process.write_job_file`), starts the child if none is alive, hands it
  the job, passes progress events on, and returns the job's `TrainResult` (`warm=True` when the base was already
  loaded). The child's stderr for that job goes to `run_dir/trainer.log`.
- A child that dies, prints no result or runs past `timeout_s` raises `TrainerFailed`; it is killed and forgotten,
  and the next `run` starts a fresh one (cold). A cancelled `run` (the daemon stopping an update) kills it at once.
- `preload(job)` starts the child and has it load the job's base at once (the daemon does so at start on CUDA,
  where loading and quantising takes most of a cold update), so the first update is warm too.
- `close()` ends the child (the daemon's stop). `pid` is the child's pid while one is alive.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Callable

from .job import TrainJob, TrainResult
from .launch import Launch
from .process import TrainerFailed, kill_group, trainer_env, write_job_file


class WarmTrainer:
    def __init__(self, log_path: Path, launch: Launch | None = None):
        self.log_path = log_path  # the child's stderr before its first job, and its start-up errors
        self.launch = launch or Launch()  # a single process (`Launch.warm`); its env holds the placement's GPUs
        if not self.launch.warm:
            raise ValueError("a warm trainer is one process; several devices train in a fresh torchrun per update")
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    def cancel(self) -> None:
        kill_group(self._proc)

    async def wait_gone(self) -> None:
        """Kill the child if it still runs and wait until it has exited (so it writes no more files)."""
        proc = self._proc
        self.cancel()
        if proc is not None:
            await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()  # the pipe's transport, before the event loop that owns it goes away
        self._proc = None

    async def close(self) -> None:
        await self.wait_gone()

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                # The log's folder on the command line says whose trainer it is (ps, the crash tests).
                *self.launch.command("--serve", str(self.log_path.parent)),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
                env={**trainer_env(os.environ), **self.launch.env}, limit=1 << 24, cwd=self.log_path.parent,
            )
        return self._proc

    async def preload(self, job: TrainJob) -> None:
        """Start the child and have it load `job`'s base now (without waiting for it), so that the first update
        finds the base loaded. Only the base model, quantisation and device of `job` matter."""
        job_file = self.log_path.parent / "warm-preload.json"
        await asyncio.to_thread(write_job_file, job_file, job.model_dump_json())
        proc = await self._ensure()
        assert proc.stdin is not None
        request = {"job": str(job_file), "log": str(self.log_path), "preload": True}
        proc.stdin.write((json.dumps(request) + "\n").encode())
        await proc.stdin.drain()

    async def run(self, job: TrainJob, run_dir: Path, on_progress: Callable[[dict], None], timeout_s: float) -> TrainResult:
        job_file = run_dir / "job.json"
        await asyncio.to_thread(write_job_file, job_file, job.model_dump_json())
        log_file = run_dir / "trainer.log"
        proc = await self._ensure()
        assert proc.stdin is not None
        closing: list[bool] = []
        try:
            proc.stdin.write((json.dumps({"job": str(job_file), "log": str(log_file)}) + "\n").encode())
            await proc.stdin.drain()
            result = await asyncio.wait_for(self._follow(proc, on_progress, closing), timeout_s)
        except asyncio.TimeoutError:
            await self.wait_gone()
            raise TrainerFailed(f"trainer ran past its {timeout_s:.0f}s limit and was killed") from None
        except (BrokenPipeError, ConnectionResetError):
            await self.wait_gone()
            raise TrainerFailed(f"the warm trainer was gone before the job started; see {self.log_path}") from None
        except BaseException:
            self.cancel()  # cancelled (the update is being stopped): killed now, reaped by `wait_gone`
            raise
        if result is None:
            code = await proc.wait()
            await self.wait_gone()
            raise TrainerFailed(f"trainer exited with code {code} before its result; see {log_file}")
        if closing:  # the child could not keep its base and ends now; the next update starts a fresh one
            await proc.wait()
            await self.wait_gone()
        return result

    @staticmethod
    async def _follow(proc: asyncio.subprocess.Process, on_progress: Callable[[dict], None],
                      closing: list[bool]) -> TrainResult | None:
        """Pass on events until this job's result (returned), or None when the child's output ends first. A preload's
        `loaded` event is not passed on; `closing` gets True when the child says it ends after this job."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a library printing to stdout; not ours
            kind = event.get("event")
            if kind == "result":
                event.pop("event")
                return TrainResult.model_validate(event)
            if kind == "closing":
                closing.append(True)
            elif kind != "loaded":
                on_progress(event)
        return None
