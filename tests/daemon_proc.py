"""Running the real `sloth-daemon serve` as a child process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """`sloth-daemon serve` as a child process on a free port, logging to a file beside its state dir."""

    started: set["DaemonProcess"] = set()  # every one started, so a failed test's daemon is stopped (conftest)

    def __init__(self, state_dir: Path, *, env: dict[str, str] | None = None, args: list[str] | None = None):
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir.parent / f"daemon-{self.port}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = args or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "DaemonProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sloth_daemon.cli", "serve", "--port", str(self.port),
             "--state-dir", str(self.state_dir), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        DaemonProcess.started.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"daemon not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def http(self) -> httpx.Client:
        key = self.env.get("SLOTH_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=120, headers=headers)

    def wait_update(self, update_id: int, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        with self.http() as c:
            while time.monotonic() < deadline:
                u = c.get(f"/sloth/updates/{update_id}").json()
                if u["status"] != "running":
                    return u
                time.sleep(0.5)
        raise TimeoutError(f"update {update_id} still running after {timeout}s:\n{self.log()}")
