"""Forgetting on request, the daemon's side: stop a running update, delete from the replay store, mark the adapters
trained on the deleted data as tainted, and rebuild the served adapter without it.

Contract (`forget`):
1. A running update is stopped first (recorded as failed; its remaining examples are pending again): it may be
   training on what is about to be deleted, and must not finish on data that is gone.
2. `sloth_replay.forgetting.forget` deletes the selection and records the tainted versions, in one transaction.
3. The registry mirrors the store's taint record (`mark_tainted`; also run at start-up, so a crash between 2 and 3
   is repaired there: the store is the record, the registry's marks follow it).
4. `Updater.rebuild_if_needed` starts a rebuild when the served version is tainted (a fresh LoRA on what remains; the
   tainted version is served until the rebuild is promoted), or serves the base model when nothing remains. A crash
   before or during the rebuild leaves the served version tainted, and start-up starts the rebuild again.
Returns the store's result plus `stopped_update` (id or None) and `rebuild` ({update_id, status} or None).
Raises the store's `NotFound` / `InvalidInput`, `store_worker.StoreBusy` while another process holds the store's
lock, or `UpdateAlreadyRunning` if an update would not stop. Store calls run on the store worker's threads, the
registry's file I/O in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sloth_replay import UpdateAlreadyRunning
from sloth_replay import forgetting as store_forgetting

if TYPE_CHECKING:
    from .adapters import AdapterRegistry
    from .store_worker import StoreWorker
    from .updater import Updater

log = logging.getLogger(__name__)

STOP_REASON = "stopped: a forget request deletes training data (the examples it had not learnt are pending again)"


async def mark_tainted(store: "StoreWorker", registry: "AdapterRegistry") -> list[str]:
    """Mirror the store's tainted versions into the registry; returns the versions newly marked."""
    tainted = await store.read(store_forgetting.tainted_adapters, patience_s=60.0)
    marked = await asyncio.to_thread(registry.mark_tainted, tainted)
    if marked:
        log.warning("forgetting: %s trained on forgotten data: marked tainted", ", ".join(marked))
    return marked


async def forget(updater: "Updater", store: "StoreWorker", registry: "AdapterRegistry", selection: dict[str, Any]
                 ) -> dict:
    """Forget `selection` (keyword arguments of `sloth_replay.forgetting.forget`); see the module docstring."""
    stopped = None
    for attempt in range(3):
        running = await store.read(lambda s: s.running_update())
        if running is not None:
            stopped = running["id"]
            await updater.stop(STOP_REASON)
        try:
            out = await store.write(lambda s: store_forgetting.forget(s, **selection))
            break
        except UpdateAlreadyRunning:  # one was past training and still finishing, or the scheduler started one
            if attempt == 2:
                raise
            await asyncio.sleep(1.0)
    await mark_tainted(store, registry)
    log.info("forgetting: request %d deleted %d example(s), %d feedback, %d turn(s); tainted: %s", out["forget_id"],
             out["examples"], out["feedback"], out["interactions"], ", ".join(out["tainted"]) or "none")
    return {**out, "stopped_update": stopped, "rebuild": await updater.rebuild_if_needed("forget")}
