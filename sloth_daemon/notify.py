"""The systemd notify protocol (`sd_notify`), spoken by hand: readiness, status lines, watchdog pings, reload, stop.

Contract:
- `Notifier.from_environment()` reads `$NOTIFY_SOCKET` (a socket path, or `@name` for the abstract namespace) and
  `$WATCHDOG_USEC` / `$WATCHDOG_PID`, then removes them from `os.environ`, so child processes (the trainer, an
  engine server) never speak to systemd as if they were the service. Without `$NOTIFY_SOCKET` every call is a
  no-op: `serve` behaves the same in a terminal.
- Each call sends one datagram of newline-separated `KEY=value` assignments. Sending never raises: a service
  manager that went away must not take the daemon down (the first failure is logged).
- `ready()` sends `READY=1`; `status(text)` sends `STATUS=text` only when the text changed; `reloading()` sends
  `RELOADING=1` with `MONOTONIC_USEC` (follow it with `ready()`); `stopping()` sends `STOPPING=1`.
- `watchdog_interval` is half of `$WATCHDOG_USEC` in seconds (None when no watchdog is asked for, or it is meant for
  another pid). `run_watchdog()` pings `WATCHDOG=1` at that interval from the event loop it runs on, so a blocked
  loop stops the pings and systemd kills and restarts the daemon.

No systemd library is needed: the protocol is a datagram to a Unix socket (see sd_notify(3)).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Mapping, MutableMapping

log = logging.getLogger(__name__)

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(raw: str) -> str | bytes:
    """`@name` is Linux's abstract namespace: the address is a NUL byte followed by the name."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    target = env.get("WATCHDOG_PID", "")
    if target and target != str(pid):
        return None  # systemd asked another process (our parent, in a wrapper) for pings
    # Half the timeout, as sd_watchdog_enabled(3) advises: one late ping still lands in time.
    return int(usec) / 2e6


class Notifier:
    def __init__(self, address: str | None, watchdog_interval: float | None = None):
        self.address = address
        self.watchdog_interval = watchdog_interval if address else None
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None) -> "Notifier":
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        interval = _watchdog_interval(env, os.getpid())
        for key in _ENV_KEYS:
            env.pop(key, None)
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram. Returns whether it was sent."""
        if not self.address:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, _socket_address(self.address))
            return True
        except OSError as e:
            if not self._warned:
                log.warning("could not notify the service manager at %s: %s", self.address, e)
                self._warned = True
            return False

    def ready(self, status: str | None = None) -> None:
        lines = ["READY=1"]
        if status is not None:
            lines.append(self._status_line(status))
        self.send(*lines)

    def status(self, text: str) -> None:
        if text != self._last_status:
            self.send(self._status_line(text))

    def _status_line(self, text: str) -> str:
        self._last_status = text
        return "STATUS=" + " ".join(text.split())  # one line: the protocol is line-based

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> None:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(self._status_line(status))
        self.send(*lines)

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping until cancelled. Runs on the daemon's event loop on purpose: if the loop hangs, pings stop."""
        if self.watchdog_interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
