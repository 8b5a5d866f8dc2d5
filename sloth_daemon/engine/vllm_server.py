"""The vLLM OpenAI server the vLLM engine talks to: started and supervised by the daemon, or an existing URL.

Contract:
- `VllmServer(model_path, served_name, cfg)`; `await start()` returns once `GET /health` answers 200 (or raises
  `VllmStartError` after `cfg.startup_timeout_s`, with the tail of vLLM's log). With `cfg.url` set nothing is
  started: the server there is waited for and used as it is (how serving scales past one box).
- Started mode runs `command()` (`<python> -m vllm.entrypoints.openai.api_server --model ... --enable-lora ...`
  on 127.0.0.1 and a free port, `--tensor-parallel-size` when `cfg.tensor_parallel_size` > 1) with
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and, when the daemon's `device` is `cuda:N`, `CUDA_VISIBLE_DEVICES` of
  GPUs N.. (`placement.serving_env`), in its own process group that dies
  with the daemon (PR_SET_PDEATHSIG). Every line vLLM prints goes to the `sloth_daemon.vllm` logger.
- If the process dies while the daemon runs, it is started again after a backoff (1 s doubling to 30 s, reset after
  a start that lived 60 s), and `on_restart()` (set by the engine: reload the current adapter) runs once it is
  healthy. `generation` counts starts, so callers can tell that adapters loaded before were lost.
- `state` is one of starting, ready, restarting, sleeping, stopped, failed; `describe()` is the status dict.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from ..placement import serving_env

log = logging.getLogger("sloth_daemon.vllm")

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
BACKOFF_START_S, BACKOFF_MAX_S, STABLE_AFTER_S = 1.0, 30.0, 60.0
PR_SET_PDEATHSIG = 1


class VllmStartError(RuntimeError):
    """vLLM did not become healthy in time (the message holds the end of its log)."""


def lora_rank_for(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds adapters of rank `rank`."""
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class VllmServer:
    def __init__(self, model_path: Path, served_name: str, cfg: Any, *, lora_rank: int = 16, device: str = "auto"):
        self.model_path = Path(model_path)
        self.device = device  # the config's `device`: cuda:N pins the server to GPUs N.. (`placement.serving_env`)
        self.served_name = served_name
        self.cfg = cfg  # a config.VllmConfig
        self.lora_rank = lora_rank_for(cfg.max_lora_rank or lora_rank)
        self.external = bool(cfg.url)
        self.port = 0 if self.external else free_port()
        self.url = cfg.url.rstrip("/") if self.external else f"http://127.0.0.1:{self.port}"
        self.state = "stopped"
        self.generation = 0
        self.restarts = 0
        self.last_exit: str | None = None
        self.on_restart: Callable[[], Awaitable[None]] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self.ready = asyncio.Event()
        self.serving_args: list[str] = []  # set by the engine: --chat-template, the tool parser (`vllm_tools`)

    # -- the command line -------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        c = self.cfg
        cmd = [c.python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model_path), "--served-model-name", self.served_name,
               "--enable-lora", "--max-lora-rank", str(self.lora_rank), "--max-loras", str(c.max_loras),
               "--host", "127.0.0.1", "--port", str(self.port),
               "--gpu-memory-utilization", str(c.gpu_memory_utilization), "--dtype", c.dtype]
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if getattr(c, "tensor_parallel_size", 1) > 1:
            cmd += ["--tensor-parallel-size", str(c.tensor_parallel_size)]
        if c.sleep_during_updates:
            cmd += ["--enable-sleep-mode"]
        return cmd + self.serving_args + shlex.split(c.extra_args)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "SLOTH_API_KEY"}  # vLLM has no use for the daemon's key
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.update(serving_env(self.device, getattr(self.cfg, "tensor_parallel_size", 1), os.environ))
        if self.cfg.sleep_during_updates:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up are dev-mode endpoints
        return env

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self.state = "starting"
        if self.external:
            log.info("using the vLLM server at %s", self.url)
            await self._wait_healthy(None)
            self.generation += 1
        else:
            await self._spawn()
            self._task(self._supervise())
        self.state = "ready"
        self.ready.set()

    async def stop(self) -> None:
        self._stopping = True
        self.state = "stopped"
        self.ready.clear()
        for t in list(self._tasks):
            t.cancel()
        await self._kill(graceful=True)

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "url": self.url, "managed": not self.external,
                "pid": self._proc.pid if self._proc and self._proc.returncode is None else None,
                "restarts": self.restarts, "last_exit": self.last_exit}

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def _task(self, coro: Any) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _spawn(self) -> None:
        cmd = self.command()
        log.info("starting vLLM: %s", shlex.join(cmd))
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=self.environment(), preexec_fn=_die_with_parent)
        self._task(self._pump_log(self._proc))
        try:
            await self._wait_healthy(self._proc)
        except BaseException:
            await self._kill(graceful=False)
            raise
        self.generation += 1
        log.info("vLLM is ready at %s (pid %d)", self.url, self._proc.pid)

    async def _pump_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._tail.append(line)
                log.info("%s", line)

    async def _wait_healthy(self, proc: asyncio.subprocess.Process | None) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                if proc is not None and proc.returncode is not None:
                    raise VllmStartError(f"vLLM exited with status {proc.returncode} while starting:\n"
                                         + "\n".join(self._tail))
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.5)
        raise VllmStartError(f"vLLM at {self.url} not healthy after {self.cfg.startup_timeout_s:.0f} s:\n"
                             + "\n".join(self._tail))

    async def _kill(self, graceful: bool) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        # The API server has engine-core children; the whole process group (ours, by setsid) goes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            await asyncio.wait_for(proc.wait(), 20 if graceful else 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _supervise(self) -> None:
        backoff = BACKOFF_START_S
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            # Not proc.wait(): that also waits for stdout to close, which vLLM's engine-core child (same pipe)
            # keeps open after the API server itself died.
            while proc.returncode is None:
                await asyncio.sleep(0.2)
            code = proc.returncode
            if self._stopping:
                return
            with contextlib.suppress(ProcessLookupError):  # leftover engine-core children of the dead server
                os.killpg(proc.pid, signal.SIGKILL)
            self.ready.clear()
            self.state = "restarting"
            self.restarts += 1
            self.last_exit = f"exit status {code} at {time.strftime('%Y-%m-%d %H:%M:%S')}"
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = BACKOFF_START_S
            log.error("vLLM died (%s); restarting in %.0f s", self.last_exit, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            try:
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                await self._spawn()
            except Exception as e:
                log.error("vLLM restart failed: %s", e)
                continue  # _proc is dead: the loop waits on it at once and backs off again
            if self.on_restart is not None:
                try:
                    await self.on_restart()
                except Exception:
                    log.exception("after the vLLM restart: restoring the served adapter failed")
            self.state = "ready"
            self.ready.set()

    # -- sleep mode -------------------------------------------------------------------------------------------------
    async def sleep(self) -> None:
        """Free the GPU memory vLLM holds (weights offloaded, KV cache dropped); serving pauses until wake()."""
        self.ready.clear()
        self.state = "sleeping"
        async with httpx.AsyncClient(timeout=120) as client:
            r = await client.post(self.url + "/sleep", params={"level": 1})
            r.raise_for_status()

    async def wake(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=120) as client:
                r = await client.post(self.url + "/wake_up")
                r.raise_for_status()
        finally:
            self.state = "ready"
            self.ready.set()
