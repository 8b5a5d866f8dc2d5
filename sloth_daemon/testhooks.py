"""Test hooks: hold the daemon at a named point so a test can act exactly there (SIGKILL it, press Ctrl-C).

Only tests set `SLOTH_TESTHOOK_DIR`; unset (always, in real use) a hook costs one environment lookup. With it set, a
hook point `P` holds when the file `<dir>/pause-P` exists: it writes `<dir>/paused-P` (the daemon's pid) and waits
until the test removes `pause-P` (checked every 50 ms) or kills the daemon. The test decides at run time which
point to arm, so one daemon can run ordinary updates first.

Points:
- `update-trained`: in `Updater._run`, the trainer has returned (status still shows the running update with its
  whole loss curve) and the gate has not judged the candidate yet (the event loop keeps serving while it holds).
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


def _reached(point: str) -> Path | None:
    """The armed pause file of `point` (after writing `paused-<point>`), or None."""
    folder = os.environ.get(DIR_ENV)
    if not folder or not (Path(folder) / f"pause-{point}").exists():
        return None
    (Path(folder) / f"paused-{point}").write_text(str(os.getpid()))
    return Path(folder) / f"pause-{point}"


def hold(point: str) -> None:
    """Block the calling thread at `point` while the hook is armed."""
    pause = _reached(point)
    while pause is not None and pause.exists():
        time.sleep(0.05)


async def hold_async(point: str) -> None:
    """Suspend the calling task at `point` while the hook is armed; the event loop runs on."""
    pause = _reached(point)
    while pause is not None and pause.exists():
        await asyncio.sleep(0.05)
