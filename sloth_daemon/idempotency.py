"""Idempotent generation: a request retried with the same key within a window gets the first answer, not a new one.

Keys: HTTP's `Idempotency-Key` header, ZeroMQ's request `id` (each scoped to its transport). A key names one
request: its fingerprint (a hash of the validated turn: kind, prompt, sampling parameters, `store`) must match.

Contract: `IdempotencyCache(window_s)`; `claim(key, fingerprint)` returns the finished `TurnDone` of an earlier
request with that key (within `window_s` of its end), or None after reserving the key for the caller, who then
calls `complete(key, done)` or `abandon(key)` (a failed or cancelled request leaves nothing behind: its retry runs
again). `KeyConflict` is raised when the key is in use by a request still running or by a different request.
Only finished turns are kept, at most `MAX_ENTRIES` (oldest dropped first).

Why our own code: this is a dict with expiry times; the semantics are those of the IETF draft
"The Idempotency-Key HTTP Header Field" (httpapi-idempotency-key-header), which no library here implements.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any

MAX_ENTRIES = 10_000


class KeyConflict(RuntimeError):
    """The key is in use by a request still running, or was used for a different request."""


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode("utf-8", "surrogatepass")).hexdigest()


class IdempotencyCache:
    def __init__(self, window_s: float):
        self.window_s = window_s
        self._done: OrderedDict[str, tuple[float, str, Any]] = OrderedDict()  # key -> (expiry, fingerprint, done)
        self._running: dict[str, str] = {}  # key -> fingerprint

    def _expire(self) -> None:
        now = time.monotonic()
        while self._done and (next(iter(self._done.values()))[0] < now or len(self._done) > MAX_ENTRIES):
            self._done.popitem(last=False)

    def claim(self, key: str, fp: str) -> Any:
        self._expire()
        if key in self._running:
            raise KeyConflict("a request with this idempotency key is still running")
        if (entry := self._done.get(key)) is not None:
            if entry[1] != fp:
                raise KeyConflict("this idempotency key was used for a different request")
            return entry[2]
        self._running[key] = fp
        return None

    def complete(self, key: str, done: Any) -> None:
        fp = self._running.pop(key, None)
        if fp is not None and self.window_s > 0:
            self._done[key] = (time.monotonic() + self.window_s, fp, done)

    def abandon(self, key: str) -> None:
        self._running.pop(key, None)
