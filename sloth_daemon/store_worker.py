"""The replay store off the event loop: every SQLite call of the running daemon goes through here.

Contract:
- `StoreWorker(path, journal_path, busy_timeout_s)` opens the daemon's read-write `ReplayStore` (the only writer)
  and a second, read-only connection to the same file. Writes run one at a time on the `replay-writer` thread, reads
  on the `replay-reader` thread; the event loop only awaits them. WAL lets the reader go on while the writer (or
  another process) holds SQLite's write lock, so `/sloth/status` and friends keep answering when writes cannot.
- `await read(fn)` / `await write(fn)` run `fn(store)` on the matching thread and return its result. A call that
  cannot get SQLite's lock within `busy_timeout_s` of being *submitted* (time spent queued behind other calls
  counts) raises `StoreBusy` instead of waiting on: a locked database fails the affected call fast (HTTP 503 with
  `Retry-After`), it never freezes the daemon. `write(fn, patience_s=...)` waits longer, for the daemon's own
  bookkeeping that no client waits on (an update's verdict). `write_soon(fn)` submits without waiting (progress).
- `log_turn(record)` logs one answered turn (`ReplayStore.log_interaction` keyword arguments). If the store is busy
  or fails, the record goes to the journal (`turn_journal.TurnJournal`: an fsynced JSON-lines file) and the result
  is `"journaled"`; `retry_journal()` (called every `JOURNAL_RETRY_S` by `run_journal_retry()` and once at start)
  moves journaled turns into the store. A turn is reported logged only once its row is committed.
- Errors other than a busy database pass through unchanged (`InvalidInput`, `NotFound`, ...).

Why our own code: sqlite-utils stays the store's library (`ReplayStore`); what it lacks is an owner thread and a
deadline per call, which is a few lines over `concurrent.futures`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from sloth_replay import InvalidInput, ReplayStore, StoreError

from .turn_journal import TurnJournal

log = logging.getLogger(__name__)

T = TypeVar("T")
JOURNAL_RETRY_S = 2.0  # how often journaled turns are tried again while the journal is not empty
RETRY_AFTER_S = 1  # what a 503 for a busy store tells the client (seconds)


class StoreBusy(StoreError):
    """The replay store's database is locked (by another process, or by a long write): try again shortly."""

    retry_after_s = RETRY_AFTER_S


def _is_busy(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


class _Lane:
    """One connection owned by one thread; each call gets what is left of its deadline as SQLite's busy timeout."""

    def __init__(self, name: str, open_store: Callable[[], ReplayStore]):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.store: ReplayStore = self.pool.submit(open_store).result()

    def submit(self, fn: Callable[[ReplayStore], T], deadline: float) -> "Future[T]":
        return self.pool.submit(self._run, fn, deadline)

    def _run(self, fn: Callable[[ReplayStore], T], deadline: float) -> T:
        # Queued past its deadline: one attempt without waiting (a free database still answers at once).
        self.store.set_busy_timeout(max(0.0, deadline - time.monotonic()))
        try:
            return fn(self.store)
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise StoreBusy(f"the replay store is busy (database locked: {e}); retry shortly") from None
            raise

    def close(self) -> None:
        try:
            self.pool.submit(self.store.close).result()
        finally:
            self.pool.shutdown(wait=True)


class StoreWorker:
    def __init__(self, path: Path, journal_path: Path, *, busy_timeout_s: float = 2.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.journal = TurnJournal(journal_path)
        self._writer = _Lane("replay-writer", lambda: ReplayStore(self.path))
        try:
            self._reader = _Lane("replay-reader", lambda: ReplayStore.open_readonly(self.path))
        except BaseException:
            self._writer.close()
            raise
        self._closed = False

    # -- calls ----------------------------------------------------------------------------------------------------
    def _deadline(self, patience_s: float | None) -> float:
        return time.monotonic() + (self.busy_timeout_s if patience_s is None else patience_s)

    async def read(self, fn: Callable[[ReplayStore], T], *, patience_s: float | None = None) -> T:
        """`fn(store)` on the reader thread (a read-only connection: writes in `fn` raise `ReadOnlyStore`)."""
        return await asyncio.wrap_future(self._reader.submit(fn, self._deadline(patience_s)))

    async def write(self, fn: Callable[[ReplayStore], T], *, patience_s: float | None = None) -> T:
        """`fn(store)` on the writer thread; `StoreBusy` if SQLite's lock is not free within the patience."""
        return await asyncio.wrap_future(self._writer.submit(fn, self._deadline(patience_s)))

    def write_soon(self, fn: Callable[[ReplayStore], Any], what: str) -> None:
        """Submit a write without waiting for it (in order with the other writes); a failure is logged."""
        def done(f: "Future[Any]") -> None:
            if (e := f.exception()) is not None:
                log.warning("replay store: %s failed: %s", what, e)

        self._writer.submit(fn, self._deadline(None)).add_done_callback(done)

    # -- turns and the journal --------------------------------------------------------------------------------------
    async def log_turn(self, record: dict) -> Literal["logged", "journaled", "refused"]:
        """Log an answered turn, or journal it when the store cannot take it now. "refused": the store rejected
        the record itself (it would never be accepted; the error is logged)."""
        return await asyncio.wrap_future(self._writer.submit(lambda s: self._log_turn(s, record),
                                                             self._deadline(None)))

    def _log_turn(self, store: ReplayStore, record: dict) -> Literal["logged", "journaled", "refused"]:
        try:
            store.log_interaction(**record)
            return "logged"
        except InvalidInput as e:
            log.error("turn %s could not be logged: %s", record.get("id"), e)
            return "refused"
        except (StoreBusy, StoreError, sqlite3.Error) as e:
            log.warning("turn %s journaled, the replay store cannot take it now: %s", record.get("id"), e)
        self.journal.append(record)
        return "journaled"

    def is_journaled(self, turn_id: str) -> bool:
        return turn_id in self.journal.pending_ids

    async def retry_journal(self, *, patience_s: float | None = None) -> int:
        """Move journaled turns into the store; returns how many were committed (0 while it stays busy)."""
        if not self.journal.pending_ids:
            return 0
        return await asyncio.wrap_future(self._writer.submit(self.journal.drain_into, self._deadline(patience_s)))

    async def run_journal_retry(self) -> None:
        """Until cancelled: retry journaled turns every `JOURNAL_RETRY_S` while there are any."""
        while True:
            await asyncio.sleep(JOURNAL_RETRY_S)
            try:
                if n := await self.retry_journal():
                    log.info("replay store: %d journaled turn(s) logged", n)
            except StoreBusy:
                pass
            except Exception:
                log.exception("replay store: retrying the journal failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._reader.close()
        finally:
            self._writer.close()
