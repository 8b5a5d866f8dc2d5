"""The daemon's client operations, front-end agnostic: HTTP (`api/http.py`) and ZeroMQ (`api/zmq.py`) both call these.

Contract:
- Every operation takes an already validated request model from `api/schemas.py` (or plain arguments) and returns a
  JSON-able dict, or raises `OpError`. `parse(model, data)` validates a raw dict with the same pydantic models and
  the same error messages as the HTTP API.
- `OpError.code` is the error's category (`invalid_request`, `unauthorized`, `not_found`, `conflict`,
  `engine_error`, `internal`, ...), `OpError.status` the HTTP status it maps to, `OpError.reason` an optional
  specific code (`model_not_found`, `context_length_exceeded`, `nothing_to_train`, `update_running`,
  `adapter_load_failed`) and `OpError.param` the request field at fault.
- `Operations(parts)` takes the daemon's assembled parts through the `DaemonParts` protocol below, so the front ends
  (HTTP, ZeroMQ, CLI, page) depend on this module only, never on `service.py` that assembles them (no import cycle).
- Every operation first refuses text that is not valid Unicode (`check_text`: a lone surrogate) with an
  `invalid_request` naming the field, so such text never reaches the tokenizer, the store or a reply.
- Generation: `await prepare_chat`/`prepare_completion` check the model name and limits, take an admission ticket
  (`busy` when the engine's queue is full) and answer a retried idempotency key from the cache *before* any work,
  then check and tokenise the prompt once in a worker thread and return a `Turn`; `run(turn, transport=...)`
  streams `TextDelta`s then one `TurnDone` through `TurnService` (so both front ends log to the replay store the
  same way, with their transport name, and honour `store: false`) and releases the ticket.
- Store calls run on the store worker's threads (`store_worker.py`), CPU work (tokenising, dataset planning) in
  worker threads: no operation blocks the event loop. A busy store is `unavailable` (503, `reason: store_busy`,
  with `retry_after_s`) for the one call that needed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from sloth_replay import InvalidInput, NotFound, ToolCallError, UpdateAlreadyRunning, make_example

from . import adapter_files
from .adapters import AdapterNotFound
from .api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ForgetRequest,
    RequeueRequest,
    RollbackRequest,
    TeachRequest,
    refused_field,
)
from . import forgetting
from .dataio.chunking import split_document
from .dataio.importer import ImportRequest, plan_import
from .admission import Admission, Overloaded, Ticket
from .engine.base import AdapterLoadError, EngineError, InvalidParam, RequestTooLong, SamplingParams, TextDelta
from .idempotency import IdempotencyCache, KeyConflict, fingerprint
from .limits import TooLarge, check_feedback, check_teach
from .metrics import store_figures
from .prompting import ChatTemplateError, check_example
from .store_worker import StoreBusy
from .textcheck import invalid_text
from .tool_calls import ToolUse, check_answer_tools, detect
from .turns import TurnDone
from .updater import NothingToTrain

if TYPE_CHECKING:
    from sloth_replay import ReplayStore

    from .adapters import AdapterRegistry
    from .config import DaemonConfig
    from .engine.base import Engine
    from .metrics import DaemonMetrics
    from .store_worker import StoreWorker
    from .turns import TurnService
    from .updater import Updater

# Error categories and the HTTP status each maps to.
STATUS = {
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "busy": 429,
    "internal": 500,
    "engine_error": 503,
    "unavailable": 503,
}


class OpError(Exception):
    def __init__(self, code: str, message: str, *, param: str | None = None, reason: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.reason = code, message, param, reason
        self.retry_after_s = retry_after_s  # HTTP `Retry-After` (seconds) for busy/unavailable answers

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 500)


def store_busy(e: StoreBusy) -> OpError:
    """A locked replay store as the answer to the one call that needed it: 503, try again shortly."""
    return OpError("unavailable", str(e), reason="store_busy", retry_after_s=e.retry_after_s)


def validation_error(errors: list[dict]) -> OpError:
    """The first pydantic error as an `invalid_request` OpError naming the field (dotted), as the HTTP API does."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        return OpError("invalid_request", "request body is not valid JSON")
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    if err.get("type") == "string_unicode" and isinstance(err.get("input"), str):
        # pydantic met text that is not valid Unicode (a lone surrogate): say so as `check_text` does
        msg = (invalid_text(err["input"]) or ("", msg))[1]
    return OpError("invalid_request", f"{param}: {msg}" if param else msg, param=param)


def check_text(data: Any) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate) anywhere in `data`, naming the field: cheaply, before
    any work, instead of failing later in the tokenizer or the store (`textcheck`)."""
    if (found := invalid_text(data)) is not None:
        param, message = found
        raise OpError("invalid_request", f"{param}: {message}" if param else message, param=param or None)


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any) -> M:
    check_text(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


@dataclass(frozen=True)
class Turn:
    """A validated generation request, ready to run: its prompt tokenised once (`prompt_ids`), its admission
    ticket held until it ends, or `replay`: the finished turn of an earlier request with the same idempotency key."""

    kind: Literal["chat", "completion"]
    prompt: Any
    params: SamplingParams
    store: bool
    tool_use: ToolUse | None = None
    prompt_ids: tuple[int, ...] | None = None
    ticket: Ticket | None = field(default=None, compare=False, repr=False)
    idempotency_key: str | None = None
    replay: TurnDone | None = None


def usage(done: TurnDone) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def turn_route(transport: str, kind: str) -> str:
    """The `route` label of a turn's metrics: the HTTP path, or `zmq:<op>`."""
    if transport == "http":
        return "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    return f"{transport}:{'chat' if kind == 'chat' else 'complete'}"


class DaemonParts(Protocol):
    """What the operations need from the running daemon (`service.Daemon` provides it)."""

    cfg: "DaemonConfig"
    store: "StoreWorker"
    registry: "AdapterRegistry"
    engine: "Engine"
    turns: "TurnService"
    updater: "Updater"
    metrics: "DaemonMetrics"
    admission: Admission
    idempotency: IdempotencyCache
    model_name: str
    started_at: int
    stopping: bool

    async def status(self) -> dict: ...


class Operations:
    """The client operations over one daemon's parts; front ends hold one of these and nothing else of the daemon."""

    def __init__(self, daemon: DaemonParts):
        self.daemon = daemon
        self._tok: Any = None  # the model's tokenizer for imports when the engine has none (`_tokenizer`)

    @property
    def cfg(self) -> "DaemonConfig":
        """The live configuration (a SIGHUP reload changes its fields in place)."""
        return self.daemon.cfg

    @property
    def model_name(self) -> str:
        return self.daemon.model_name

    @property
    def stopping(self) -> bool:
        """True once SIGTERM arrived: running requests finish, new ones are refused."""
        return self.daemon.stopping

    def health(self) -> dict:
        return {"status": "ok", "adapter": self.daemon.engine.current_adapter}

    # -- generation ---------------------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        served = self.daemon.model_name
        if name != served:
            raise OpError("not_found", f"model {name!r} is not served here; GET /v1/models lists {served!r}",
                          param="model", reason="model_not_found")

    async def _checked(self, kind: Literal["chat", "completion"], prompt: Any, params: SamplingParams, store: bool,
                       tool_use: ToolUse | None, idempotency_key: str | None) -> Turn:
        limit = self.daemon.cfg.generation.max_tokens_limit
        if params.max_tokens > limit:
            raise OpError("invalid_request", f"max_tokens {params.max_tokens} exceeds the limit {limit}",
                          param="max_tokens")
        try:
            ticket = self.daemon.admission.admit()  # before any work: a refused request costs nothing
        except Overloaded as e:
            raise OpError("busy", str(e), reason="server_busy", retry_after_s=e.retry_after_s) from None
        try:
            if idempotency_key is not None:
                cache = self.daemon.idempotency
                tools = (tool_use.tools, tool_use.choice, tool_use.parallel) if tool_use else None
                try:
                    replay = cache.claim(idempotency_key, fingerprint(kind, prompt, params, store, tools))
                except KeyConflict as e:
                    raise OpError("conflict", str(e), reason="idempotency_key_in_use", retry_after_s=1) from None
                if replay is not None:
                    ticket.release()
                    return Turn(kind, prompt, params, store, tool_use, replay=replay)
                ticket.on_release(lambda: cache.abandon(idempotency_key))  # a finished turn completed it first
            # Checking, rendering and tokenising run once, in a worker thread: a large prompt never stalls the loop.
            request = await asyncio.to_thread(self.daemon.turns.prepare, kind, prompt, params, tool_use)
        except RequestTooLong as e:
            ticket.release()
            raise OpError("invalid_request", str(e), param="messages" if kind == "chat" else "prompt",
                          reason="context_length_exceeded") from None
        except InvalidParam as e:
            ticket.release()
            raise OpError("invalid_request", str(e), param=e.param) from None
        except ChatTemplateError as e:
            ticket.release()
            raise OpError("invalid_request", f"the chat template refused the messages: {e}",
                          param="messages") from None
        except BaseException:
            ticket.release()
            raise
        return Turn(kind, prompt, params, store, tool_use, request.prompt_ids, ticket, idempotency_key)

    def _tool_use(self, body: ChatCompletionRequest, params: SamplingParams) -> tuple[ToolUse | None, SamplingParams]:
        """The request's tools, checked against what the model's template can do; a forced or required call
        becomes the request's structured-generation guide."""
        choice = body.tool_choice_name()
        if not body.tools:
            if choice not in ("none", "auto"):
                raise OpError("invalid_request", "tool_choice: no tools were given", param="tool_choice")
            return None, params
        fmt = self.daemon.turns.tool_format
        if fmt is None:
            raise OpError("invalid_request", "tools: the model's chat template does not render tools (set a "
                          "tool-aware chat template for this model)", param="tools")
        tools = body.tool_dicts() or []
        use = ToolUse(fmt, tools, choice, body.parallel_tool_calls is not False)
        if choice in ("none", "auto"):
            return use, params
        if not fmt.can_force:
            raise OpError("invalid_request", f"tool_choice: the model's tool-call format ({fmt.name}) cannot be "
                          "forced; use \"auto\"", param="tool_choice")
        if params.guide is not None:
            raise OpError("invalid_request", "response_format: a forced tool call and a response format cannot "
                          "be combined", param="response_format")
        chosen = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice]
        if not chosen:
            raise OpError("invalid_request", f"tool_choice: {choice!r} is not one of the tools given",
                          param="tool_choice")
        return use, dataclasses.replace(params, guide=fmt.guide(chosen))

    @staticmethod
    def _check_fields(body: ChatCompletionRequest | CompletionRequest) -> None:
        name = refused_field(body)
        if name is not None:
            raise OpError("invalid_request", f"{name}: this field is not supported (the README's API table lists "
                          "the fields this server honours)", param=name, reason="unsupported_field")

    async def prepare_chat(self, body: ChatCompletionRequest, *, idempotency_key: str | None = None) -> Turn:
        """Check and tokenise a chat request (fields, model, tools, limits, admission) before any generation.
        `idempotency_key` (scoped by the caller to its transport) names one request: a retry with it within the
        window gets the first answer; reused for another request, or while the first runs, it is a `conflict`."""
        check_text(body)
        self._check_fields(body)
        self.check_model(body.model)
        gen = self.daemon.cfg.generation
        tool_use, params = self._tool_use(body, body.sampling(gen, body.max_completion_tokens))
        return await self._checked("chat", body.prompt(), params, body.stored, tool_use, idempotency_key)

    async def prepare_completion(self, body: CompletionRequest, *, idempotency_key: str | None = None) -> Turn:
        check_text(body)
        self._check_fields(body)
        self.check_model(body.model)
        return await self._checked("completion", body.prompt, body.sampling(self.daemon.cfg.generation),
                                   body.stored, None, idempotency_key)

    async def run(self, turn: Turn, *, transport: str, turn_id: str | None = None
                  ) -> AsyncIterator[TextDelta | TurnDone]:
        """Stream one turn; the engine's failures become `engine_error`. A replayed turn (same idempotency key)
        streams its stored choices at once. The turn's admission ticket is released when this ends."""
        if turn.replay is not None:
            if turn.tool_use is None or not turn.tool_use.parses:  # else its text comes whole with the TurnDone
                for c in turn.replay.choices:
                    yield TextDelta(c.text, c.index, c.logprobs or ())
            yield turn.replay
            return
        try:
            async with contextlib.aclosing(self._generate(turn, transport, turn_id)) as events:
                async for ev in events:
                    if isinstance(ev, TurnDone) and turn.idempotency_key is not None:
                        self.daemon.idempotency.complete(turn.idempotency_key, ev)
                    yield ev
        finally:
            if turn.ticket is not None:
                turn.ticket.release()

    async def _generate(self, turn: Turn, transport: str, turn_id: str | None) -> AsyncIterator[TextDelta | TurnDone]:
        events = self.daemon.turns.run(turn.kind, turn.prompt, turn.params, store=turn.store, transport=transport,
                                       turn_id=turn_id, tool_use=turn.tool_use, prompt_ids=turn.prompt_ids)
        metrics, route = self.daemon.metrics, turn_route(transport, turn.kind)
        t0, first = time.monotonic(), False
        metrics.turn_started()
        try:
            async with contextlib.aclosing(events):  # closed now, not at garbage collection: the engine stops at once
                async for ev in events:
                    if not first and isinstance(ev, TextDelta):
                        first = True
                        metrics.turn_first_token(route, time.monotonic() - t0)
                    elif isinstance(ev, TurnDone):
                        metrics.turn_done(route, time.monotonic() - t0, ev.finish_reason, ev.adapter_version,
                                          ev.prompt_tokens, ev.completion_tokens)
                    yield ev
        except EngineError as e:
            raise OpError("engine_error", str(e), reason="engine_error") from None
        except InvalidParam as e:  # found by the engine only once it ran (e.g. vLLM refused a field)
            raise OpError("invalid_request", str(e), param=e.param) from None
        finally:
            metrics.turn_ended(first)

    async def collect(self, turn: Turn, *, transport: str) -> TurnDone:
        async for ev in self.run(turn, transport=transport):
            if isinstance(ev, TurnDone):
                return ev
        raise OpError("internal", "generation ended without a result")

    # -- metrics --------------------------------------------------------------------------------------------------
    async def metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition of `metrics.DaemonMetrics`: (body, content type). The store's figures are read
        on the store's reader thread first (a busy store: 503), the exposition is rendered in a worker thread."""
        try:
            state = await self.daemon.store.read(store_figures)
        except StoreBusy as e:
            raise store_busy(e) from None
        return await asyncio.to_thread(self.daemon.metrics.render, state)

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        self.daemon.metrics.observe_http(route, status, seconds, self.daemon.engine.current_adapter)

    def observe_zmq(self, op: str, outcome: str) -> None:
        self.daemon.metrics.observe_zmq(op, outcome, self.daemon.engine.current_adapter)

    def models(self) -> dict:
        """`GET /v1/models`: the one served model, as OpenAI's list object."""
        return {"object": "list", "data": [self.model(self.daemon.model_name)]}

    def model(self, name: str) -> dict:
        """`GET /v1/models/{model}` (OpenAI's retrieve); OpError `not_found` (`model_not_found`) for another name."""
        self.check_model(name)
        d = self.daemon
        return {"id": d.model_name, "object": "model", "created": d.started_at, "owned_by": "sloth-daemon",
                "adapter": d.engine.current_adapter}

    # -- learning signals ---------------------------------------------------------------------------------------
    async def feedback(self, body: FeedbackRequest) -> dict:
        check_text(body)
        store = self.daemon.store
        try:
            check_feedback(body, self.daemon.cfg.limits)
        except TooLarge as e:
            raise OpError("too_large", str(e), param=e.param) from None
        calls = body.correction_tool_calls()
        tokenizer = getattr(self.daemon.engine, "tokenizer", None)

        def add(s: "ReplayStore") -> dict:
            out = s.add_feedback(body.interaction_id, rating=body.rating, correction=body.correction,
                                 comment=body.comment, tool_calls=calls)
            return {**out, "pending_examples": s.count_pending()}

        try:
            if calls is not None and tokenizer is not None and detect(tokenizer) is None:
                await asyncio.to_thread(check_answer_tools, tokenizer, None, calls)
            return await store.write(add)
        except StoreBusy as e:
            raise store_busy(e) from None
        except ToolCallError as e:
            raise OpError("invalid_request", str(e), param=e.param) from None
        except NotFound:
            if store.is_journaled(body.interaction_id):
                raise OpError("unavailable", f"turn {body.interaction_id!r} is answered but not in the replay store "
                              "yet (it waits in the journal); retry shortly", reason="store_busy",
                              retry_after_s=StoreBusy.retry_after_s) from None
            raise OpError("not_found", f"no logged turn with id {body.interaction_id!r} (turns sent with store=false "
                          "are not logged)", param="interaction_id") from None
        except InvalidInput as e:
            raise OpError("invalid_request", str(e), param=e.param) from None

    async def teach(self, body: TeachRequest) -> dict:
        """Store taught pairs and documents; a document longer than `train.max_seq_len` tokens becomes several
        consecutive document examples (`document_chunks` says how many per document). Checking and splitting
        (tokenising) run in a worker thread, the writes in one transaction on the store's writer thread."""
        check_text(body)
        try:
            check_teach(body, self.daemon.cfg.limits)
        except TooLarge as e:
            raise OpError("too_large", str(e), param=e.param) from None
        docs = await asyncio.to_thread(self._check_taught, body)

        def add(s: "ReplayStore") -> dict:
            ids, added = [], 0
            for pair in body.examples:
                ex, created = s.add_taught(pair.as_prompt(), pair.answer_text, **pair.tool_use())
                ids.append(ex.id)
                added += created
            for parts in docs:
                for part in parts:
                    ex, created = s.add_document(part)
                    ids.append(ex.id)
                    added += created
            return {"example_ids": ids, "added": added, "duplicates": len(ids) - added,
                    "document_chunks": [len(parts) for parts in docs], "pending_examples": s.count_pending()}

        try:
            return await self.daemon.store.write(add)
        except StoreBusy as e:
            raise store_busy(e) from None
        except InvalidInput as e:
            raise OpError("invalid_request", str(e), param=e.param) from None
        except ValueError as e:
            raise OpError("invalid_request", str(e)) from None

    def _check_taught(self, body: TeachRequest) -> list[list[str]]:
        """Every taught pair checked against the chat template and its tool calls (all before any is stored), and
        each document split to fit `train.max_seq_len` tokens; CPU work for a worker thread."""
        tokenizer = getattr(self.daemon.engine, "tokenizer", None)
        for i, pair in enumerate(body.examples if tokenizer is not None else ()):
            try:
                tool_use = pair.tool_use()
                check_answer_tools(tokenizer, **tool_use)
                ex = make_example(pair.kind, pair.as_prompt(), pair.answer_text, "teach", **tool_use)
                check_example(tokenizer, pair.kind, ex.prompt, ex.answer, ex.tools, ex.tool_calls)
            except ToolCallError as e:
                raise OpError("invalid_request", f"examples.{i}.{e}", param=f"examples.{i}.{e.param}") from None
            except ChatTemplateError as e:
                raise OpError("invalid_request", f"examples.{i}.prompt: the chat template refused this example: {e}",
                              param=f"examples.{i}.prompt") from None
            except ValueError as e:
                raise OpError("invalid_request", f"examples.{i}: {e}", param=f"examples.{i}") from None
        room = self.daemon.cfg.train.max_seq_len - 1  # the trainer appends the end-of-text token to each document
        return [split_document(tokenizer, doc, room) if tokenizer else [doc] for doc in body.documents]

    async def _read(self, fn: Any) -> Any:
        try:
            return await self.daemon.store.read(fn)
        except StoreBusy as e:
            raise store_busy(e) from None

    async def _write(self, fn: Any) -> Any:
        try:
            return await self.daemon.store.write(fn)
        except StoreBusy as e:
            raise store_busy(e) from None

    async def set_aside(self, limit: int = 100) -> dict:
        """Examples kept out of training (a refused update's, or contradicting an earlier answer), with reasons."""
        limit = max(1, min(limit, 1000))
        return await self._read(lambda s: {"data": s.set_aside_examples(limit=limit), "total": s.count_set_aside()})

    async def requeue(self, body: RequeueRequest) -> dict:
        """Make set-aside examples pending again (all when no ids are given)."""
        check_text(body)
        return await self._write(lambda s: {"requeued": s.requeue(body.example_ids),
                                            "pending_examples": s.count_pending()})

    async def forget(self, body: ForgetRequest) -> dict:
        """Delete what `body` selects, mark the adapters trained on it tainted and rebuild (`forgetting`)."""
        check_text(body)
        d = self.daemon
        try:
            return await forgetting.forget(d.updater, d.store, d.registry, body.model_dump())
        except StoreBusy as e:
            raise store_busy(e) from None
        except NotFound as e:
            raise OpError("not_found", str(e)) from None
        except InvalidInput as e:
            raise OpError("invalid_request", str(e)) from None
        except UpdateAlreadyRunning as e:
            raise OpError("conflict", f"an update would not stop ({e}); try again", reason="update_running") from None

    async def import_examples(self, body: ImportRequest) -> dict:
        """A dataset's rows and documents as training examples (`dataio.importer`): all or nothing unless
        `skip_invalid`. Planning (tokenising) runs in a worker thread, the writes in one transaction on the store's
        writer thread."""
        check_text(body)
        plan = await asyncio.to_thread(lambda: plan_import(body, self._tokenizer(), self.daemon.cfg.train.max_seq_len))
        if plan.errors and not body.skip_invalid:
            first = plan.errors[0]
            raise OpError("invalid_request", f"{first} ({len(plan.errors)} invalid row(s) in all; nothing was "
                          "imported; skip_invalid imports the valid rows)", param=first.field)
        try:
            results, pending = await self._write(lambda s: (s.add_examples(plan.examples), s.count_pending()))
        except InvalidInput as e:
            raise OpError("invalid_request", str(e)) from None
        added = sum(created for _, created in results)
        return {"rows": plan.rows, "examples": len(results), "added": added, "duplicates": len(results) - added,
                "document_chunks": plan.chunks, "skipped": [e.to_json() for e in plan.errors],
                "pending_examples": pending}

    def _tokenizer(self) -> Any:
        """The tokenizer with the chat template serving, teaching and training use: the engine's, or (no engine
        tokenizer yet) the model folder's loaded with the same choice of template (`chat_template.load_tokenizer`)."""
        engine_tokenizer = getattr(self.daemon.engine, "tokenizer", None)
        if engine_tokenizer is not None:
            return engine_tokenizer
        if self._tok is None:
            from .chat_template import load_tokenizer

            self._tok = load_tokenizer(self.daemon.updater.base_model, self.daemon.cfg.chat_template)[0]
        return self._tok

    # -- updates and adapters -----------------------------------------------------------------------------------
    async def status(self) -> dict:
        try:
            return await self.daemon.status()
        except StoreBusy as e:
            raise store_busy(e) from None

    async def trigger_update(self) -> dict:
        try:
            update_id = await self.daemon.updater.start("manual")
        except StoreBusy as e:
            raise store_busy(e) from None
        except NothingToTrain as e:
            raise OpError("conflict", str(e), reason="nothing_to_train") from None
        except UpdateAlreadyRunning as e:
            raise OpError("conflict", f"an update is already running ({e})", reason="update_running") from None
        return {"update_id": update_id, "status": "running"}

    async def updates(self, limit: int = 20) -> dict:
        limit = max(1, min(limit, 200))
        return {"data": await self._read(lambda s: s.list_updates(limit=limit))}

    async def update(self, update_id: int) -> dict:
        row = await self._read(lambda s: s.get_update(update_id))
        if row is None:
            raise OpError("not_found", f"no update {update_id}", param="update_id")
        return row

    async def adapters(self) -> dict:
        registry = self.daemon.registry
        return await asyncio.to_thread(lambda: {"current": registry.current(), "data": registry.to_json()})

    async def rollback(self, body: RollbackRequest) -> dict:
        check_text(body)
        version = None if body.version == "base" else body.version
        try:
            await self.daemon.updater.rollback(version)
        except AdapterNotFound as e:
            raise OpError("not_found", str(e), param="version") from None
        except ValueError as e:
            raise OpError("invalid_request", str(e), param="version") from None
        except AdapterLoadError as e:
            raise OpError("engine_error", str(e), reason="adapter_load_failed") from None
        return {"current": await asyncio.to_thread(self.daemon.registry.current)}

    def remove_adapter(self, version: str) -> dict:
        """Delete an adapter version that is not served: a tainted or rejected one (promoted clean ones stay).
        File I/O: call it in a worker thread."""
        check_text(version)
        registry = self.daemon.registry
        try:
            registry.remove(version)
        except AdapterNotFound as e:
            raise OpError("not_found", str(e), param="version") from None
        except ValueError as e:
            raise OpError("conflict", str(e), param="version") from None
        return {"removed": version, "current": registry.current()}

    def adapter_files(self, version: str) -> dict:
        """A promoted version's files with sizes and sha256 (`adapter_files.manifest`), for a remote vLLM's
        resolver plugin. File I/O: call it in a worker thread."""
        check_text(version)
        try:
            return adapter_files.manifest(self.daemon.registry, version)
        except AdapterNotFound as e:
            raise OpError("not_found", str(e), param="version") from None

    def adapter_file(self, version: str, name: str) -> Path:
        """The path of one of those files (`adapter_files.file_path`). File I/O: call it in a worker thread."""
        check_text(version)
        check_text(name)
        try:
            return adapter_files.file_path(self.daemon.registry, version, name)
        except AdapterNotFound as e:
            raise OpError("not_found", str(e), param="name") from None

    async def interactions(self, limit: int = 50, offset: int = 0) -> dict:
        limit, offset = max(1, min(limit, 500)), max(0, offset)

        def read(s: "ReplayStore") -> dict:
            rows = s.list_interactions(limit=limit, offset=offset)
            feedback = s.feedback_for([r["id"] for r in rows])
            return {"data": [{**r, "feedback": feedback.get(r["id"], [])} for r in rows],
                    "total": s.count_interactions()}

        return await self._read(read)
