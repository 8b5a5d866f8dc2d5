"""One daemon per state dir: an advisory lock (`flock`) on `<state_dir>/daemon.lock`, held for the process's life.

Contract: `StateDirLock(state_dir).acquire()` takes the lock without waiting and writes the holder's description
(pid, host, start time, command line) into the file; if another process holds it, `StateDirLocked` is raised with
a message naming that holder (read from the file). The lock goes with the process (kill -9 included: the kernel
drops a dead process's `flock`), so a stale file never blocks a restart; `release()` drops it earlier.
CLI commands that only read the store (`replay stats`) do not take it.

Why our own code: `fcntl.flock` is the whole mechanism; a lock-file library would add a dependency for ten lines.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "daemon.lock"


class StateDirLocked(RuntimeError):
    """Another process (named in the message) already runs a daemon on this state dir."""


class StateDirLock:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise StateDirLocked(f"another sloth-daemon already uses the state dir {self.path.parent} ({holder}); "
                                 "stop it first, or give this one another --state-dir") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": int(time.time()),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started_at"]))
        return f"pid {info['pid']} on {info['host']}, started {started}: {' '.join(info.get('argv') or [])}"
    except Exception:
        return "holder unknown"
