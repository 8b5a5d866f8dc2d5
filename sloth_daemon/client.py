"""A Python client for the daemon's ZeroMQ API: `SlothClient` (blocking) and `AsyncSlothClient` (asyncio).

    from sloth_daemon.client import SlothClient

    with SlothClient("ipc:///run/sloth-daemon/api.sock") as c:
        r = c.chat("What is sloth-daemon?")            # a Completion: text, interaction_id, usage, ...
        c.feedback(r.interaction_id, rating="up")
        stream = c.chat("Hello", stream=True)
        for text in stream:                              # text chunks as they are generated
            print(text, end="")
        print(stream.final.interaction_id)

Contract:
- Both clients have the same operations with the same arguments: `chat`, `complete` (a `Completion`, or with
  `stream=True` a `Stream` / `AsyncStream` of text chunks whose `final` holds the Completion once it ends),
  `feedback`, `teach`, `import_examples`, `status`, `trigger_update`, `models`, `updates`, `update`, `adapters`,
  `rollback`, `interactions`, `set_aside`, `requeue`, `forget`, `remove_adapter`. Daemon errors raise `SlothError(code, message)` with the protocol's error code; text that is not
  valid Unicode (a lone surrogate) raises `SlothError("invalid_request")` naming the field, before anything is sent.
- Every call has a timeout (the client's `timeout`, or per call; for streams it bounds the wait for each message).
  No daemon: `SlothError("unreachable")`; no answer in time: `SlothError("timeout")`. After a timeout the socket
  is recreated (a fresh connection; late replies to the old one cannot be mistaken for new ones) and read-only ops
  (status, models, updates, adapters, interactions) are retried `retries` times; the others are not, since a
  second send could log a turn or a feedback twice.
- Leaving a stream early (break, `close()`) cancels the generation on the daemon: the turn is not logged.
- `SlothClient` is for one thread; `AsyncSlothClient` serves any number of concurrent calls on one event loop.
- With no address, the address comes from the daemon's configuration (`SLOTH_ZMQ`, `SLOTH_STATE_DIR`, the config
  file in `SLOTH_CONFIG`): by default `ipc://<state_dir>/api.sock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

import zmq
import zmq.asyncio

from .api.zmq_protocol import (DEFAULT_MAX_MESSAGE_BYTES, IDEMPOTENT_OPS, VERSION, ProtocolError, decode, encode,
                                resolve_addresses)
from .textcheck import invalid_text


class SlothError(Exception):
    """The daemon refused or failed a request (`code` from the protocol), or it could not be reached in time
    (`unreachable`, `timeout`)."""

    def __init__(self, code: str, message: str, *, param: str | None = None, reason: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.param, self.reason = code, message, param, reason


@dataclass(frozen=True)
class Completion:
    text: str
    interaction_id: str
    finish_reason: str
    usage: dict
    adapter_version: str | None
    logged: bool
    model: str
    choices: tuple[dict, ...] = ()  # every choice (n > 1): index, text, finish_reason, logprobs, tool_calls

    @classmethod
    def from_final(cls, msg: dict) -> "Completion":
        return cls(msg["text"], msg["interaction_id"], msg["finish_reason"], msg["usage"], msg.get("adapter_version"),
                   msg.get("logged", False), msg.get("model", ""), tuple(msg.get("choices") or ()))


def default_address() -> str:
    """The daemon's first ZeroMQ address, as its configuration (environment, config file) gives it."""
    from .config import load_config

    cfg = load_config()
    addresses = resolve_addresses(cfg.zmq, cfg.state_dir)
    if not addresses:
        raise SlothError("unreachable", "ZeroMQ is off in the daemon's configuration (zmq = 'off')")
    return addresses[0]


def _raise_for(msg: dict) -> None:
    if msg.get("type") == "error":
        raise SlothError(msg.get("code") or "error", msg.get("message") or "", param=msg.get("param"),
                         reason=msg.get("reason"))


def _message(chat: bool, prompt: Any) -> dict:
    if not chat:
        return {"prompt": prompt}
    return {"messages": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)}


def _gen_fields(chat: bool, prompt: Any, stream: bool, params: dict) -> dict:
    fields = {**_message(chat, prompt), "stream": stream}
    fields.update({k: v for k, v in params.items() if v is not None})
    return fields


class _Ops:
    """The operations, written once over `_call(op, fields, timeout)`; sync and async clients differ only there."""

    def _call(self, op: str, fields: dict, timeout: float | None) -> Any:
        raise NotImplementedError

    def feedback(self, interaction_id: str, *, rating: str | None = None, correction: str | None = None,
                 comment: str | None = None, tool_calls: list[dict] | None = None,
                 timeout: float | None = None) -> Any:
        """`tool_calls`: a correction that calls tools the turn offered (OpenAI shape; `correction` is then the text
        before the calls, if any)."""
        fields = {"interaction_id": interaction_id, "rating": rating, "correction": correction, "comment": comment,
                  "tool_calls": tool_calls}
        return self._call("feedback", {k: v for k, v in fields.items() if v is not None}, timeout)

    def teach(self, examples: list[dict] | None = None, documents: list[str] | None = None, *,
              timeout: float | None = None) -> Any:
        return self._call("teach", {"examples": examples or [], "documents": documents or []}, timeout)

    def import_examples(self, rows: list[Any] | None = None, documents: list[str] | None = None, *,
                        format: str = "auto", lines: list[int] | None = None, skip_invalid: bool = False,
                        timeout: float | None = None) -> Any:
        """A dataset's rows (parsed JSONL objects: OpenAI chat, ShareGPT, Alpaca, completion, text; `format` names
        one or `auto` detects it per row) and plain-text documents as training examples (`import` op, as
        `POST /sloth/import`). Any bad row raises `SlothError("invalid_request")` naming its line (`lines`: each
        row's line number in its file, default 1, 2, ...) and field, and nothing is stored, unless `skip_invalid`.
        One message is at most the daemon's `zmq_max_message_bytes` (4 MiB): send a large file in batches."""
        fields = {"format": format, "rows": rows or [], "documents": documents or [], "skip_invalid": skip_invalid}
        if lines is not None:
            fields["lines"] = lines
        return self._call("import", fields, timeout)

    def status(self, *, timeout: float | None = None) -> Any:
        return self._call("status", {}, timeout)

    def trigger_update(self, *, timeout: float | None = None) -> Any:
        return self._call("trigger_update", {}, timeout)

    def models(self, *, timeout: float | None = None) -> Any:
        return self._call("models", {}, timeout)

    def updates(self, limit: int = 20, *, timeout: float | None = None) -> Any:
        return self._call("updates", {"limit": limit}, timeout)

    def update(self, update_id: int, *, timeout: float | None = None) -> Any:
        return self._call("updates", {"update_id": update_id}, timeout)

    def adapters(self, *, timeout: float | None = None) -> Any:
        return self._call("adapters", {}, timeout)

    def rollback(self, version: str, *, timeout: float | None = None) -> Any:
        return self._call("rollback", {"version": version}, timeout)

    def interactions(self, limit: int = 50, offset: int = 0, *, timeout: float | None = None) -> Any:
        return self._call("interactions", {"limit": limit, "offset": offset}, timeout)

    def set_aside(self, limit: int = 100, *, timeout: float | None = None) -> Any:
        return self._call("set_aside", {"limit": limit}, timeout)

    def requeue(self, example_ids: list[str] | None = None, *, timeout: float | None = None) -> Any:
        return self._call("requeue", {} if example_ids is None else {"example_ids": example_ids}, timeout)


    def forget(self, *, timeout: float | None = None, **selection: Any) -> Any:
        """Forget what `selection` names (example_ids, feedback_ids, interaction_ids, conversation, since, until)."""
        return self._call("forget", {k: v for k, v in selection.items() if v is not None}, timeout)

    def remove_adapter(self, version: str, *, timeout: float | None = None) -> Any:
        return self._call("remove_adapter", {"version": version}, timeout)


class _Base(_Ops):
    def __init__(self, address: str | None, *, timeout: float, retries: int, api_key: str | None,
                 max_message_bytes: int):
        self.address = address or default_address()
        self.timeout = timeout
        self.retries = retries
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)
        # Ids unique across this client's sockets and processes, so a reply can never be taken for another's.
        self._prefix = f"{os.getpid():x}{id(self) & 0xFFFFFF:x}"

    def _request(self, op: str, fields: dict) -> tuple[str, bytes]:
        rid = f"{self._prefix}-{next(self._ids)}"
        msg = {"v": VERSION, "id": rid, "op": op, **fields}
        if self.api_key:
            msg["key"] = self.api_key
        if (bad := invalid_text(msg)) is not None:  # refused here, as the daemon would: never a UnicodeEncodeError
            param, message = bad
            raise SlothError("invalid_request", f"{param}: {message}" if param else message, param=param or None)
        data = encode(msg)
        if len(data) > self.max_message_bytes:
            raise SlothError("too_large", f"request of {len(data)} bytes exceeds the limit of {self.max_message_bytes}")
        return rid, data

    def _new_socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a live connection: no daemon = the send cannot go out
        sock.connect(self.address)
        return sock


class _StreamState:
    """What the blocking and async streams share: reading one message of a generation."""

    final: Completion | None
    _done: bool

    def _take(self, msg: dict) -> str | None:
        """A chunk's text; None when `msg` ends the stream (final: `final` is set; error: raised)."""
        if msg["type"] == "chunk":
            return msg["text"]
        self._done = True
        _raise_for(msg)
        self.final = Completion.from_final(msg)
        return None


# ------------------------------------------------------------------------------------------------- blocking client
class Stream(_StreamState):
    """Text chunks of one generation; `final` (a Completion) is set once the daemon's final message arrived."""

    def __init__(self, client: "SlothClient", rid: str, timeout: float):
        self._client, self._rid, self._timeout = client, rid, timeout
        self.final: Completion | None = None
        self._done = False

    def __iter__(self) -> Iterator[str]:
        try:
            while not self._done:
                text = self._take(self._client._recv(self._rid, time.monotonic() + self._timeout))
                if text is not None:
                    yield text
        finally:
            self.close()

    def text(self) -> str:
        """Read the whole stream; the generated text."""
        return "".join(self)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._client._abandon(self._rid)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SlothClient(_Base):
    def __init__(self, address: str | None = None, *, timeout: float = 60.0, retries: int = 2,
                 api_key: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 context: zmq.Context | None = None):
        super().__init__(address, timeout=timeout, retries=retries, api_key=api_key,
                         max_message_bytes=max_message_bytes)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._new_socket(self._ctx)
        self._open: dict[str, deque] = {}  # requests awaiting replies -> replies that arrived for them early

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "SlothClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _reconnect(self) -> None:
        self._sock.close(linger=0)
        self._sock = self._new_socket(self._ctx)
        self._open.clear()

    def _send(self, op: str, fields: dict, timeout: float) -> str:
        rid, data = self._request(op, fields)
        if not self._sock.poll(int(timeout * 1000), zmq.POLLOUT):
            self._reconnect()
            raise SlothError("unreachable", f"no daemon accepts connections at {self.address}")
        self._sock.send(data)
        self._open[rid] = deque()
        return rid

    def _recv(self, rid: str, deadline: float) -> dict:
        """The next message for request `rid`; replies for other open requests are kept for them."""
        queued = self._open.get(rid)
        if queued:
            return queued.popleft()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                self._reconnect()
                raise SlothError("timeout", f"no answer from the daemon at {self.address} in time")
            try:
                msg, _ = decode(self._sock.recv())
            except ProtocolError:
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("id") == rid:
                if msg.get("type") != "chunk":
                    self._open.pop(rid, None)
                return msg
            if msg.get("id") in self._open:
                self._open[msg["id"]].append(msg)

    def _abandon(self, rid: str) -> None:
        """Stop waiting for `rid` and ask the daemon to cancel it (best effort)."""
        if self._open.pop(rid, None) is not None:
            with contextlib.suppress(zmq.ZMQError, SlothError):
                _, data = self._request("cancel", {"target": rid})
                self._sock.send(data, zmq.NOBLOCK)

    def _call(self, op: str, fields: dict, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if op in IDEMPOTENT_OPS else 0)
        for attempt in range(attempts):
            try:
                rid = self._send(op, fields, timeout)
                msg = self._recv(rid, time.monotonic() + timeout)
            except SlothError as e:
                if e.code in ("timeout", "unreachable") and attempt + 1 < attempts:
                    continue
                raise
            _raise_for(msg)
            return msg["result"]

    def _generate(self, chat: bool, prompt: Any, stream: bool, timeout: float | None, params: dict
                  ) -> Completion | Stream:
        timeout = self.timeout if timeout is None else timeout
        rid = self._send("chat" if chat else "complete", _gen_fields(chat, prompt, stream, params), timeout)
        if stream:
            return Stream(self, rid, timeout)
        try:
            msg = self._recv(rid, time.monotonic() + timeout)
        except BaseException:
            self._abandon(rid)
            raise
        _raise_for(msg)
        return Completion.from_final(msg)

    def chat(self, messages: str | list[dict], *, stream: bool = False, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, stop: str | list[str] | None = None,
             seed: int | None = None, store: bool = True, timeout: float | None = None, **fields: Any) -> Any:
        """A chat turn: `messages` is a list of {"role", "content"} or one user message as a string. Other
        OpenAI fields (`n`, `logprobs`, `response_format`, `tools`, ...) go as keyword arguments."""
        return self._generate(True, messages, stream, timeout, dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, store=store, **fields))

    def complete(self, prompt: str, *, stream: bool = False, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, stop: str | list[str] | None = None,
                 seed: int | None = None, store: bool = True, timeout: float | None = None, **fields: Any) -> Any:
        """A plain text completion of `prompt`; other OpenAI fields (`n`, `logprobs`, ...) as keyword arguments."""
        return self._generate(False, prompt, stream, timeout, dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, store=store, **fields))


# ---------------------------------------------------------------------------------------------------- async client
class AsyncStream(_StreamState):
    """Async text chunks of one generation; `final` is set once it ended."""

    def __init__(self, client: "AsyncSlothClient", rid: str, queue: asyncio.Queue, timeout: float):
        self._client, self._rid, self._queue, self._timeout = client, rid, queue, timeout
        self.final: Completion | None = None
        self._done = False

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while not self._done:
                text = self._take(await self._client._next(self._rid, self._queue, self._timeout))
                if text is not None:
                    yield text
        finally:
            await self.aclose()

    async def text(self) -> str:
        return "".join([t async for t in self])

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            await self._client._abandon(self._rid)


class AsyncSlothClient(_Base):
    def __init__(self, address: str | None = None, *, timeout: float = 60.0, retries: int = 2,
                 api_key: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 context: zmq.asyncio.Context | None = None):
        super().__init__(address, timeout=timeout, retries=retries, api_key=api_key,
                         max_message_bytes=max_message_bytes)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue] = {}

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def __aenter__(self) -> "AsyncSlothClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def _ensure_socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            self._sock = self._new_socket(self._ctx)  # type: ignore[assignment]
            self._reader = asyncio.get_running_loop().create_task(self._read(self._sock))
        return self._sock  # type: ignore[return-value]

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        """Route every reply to the queue of the request it answers."""
        while True:
            data = await sock.recv()
            try:
                msg, _ = decode(data)
            except ProtocolError:
                continue
            if isinstance(msg, dict) and (queue := self._queues.get(msg.get("id"))) is not None:
                queue.put_nowait(msg)

    async def _reconnect_if_idle(self) -> None:
        """A fresh socket after a timeout, unless other calls still wait for replies on this one."""
        if not self._queues:
            await self.aclose()

    async def _send(self, op: str, fields: dict, timeout: float) -> tuple[str, asyncio.Queue]:
        rid, data = self._request(op, fields)
        sock = self._ensure_socket()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        try:
            await asyncio.wait_for(sock.send(data), timeout)
        except asyncio.TimeoutError:
            del self._queues[rid]
            await self._reconnect_if_idle()
            raise SlothError("unreachable", f"no daemon accepts connections at {self.address}") from None
        except BaseException:
            self._queues.pop(rid, None)
            raise
        return rid, queue

    async def _next(self, rid: str, queue: asyncio.Queue, timeout: float) -> dict:
        try:
            msg = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            self._queues.pop(rid, None)
            await self._reconnect_if_idle()
            raise SlothError("timeout", f"no answer from the daemon at {self.address} in time") from None
        if msg.get("type") != "chunk":
            self._queues.pop(rid, None)
        return msg

    async def _abandon(self, rid: str) -> None:
        if self._queues.pop(rid, None) is not None and self._sock is not None:
            with contextlib.suppress(zmq.ZMQError, SlothError):
                _, data = self._request("cancel", {"target": rid})
                await self._sock.send(data, zmq.NOBLOCK)

    async def _call(self, op: str, fields: dict, timeout: float | None) -> Any:  # type: ignore[override]
        timeout = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if op in IDEMPOTENT_OPS else 0)
        for attempt in range(attempts):
            try:
                rid, queue = await self._send(op, fields, timeout)
                msg = await self._next(rid, queue, timeout)
            except SlothError as e:
                if e.code in ("timeout", "unreachable") and attempt + 1 < attempts:
                    continue
                raise
            _raise_for(msg)
            return msg["result"]

    async def _generate(self, chat: bool, prompt: Any, stream: bool, timeout: float | None, params: dict
                        ) -> Completion | AsyncStream:
        timeout = self.timeout if timeout is None else timeout
        rid, queue = await self._send("chat" if chat else "complete", _gen_fields(chat, prompt, stream, params),
                                      timeout)
        if stream:
            return AsyncStream(self, rid, queue, timeout)
        try:
            msg = await self._next(rid, queue, timeout)
        except BaseException:
            await self._abandon(rid)
            raise
        _raise_for(msg)
        return Completion.from_final(msg)

    async def chat(self, messages: str | list[dict], *, stream: bool = False, max_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None,
                   stop: str | list[str] | None = None, seed: int | None = None, store: bool = True,
                   timeout: float | None = None, **fields: Any) -> Any:
        return await self._generate(True, messages, stream, timeout, dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, store=store, **fields))

    async def complete(self, prompt: str, *, stream: bool = False, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None,
                       stop: str | list[str] | None = None, seed: int | None = None, store: bool = True,
                       timeout: float | None = None, **fields: Any) -> Any:
        return await self._generate(False, prompt, stream, timeout, dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, store=store, **fields))
