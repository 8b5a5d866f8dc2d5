"""Admission control: a bound on generation requests queued or running on the engine, shared by every front end.

Contract: `Admission(limit)`; `admit()` returns a `Ticket` or raises `Overloaded` when `limit` requests already hold
one (HTTP answers 429 with `Retry-After`, ZeroMQ `busy`). A ticket is held from before the prompt is tokenised until
the turn ends; `Ticket.release()` is idempotent, and a ticket dropped without it (a streaming response whose client
left before it started) is released when it is garbage-collected. `snapshot()` is the one place the counts are read
(`/sloth/status` shows it; metrics read it too): limit, in_flight, admitted_total, refused_total.
"""

from __future__ import annotations

from typing import Callable

RETRY_AFTER_S = 1


class Overloaded(RuntimeError):
    """The engine already has `limit` requests queued or running."""

    retry_after_s = RETRY_AFTER_S


class Ticket:
    def __init__(self, admission: "Admission"):
        self._admission: Admission | None = admission
        self._on_release: list[Callable[[], None]] = []

    def on_release(self, fn: Callable[[], None]) -> None:
        """Also run `fn` when the ticket is released (e.g. free an idempotency key the turn did not complete)."""
        self._on_release.append(fn)

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release()
            self._admission = None
            for fn in self._on_release:
                fn()
            self._on_release.clear()

    def __del__(self) -> None:
        self.release()


class Admission:
    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self.admitted_total = 0
        self.refused_total = 0

    def admit(self) -> Ticket:
        if self.in_flight >= self.limit:
            self.refused_total += 1
            raise Overloaded(f"the server is busy: {self.in_flight} generation requests are queued or running "
                             f"(limit {self.limit}); retry shortly")
        self.in_flight += 1
        self.admitted_total += 1
        return Ticket(self)

    def _release(self) -> None:
        self.in_flight -= 1

    def snapshot(self) -> dict[str, int]:
        return {"limit": self.limit, "in_flight": self.in_flight, "admitted_total": self.admitted_total,
                "refused_total": self.refused_total}
