"""The ZeroMQ front end: ROUTER sockets on the daemon's event loop serving the same operations as the HTTP API.

Contract (wire format: `api/zmq_protocol.py` and docs/zmq-protocol.md):
- `ZmqServer(ops, addresses, ...)`: `start()` binds one ROUTER per address (an IPC socket file gets mode 0600;
  TCP off loopback is logged as a warning). Once the daemon is stopping (`ops.stopping`, SIGTERM) new requests
  get `unavailable` while running ones go on; `stop()` tells those still running that the daemon is going away,
  cancels them and closes the sockets.
- Each request runs in its own task through `sloth_daemon.operations`, so semantics, errors and replay-store logging
  (transport "zmq", `store: false` honoured) are the HTTP API's. Generation streams `chunk` messages (with
  `stream: true`) and ends with one `final` or `error` message; other ops answer one `result` or `error`.
- Nothing a peer sends can stall or crash the loop: malformed messages get an `error` reply (id null when the id is
  unreadable); messages over `max_message_bytes` get `too_large`, frames over twice that are cut off by libzmq
  (ZMQ_MAXMSGSIZE), which drops the connection; a client has at most `max_inflight` requests at once (`busy`).
  Sends never block: a peer that is gone (EHOSTUNREACH, via ROUTER_MANDATORY) or does not read for
  `SEND_TIMEOUT_S` has its requests cancelled; an unfinished turn is then not logged. A socket monitor reports each
  connection that closes (by its file descriptor, which `ZMQ_SRCFD` ties to the peers that sent on it): those
  peers' requests are cancelled at once, non-streaming ones too. A `chat`/`complete` retried with the same
  `idempotency_key` gets the first answer (`Operations` idempotency, as HTTP's `Idempotency-Key`).
- With an API key configured (`api_key`, read per request: a SIGHUP reload may change it), requests on TCP endpoints
  must carry it as `key`; IPC sockets rely on file permissions.
- Every message answered counts once in the metrics (`Operations.observe_zmq`): its op ("invalid" when refused
  before its op was read, or for an unknown op) and its outcome ("ok", the error code, or "gone").
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message
from pydantic import BaseModel, ConfigDict, Field

from ..engine.base import TextDelta
from ..dataio.importer import ImportRequest
from ..engine.logprobs import chat_logprobs, completion_logprobs
from ..operations import OpError, Operations, check_text, parse, usage
from ..turns import TurnDone
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ForgetRequest,
    RequeueRequest,
    RollbackRequest,
    TeachRequest,
)
from .zmq_protocol import ENVELOPE_KEYS, MAX_IPC_PATH_BYTES, OPS, VERSION, ProtocolError, decode, encode, valid_id


log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0  # how long a stream waits for a peer that does not read before giving up on it
HWM = 10_000  # messages queued per peer before sends report EAGAIN


class ZmqBindError(RuntimeError):
    """An address could not be bound (in use, bad path, permissions)."""


MAX_INT64 = 2**63 - 1  # SQLite's INTEGER: larger ids and offsets are refused, not overflowed deeper down


class _UpdatesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(20, ge=1, le=MAX_INT64)
    update_id: int | None = Field(None, ge=1, le=MAX_INT64)


class _InteractionsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(50, ge=1, le=MAX_INT64)
    offset: int = Field(0, ge=0, le=MAX_INT64)


class _IdempotencyKey(BaseModel):
    idempotency_key: str = Field(min_length=1, max_length=255)


class _CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str | int = Field(description="the id of the request to cancel")


@dataclass
class _Endpoint:
    index: int
    address: str
    sock: zmq.asyncio.Socket
    tcp: bool  # requests need the API key (when one is set: it is read per request, a reload may change it)
    ipc_path: Path | None
    # Which peers (identities) came in over which connection (file descriptor): a disconnect (socket monitor) names
    # the descriptor, and the requests of its peers are cancelled at once.
    peers_by_fd: dict[int, set[bytes]] = field(default_factory=dict)


@dataclass
class _Request:
    ep: _Endpoint
    envelope: list[bytes]  # the routing frames to answer with: [identity] or [identity, b""]
    id: Any
    encoding: str
    task: asyncio.Task | None = None
    cancel_reason: str | None = None  # "cancelled" (cancel op), "gone" (peer vanished), "shutdown"
    op: str = ""
    outcome: str = "gone"  # for the metrics: "ok" or the error code it was answered with

    @property
    def client(self) -> tuple[int, bytes]:
        return (self.ep.index, self.envelope[0])


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(rid: Any, code: str, message: str, **extra: Any) -> dict:
    return {"v": VERSION, "id": rid, "type": "error", "code": code, "message": message, **extra}


def _op_error(rid: Any, e: OpError) -> dict:
    extra = {"retry_after_s": e.retry_after_s} if e.retry_after_s is not None else {}
    return _error(rid, e.code, e.message, param=e.param, reason=e.reason, **extra)


class ZmqServer:
    def __init__(self, ops: Operations, addresses: list[str], *, max_message_bytes: int, max_inflight: int,
                 api_key: str | None = None):
        self.ops = ops
        self.addresses = addresses
        self.max_message_bytes = max_message_bytes
        self.max_inflight = max_inflight
        self.api_key = api_key
        self.ctx: zmq.asyncio.Context | None = None
        self.endpoints: list[_Endpoint] = []
        self._recv_tasks: list[asyncio.Task] = []
        self._clients: dict[tuple[int, bytes], dict[Any, _Request]] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        try:
            for i, address in enumerate(self.addresses):
                self.endpoints.append(self._bind(i, address))
        except BaseException:
            self._close_sockets()
            raise
        loop = asyncio.get_running_loop()
        for ep in self.endpoints:
            self._recv_tasks.append(loop.create_task(self._recv_loop(ep), name=f"zmq-recv-{ep.address}"))
            self._recv_tasks.append(loop.create_task(self._watch_disconnects(ep), name=f"zmq-mon-{ep.address}"))
            log.info("ZeroMQ API on %s", ep.address)

    async def stop(self) -> None:
        for task in self._recv_tasks:
            task.cancel()
        tasks = []
        for requests in list(self._clients.values()):
            for req in list(requests.values()):
                req.cancel_reason = "shutdown"
                if req.task is not None:
                    req.task.cancel()
                    tasks.append(req.task)
        await asyncio.gather(*self._recv_tasks, *tasks, return_exceptions=True)
        self._recv_tasks.clear()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for ep in self.endpoints:
            ep.sock.close(linger=200)  # a moment for the last messages (e.g. "shutting down") to go out
            if ep.ipc_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(ep.ipc_path.lstat().st_mode):
                        ep.ipc_path.unlink()
        self.endpoints.clear()
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    # -- binding --------------------------------------------------------------------------------------------------
    def _bind(self, index: int, address: str) -> _Endpoint:
        assert self.ctx is not None
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise EHOSTUNREACH: we learn a peer is gone
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)  # libzmq drops a peer sending a larger frame
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.LINGER, 0)
        ipc_path = None
        try:
            if address.startswith("ipc://"):
                ipc_path = self._bind_ipc(sock, address)
            elif address.startswith("tcp://"):
                host = address[len("tcp://"):].rpartition(":")[0]
                if not _is_loopback(host):
                    log.warning("ZeroMQ API bound to %s, which is not loopback: anyone who can reach it can use "
                                "the daemon%s", address, "" if self.api_key else " (set api_key to require a key)")
                sock.bind(address)
            else:
                raise ZmqBindError(f"zmq: unsupported address {address!r} (use ipc://PATH or tcp://HOST:PORT)")
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise ZmqBindError(f"zmq: cannot bind {address}: {e}") from None
        except BaseException:
            sock.close(linger=0)
            raise
        return _Endpoint(index, address, sock, address.startswith("tcp://"), ipc_path)

    def _bind_ipc(self, sock: zmq.asyncio.Socket, address: str) -> Path | None:
        target = address[len("ipc://"):]
        if target.startswith("@"):  # Linux abstract namespace: no file, so no permissions either
            log.warning("ZeroMQ API on the abstract socket %s: any local user can connect", address)
            sock.bind(address)
            return None
        path = Path(target).expanduser().absolute()
        if len(os.fsencode(str(path))) > MAX_IPC_PATH_BYTES:
            raise ZmqBindError(f"zmq: IPC socket path {path} is longer than {MAX_IPC_PATH_BYTES} bytes")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.parent.stat()
        if st.st_uid != os.getuid() or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            log.warning("the folder of the ZeroMQ socket %s is not owned by this user or is writable by others; "
                        "someone else could replace the socket", path)
        if path.exists() and _socket_alive(path):
            raise ZmqBindError(f"zmq: {path} is in use by a running process (another daemon?)")
        # The socket file is created 0600 (umask), closing the window a chmod after bind would leave open.
        old = os.umask(0o177)
        try:
            sock.bind(f"ipc://{path}")
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return path

    # -- receiving ------------------------------------------------------------------------------------------------
    async def _recv_loop(self, ep: _Endpoint) -> None:
        while True:
            try:
                parts = await ep.sock.recv_multipart(copy=False)
                frames = [p.bytes for p in parts]
                with contextlib.suppress(zmq.ZMQError):
                    ep.peers_by_fd.setdefault(parts[-1].get(zmq.SRCFD), set()).add(frames[0])
            except zmq.ZMQError as e:
                if e.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                log.warning("zmq: receive failed on %s: %s", ep.address, e)
                await asyncio.sleep(0.01)
                continue
            try:
                self._dispatch(ep, frames)
            except Exception:  # a bug here must not end the receive loop
                log.exception("zmq: dropped a message that could not be dispatched")
            # A queued message is received without suspending; yield so that a flood of messages cannot starve the
            # requests already running (and every request task starts before a cancel for it can arrive).
            await asyncio.sleep(0)

    async def _watch_disconnects(self, ep: _Endpoint) -> None:
        """Cancel the requests of peers whose connection closed (a client that hangs up: no reply can reach it)."""
        mon = ep.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())
                peers = ep.peers_by_fd.pop(int(event["value"]), set())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    for identity in peers:
                        self._peer_gone(ep.index, identity)
        except zmq.ZMQError:
            return
        finally:
            mon.close(linger=0)

    def _dispatch(self, ep: _Endpoint, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        if len(rest) == 2 and rest[0] == b"":
            envelope, payload = [identity, b""], rest[1]
        elif len(rest) == 1:
            envelope, payload = [identity], rest[0]
        else:
            envelope = [identity, b""] if rest and rest[0] == b"" else [identity]
            self._reply_now(ep, envelope, "json", _error(
                None, "invalid_message", f"expected one payload frame (after an optional empty delimiter), "
                f"got {len(rest)} frames"))
            return
        if len(payload) > self.max_message_bytes:
            self._reply_now(ep, envelope, "json", _error(
                None, "too_large", f"message of {len(payload)} bytes exceeds the limit of {self.max_message_bytes}"))
            return
        try:
            msg, encoding = decode(payload)
        except ProtocolError as e:
            self._reply_now(ep, envelope, "json", _error(None, "invalid_message", str(e)))
            return
        if not isinstance(msg, dict):
            self._reply_now(ep, envelope, encoding, _error(None, "invalid_message", "payload must be an object"))
            return
        rid = msg.get("id")
        if not valid_id(rid):
            self._reply_now(ep, envelope, encoding, _error(
                None, "invalid_message",
                "id: required, a non-empty string of valid Unicode (at most 128 characters) or an integer"))
            return
        try:
            check_text(msg)  # any field, the key included: refused here, before it reaches a reply or a compare
        except OpError as e:
            self._reply_now(ep, envelope, encoding, _op_error(rid, e))
            return
        if msg.get("v") != VERSION:
            self._reply_now(ep, envelope, encoding, _error(
                rid, "unsupported_version", f"v: this daemon speaks protocol version {VERSION}, got {msg.get('v')!r}"))
            return
        op = msg.get("op")
        if op not in OPS:
            self._reply_now(ep, envelope, encoding, _error(
                rid, "unknown_op", f"op: unknown operation {op!r}; one of {', '.join(OPS)}"))
            return
        key = self.api_key
        if ep.tcp and key and not (isinstance(msg.get("key"), str)
                                   and hmac.compare_digest(msg["key"].encode(), key.encode())):
            self._reply_now(ep, envelope, encoding, _error(rid, "unauthorized",
                                                           "missing or wrong API key (send it as 'key')"), op=op)
            return
        if self.ops.stopping:  # SIGTERM: what runs may finish, nothing new starts
            self._reply_now(ep, envelope, encoding, _error(rid, "unavailable", "the daemon is shutting down"), op=op)
            return
        requests = self._clients.setdefault((ep.index, identity), {})
        if rid in requests:
            self._reply_now(ep, envelope, encoding, _error(rid, "invalid_request", f"id {rid!r} is already in flight"),
                            op=op)
            return
        fields = {k: v for k, v in msg.items() if k not in ENVELOPE_KEYS}
        if op == "cancel":
            self._cancel(ep, envelope, encoding, rid, fields, requests)
            return
        if len(requests) >= self.max_inflight:
            self._reply_now(ep, envelope, encoding, _error(
                rid, "busy", f"this client already has {len(requests)} requests in flight (limit {self.max_inflight})"),
                op=op)
            return
        req = _Request(ep, envelope, rid, encoding, op=op)
        requests[rid] = req
        req.task = asyncio.get_running_loop().create_task(self._handle(req, op, fields), name=f"zmq-{op}")
        req.task.add_done_callback(lambda task: self._finished(req, task))

    def _cancel(self, ep: _Endpoint, envelope: list[bytes], encoding: str, rid: Any, fields: dict,
                requests: dict[Any, _Request]) -> None:
        try:
            target = parse(_CancelRequest, fields).target
        except OpError as e:
            self._reply_now(ep, envelope, encoding, _op_error(rid, e), op="cancel")
            return
        req = requests.get(target)
        if req is not None and req.task is not None and not req.task.done():
            req.cancel_reason = "cancelled"
            req.task.cancel()
        self._reply_now(ep, envelope, encoding, {"v": VERSION, "id": rid, "type": "result", "op": "cancel",
                                                  "result": {"cancelled": req is not None}}, op="cancel")

    # -- handling -------------------------------------------------------------------------------------------------
    async def _handle(self, req: _Request, op: str, fields: dict) -> None:
        try:
            if op in ("chat", "complete"):
                sent = await self._generate(req, op, fields)
            else:
                result = await self._call(op, fields)
                sent = await self._send(req, {"v": VERSION, "id": req.id, "type": "result", "op": op,
                                              "result": result})
            req.outcome = "ok" if sent else "gone"
        except OpError as e:
            req.outcome = e.code
            await self._send(req, _op_error(req.id, e))
        except Exception as e:
            log.exception("zmq: %s failed", op)
            req.outcome = "internal"
            await self._send(req, _error(req.id, "internal", f"{e.__class__.__name__}: {e}"))

    def _finished(self, req: _Request, task: asyncio.Task) -> None:
        """Runs for every request task, also one cancelled before it started: free its slot, say why it ended."""
        if task.cancelled():
            req.outcome = {"cancelled": "cancelled", "shutdown": "unavailable"}.get(req.cancel_reason or "", "gone")
            if req.cancel_reason == "cancelled":
                self._try_send(req, _error(req.id, "cancelled", "the request was cancelled"))
            elif req.cancel_reason == "shutdown":
                self._try_send(req, _error(req.id, "unavailable", "the daemon is shutting down"))
        elif task.exception() is not None:
            log.error("zmq: request task failed", exc_info=task.exception())
        self.ops.observe_zmq(req.op, req.outcome)
        requests = self._clients.get(req.client)
        if requests is not None and requests.get(req.id) is req:
            del requests[req.id]
            if not requests:
                del self._clients[req.client]

    async def _call(self, op: str, fields: dict) -> dict:
        ops = self.ops
        if op == "feedback":
            return await ops.feedback(parse(FeedbackRequest, fields))
        if op == "teach":
            return await ops.teach(parse(TeachRequest, fields))
        if op == "import":
            return await ops.import_examples(parse(ImportRequest, fields))
        if op == "status":
            return await ops.status()
        if op == "trigger_update":
            return await ops.trigger_update()
        if op == "models":
            return ops.models()
        if op == "updates":
            q = parse(_UpdatesQuery, fields)
            return await (ops.update(q.update_id) if q.update_id is not None else ops.updates(q.limit))
        if op == "adapters":
            return await ops.adapters()
        if op == "rollback":
            return await ops.rollback(parse(RollbackRequest, fields))
        if op == "interactions":
            q = parse(_InteractionsQuery, fields)
            return await ops.interactions(q.limit, q.offset)
        if op == "set_aside":
            return await ops.set_aside(parse(_InteractionsQuery, fields).limit)
        if op == "requeue":
            return await ops.requeue(parse(RequeueRequest, fields))
        if op == "forget":
            return await ops.forget(parse(ForgetRequest, fields))
        if op == "remove_adapter":
            return await asyncio.to_thread(ops.remove_adapter, parse(RollbackRequest, fields).version)
        raise OpError("internal", f"op {op!r} has no handler")

    async def _generate(self, req: _Request, op: str, fields: dict) -> bool:
        """Run one generation for `req`; True once its final message went out, False if the peer was gone."""
        fields.setdefault("model", self.ops.model_name)
        # `idempotency_key` (HTTP: the Idempotency-Key header): a retry with it gets the first answer. Request ids are
        # no such key: clients number them per connection, so unrelated clients send the same ids.
        key = fields.pop("idempotency_key", None)
        if key is not None:
            key = parse(_IdempotencyKey, {"idempotency_key": key}).idempotency_key
        if op == "chat":
            body: ChatCompletionRequest | CompletionRequest = parse(ChatCompletionRequest, fields)
            turn = await self.ops.prepare_chat(body, idempotency_key=key and "zmq:" + key)
        else:
            body = parse(CompletionRequest, fields)
            turn = await self.ops.prepare_completion(body, idempotency_key=key and "zmq:" + key)
        events = self.ops.run(turn, transport="zmq")
        async with contextlib.aclosing(events):
            async for ev in events:
                if isinstance(ev, TextDelta):
                    if body.streaming and ev.text:
                        msg = {"v": VERSION, "id": req.id, "type": "chunk", "text": ev.text, "index": ev.index}
                        if not await self._send(req, msg):
                            return False  # the peer is gone: closing the stream cancels the turn (never logged)
                elif isinstance(ev, TurnDone):
                    return await self._send(req, {
                        "v": VERSION, "id": req.id, "type": "final", "interaction_id": ev.id, "text": ev.text,
                        "finish_reason": ev.finish_reason, "usage": usage(ev), "adapter_version": ev.adapter_version,
                        "logged": ev.logged, "journaled": ev.journaled, "model": self.ops.model_name,
                        "choices": _choices(op, ev)})
        return False  # the events ended without a final one (the turn was cut short)

    # -- sending --------------------------------------------------------------------------------------------------
    def _send_frames(self, ep: _Endpoint, frames: list[bytes]) -> str:
        """One non-blocking send: "ok", "again" (the peer's queue is full) or "gone" (no such peer any more)."""
        fut = ep.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        exc = fut.exception() if fut.done() else None  # NOBLOCK sends complete (or fail) within the call
        if exc is None:
            return "ok"
        if isinstance(exc, zmq.Again):
            return "again"
        if isinstance(exc, zmq.ZMQError) and exc.errno in (zmq.EHOSTUNREACH, zmq.ENOTSOCK, zmq.ETERM):
            return "gone"
        raise exc

    def _reply_now(self, ep: _Endpoint, envelope: list[bytes], encoding: str, msg: dict, *,
                   op: str = "invalid") -> None:
        """Answer a message that never became a request (`op`: "invalid" while its op is not read yet, or unknown);
        dropped if the peer cannot take it right now."""
        self.ops.observe_zmq(op, "ok" if msg.get("type") == "result" else msg.get("code", "invalid_message"))
        self._send_frames(ep, [*envelope, encode(msg, encoding)])  # type: ignore[arg-type]

    def _try_send(self, req: _Request, msg: dict) -> None:
        with contextlib.suppress(Exception):
            self._send_frames(req.ep, [*req.envelope, encode(msg, req.encoding)])  # type: ignore[arg-type]

    async def _send(self, req: _Request, msg: dict) -> bool:
        """Send without blocking the loop; False (and the peer's other requests cancelled) if it is gone or stuck."""
        frames = [*req.envelope, encode(msg, req.encoding)]  # type: ignore[arg-type]
        deadline = time.monotonic() + SEND_TIMEOUT_S
        delay = 0.002
        while True:
            result = self._send_frames(req.ep, frames)
            if result == "ok":
                return True
            if result == "gone" or time.monotonic() > deadline:
                self._drop_client(req, "gone" if result == "gone" else "not reading")
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _peer_gone(self, index: int, identity: bytes) -> None:
        """The peer disconnected: cancel what it still runs (generation stops at the next token; nothing is logged)."""
        requests = self._clients.get((index, identity), {})
        if requests:
            log.info("zmq: a client disconnected; cancelling its %d request(s)", len(requests))
        for req in list(requests.values()):
            if req.task is not None:
                req.cancel_reason = "gone"
                req.task.cancel()

    def _drop_client(self, req: _Request, why: str) -> None:
        log.info("zmq: client on %s is %s; cancelling its requests", req.ep.address, why)
        for other in list(self._clients.get(req.client, {}).values()):
            if other is not req and other.task is not None:
                other.cancel_reason = "gone"
                other.task.cancel()


def _choices(op: str, done: TurnDone) -> list[dict]:
    """Every choice of a finished turn (`n` > 1), with its logprobs in the HTTP API's shape when asked for."""
    shape = chat_logprobs if op == "chat" else completion_logprobs
    return [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "content": c.message_content,
             "tool_calls": list(c.tool_calls) or None,
             "logprobs": None if c.logprobs is None else shape(c.logprobs)} for c in done.choices]


def _socket_alive(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at `path` (a stale file from a crash does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True
