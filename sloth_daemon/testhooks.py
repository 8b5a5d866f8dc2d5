"""Test hooks for crash tests: hold the daemon at a named point so a test can SIGKILL it exactly there.

Only the crash-safety tests (tests/test_crash_safety.py) set `SLOTH_TESTHOOK_DIR`; unset (always, in real use) a
hook costs one environment lookup. With it set, a hook point `P` holds when the file `<dir>/pause-P` exists: it
writes `<dir>/paused-P` (the daemon's pid) and never continues; the test then kills the daemon. The test decides
at run time which point to arm, so one daemon can run ordinary updates first.

Points:
- `adapter-commit`: in `AdapterRegistry.commit`, the staging folder holds the fully written, fsynced adapter and
  has not been renamed to its version yet (the daemon's whole process stops there, as a crash would stop it).
- `adapter-swap`: in `Updater.promote`, the engine already serves the new version in memory and CURRENT on disk
  still names the old one (the event loop keeps serving requests while it holds).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

DIR_ENV = "SLOTH_TESTHOOK_DIR"


def _reached(point: str) -> bool:
    folder = os.environ.get(DIR_ENV)
    if not folder or not (Path(folder) / f"pause-{point}").exists():
        return False
    (Path(folder) / f"paused-{point}").write_text(str(os.getpid()))
    return True


def hold(point: str) -> None:
    """Block the calling thread forever at `point` when the hook is armed."""
    if _reached(point):
        while True:
            time.sleep(3600)


async def hold_async(point: str) -> None:
    """Suspend the calling task forever at `point` when the hook is armed; the event loop runs on."""
    if _reached(point):
        await asyncio.Event().wait()
