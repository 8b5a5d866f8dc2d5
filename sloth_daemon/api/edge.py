"""What the HTTP edge enforces around every request, before and beside the routes (a pure ASGI middleware).

Contract (`EdgeGuard(app, limits)`, outermost in the app; `limits()` returns the live `(max_body_bytes, body_timeout_s)`):
- Body size: a `Content-Length` over `max_body_bytes` is answered 413 before a byte of the body is read; a chunked
  body is counted as it arrives and refused with 413 as soon as it passes the limit. The body is never buffered
  here, and the route never sees a refused body, so memory stays where it was.
- Slow bodies: the whole body must arrive within `body_timeout_s` of the request head, else 408 (the connection
  is closed). Slow request heads are uvicorn's side (`SlowHeadProtocol` below): a head not complete within
  `header_timeout_s` of the connection (or of the previous response, on a kept-alive connection) closes it.
- Disconnects: once the body is in, a client that hangs up cancels the route's task at once, streaming or not, so
  its generation stops at the next token and an undelivered turn is not logged. A request whose response is
  complete is never cancelled.
Errors are OpenAI-style bodies (`api/errors.py`).

Why our own code: Starlette/uvicorn have no request body limit and no body-read deadline, and a non-streaming route
is not cancelled when its client goes away; uvicorn has no timeout for a request head (only `timeout_keep_alive`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError


class _Refused(Exception):
    def __init__(self, error: APIError):
        self.error = error


class EdgeGuard:
    def __init__(self, app: Any, limits: Callable[[], tuple[int, float]]):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_body, body_timeout = self.limits()
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > max_body):
            what = f"{int(length)} bytes" if length.isdigit() else "an invalid Content-Length"
            await _send_error(send, APIError(413, f"request body of {what} exceeds the limit of {max_body} bytes "
                                             "(limits.max_request_bytes)", code="request_too_large"))
            return

        body_done = asyncio.Event()
        response = {"started": False, "complete": False}
        refusal: asyncio.Future[APIError] = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + body_timeout
        received = 0

        async def guarded_receive() -> dict:
            nonlocal received
            if body_done.is_set():
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                error = APIError(408, f"the request body did not arrive within {body_timeout:g} s "
                                 "(http_body_timeout_s)", code="request_timeout")
                return await _refuse(error)
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > max_body:
                    return await _refuse(APIError(413, f"request body exceeds the limit of {max_body} bytes "
                                                  "(limits.max_request_bytes)", code="request_too_large"))
                if not msg.get("more_body", False):
                    body_done.set()
            else:
                body_done.set()  # http.disconnect
            return msg

        async def _refuse(error: APIError) -> dict:
            if not refusal.done():
                refusal.set_result(error)
            await asyncio.Future()  # the route's task is cancelled from outside
            raise AssertionError("unreachable")

        async def guarded_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                response["started"] = True
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                response["complete"] = True
            await send(msg)

        async def watch_disconnect() -> None:
            await body_done.wait()
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return

        app_task = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))
        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            await asyncio.wait({app_task, watcher, refusal}, return_when=asyncio.FIRST_COMPLETED)
            if not app_task.done():
                if refusal.done():
                    app_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await app_task
                    if not response["started"]:
                        await _send_error(send, refusal.result(), close=True)
                    return
                if watcher.done() and not response["complete"]:
                    app_task.cancel()  # the client went away: stop its work now
            with contextlib.suppress(asyncio.CancelledError):
                await app_task
        finally:
            watcher.cancel()
            if not app_task.done():
                app_task.cancel()


async def _send_error(send: Callable, error: APIError, *, close: bool = False) -> None:
    response = error.response()
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


class SlowHeadProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (`header_timeout_s`, set by the daemon):
    a client that opens a connection, or keeps one alive, and sends its request line and headers too slowly is cut
    off instead of holding a connection forever (slowloris)."""

    header_timeout_s = 10.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)
        self._head_cycle = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._head_cycle:  # a request head was parsed
            self._head_cycle = self.cycle
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # kept alive: the next head gets its own deadline
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(self.header_timeout_s + self.timeout_keep_alive,
                                                    self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle is self._head_cycle) and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()
