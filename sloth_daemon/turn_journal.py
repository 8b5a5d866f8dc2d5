"""The turn journal: answered turns the replay store could not take yet, kept durably until it can.

File format (`<state_dir>/turn-journal.jsonl`): one JSON object per line, each the keyword arguments of
`ReplayStore.log_interaction` for one turn (`id`, `kind`, `prompt`, `response`, ...). Lines are appended and
fsynced before the client is answered, so a journaled turn survives a crash. A torn last line (a crash mid-append)
is skipped when the file is read.

Contract (not thread-safe: the store worker calls it from its writer thread only):
- `append(record)` adds one turn; `pending_ids` are the ids waiting.
- `drain_into(store)` logs each waiting turn (a turn already in the store counts as done: the drain is idempotent)
  and rewrites the file atomically with those still waiting; it stops at the first busy/failed write, which is
  raised to the caller. A record the store refuses outright (`InvalidInput` other than "already logged") is moved
  to `turn-journal.rejected.jsonl` beside it and logged as an error, so one bad line never blocks the rest.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sloth_replay import InvalidInput, ReplayStore

from .durable import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)


class TurnJournal:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._records: list[dict] = self._read()
        self.pending_ids: set[str] = {r["id"] for r in self._records}

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("turn journal %s: line %d is torn (a crash mid-write?); skipped", self.path, n)
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                records.append(rec)
        return records

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8", errors="surrogatepass"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.path.parent)
        self._records.append(record)
        self.pending_ids.add(record["id"])

    def drain_into(self, store: ReplayStore) -> int:
        done = 0
        try:
            while self._records:
                rec = self._records[0]
                try:
                    store.log_interaction(**rec)
                except InvalidInput as e:
                    if "already logged" not in str(e):
                        self._reject(rec, str(e))
                self._records.pop(0)
                self.pending_ids.discard(rec["id"])
                done += 1
        finally:
            if done:
                self._rewrite()
        return done

    def _rewrite(self) -> None:
        if not self._records:
            self.path.unlink(missing_ok=True)
            fsync_dir(self.path.parent)
            return
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._records))

    def _reject(self, rec: dict, why: str) -> None:
        log.error("turn journal: turn %s cannot be stored (%s); kept in %s", rec["id"], why,
                  self.path.with_suffix(".rejected.jsonl"))
        with open(self.path.with_suffix(".rejected.jsonl"), "a", encoding="utf-8", errors="surrogatepass") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
