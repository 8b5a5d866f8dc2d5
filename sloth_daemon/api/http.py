"""The HTTP front end (FastAPI): OpenAI-compatible serving plus the daemon's own endpoints under `/sloth/`.

OpenAI-compatible: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with SSE streaming).
Daemon: `POST /sloth/feedback`, `POST /sloth/teach`, `GET /sloth/status`, `POST /sloth/updates` (trigger),
`GET /sloth/updates[/{id}]`, `GET /sloth/adapters`, `POST /sloth/adapters/rollback`, `GET /sloth/interactions`.
`GET /health` is 200 once the daemon serves. Every error is an OpenAI-style body with a 4xx/5xx status.
Responses carry the turn id as `id`; that id is what `/sloth/feedback` takes.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sloth_replay import InvalidInput, NotFound, UpdateAlreadyRunning

from ..adapters import AdapterNotFound
from ..engine.base import AdapterLoadError, EngineError, RequestTooLong, SamplingParams, TextDelta
from ..turns import TurnDone, new_turn_id
from ..updater import NothingToTrain
from .errors import APIError, bad_request, conflict, not_found
from .schemas import ChatCompletionRequest, CompletionRequest, FeedbackRequest, RollbackRequest, TeachRequest

if TYPE_CHECKING:
    from ..service import Daemon


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return (f"{param}: {msg}" if param else msg), param


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(daemon: "Daemon", lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="sloth-daemon", version="0.1.0", lifespan=lifespan)
    cfg = daemon.cfg

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                return APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                type="authentication_error", code="invalid_api_key").response()
        return await call_next(request)

    # -- health and models --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "adapter": daemon.engine.current_adapter}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": daemon.model_name, "object": "model", "created": daemon.started_at, "owned_by": "sloth-daemon",
             "adapter": daemon.engine.current_adapter}
        ]}

    def _check_model(name: str) -> None:
        if name != daemon.model_name:
            raise not_found(f"model {name!r} is not served here; GET /v1/models lists {daemon.model_name!r}",
                            param="model", code="model_not_found")

    def _validate(kind: str, prompt: Any, params: SamplingParams) -> None:
        if params.max_tokens > cfg.generation.max_tokens_limit:
            raise bad_request(f"max_tokens {params.max_tokens} exceeds the limit {cfg.generation.max_tokens_limit}",
                              param="max_tokens")
        try:
            daemon.turns.validate(kind, prompt, params)
        except RequestTooLong as e:
            raise bad_request(str(e), param="messages" if kind == "chat" else "prompt",
                              code="context_length_exceeded") from None

    # -- generation ---------------------------------------------------------------------------------------------
    async def _collect(kind: str, prompt: Any, params: SamplingParams, store: bool) -> TurnDone:
        try:
            async for ev in daemon.turns.run(kind, prompt, params, store=store):
                if isinstance(ev, TurnDone):
                    return ev
        except EngineError as e:
            raise APIError(503, str(e), type="server_error", code="engine_error") from None
        raise APIError(500, "generation ended without a result", type="server_error")

    def _usage(done: TurnDone) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    def _extra(done: TurnDone) -> dict:
        return {"adapter_version": done.adapter_version, "logged": done.logged}

    async def _stream(kind: str, prompt: Any, params: SamplingParams, store: bool, include_usage: bool
                      ) -> AsyncIterator[str]:
        turn_id = new_turn_id(kind)
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_or_text: Any, finish: str | None, **extra: Any) -> dict:
            if kind == "chat":
                choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_or_text, "finish_reason": finish, "logprobs": None}
            return {"id": turn_id, "object": obj, "created": created, "model": daemon.model_name,
                    "choices": [choice], **extra}

        if kind == "chat":
            yield _sse(chunk({"role": "assistant", "content": ""}, None))
        try:
            async for ev in daemon.turns.run(kind, prompt, params, store=store, turn_id=turn_id):
                if isinstance(ev, TextDelta):
                    yield _sse(chunk({"content": ev.text} if kind == "chat" else ev.text, None))
                elif isinstance(ev, TurnDone):
                    yield _sse(chunk({} if kind == "chat" else "", ev.finish_reason, sloth=_extra(ev)))
                    if include_usage:
                        yield _sse({"id": turn_id, "object": obj, "created": created, "model": daemon.model_name,
                                    "choices": [], "usage": _usage(ev)})
        except EngineError as e:
            yield _sse(APIError(503, str(e), type="server_error", code="engine_error").body())
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        _check_model(body.model)
        prompt = body.prompt()
        params = body.sampling(cfg.generation, body.max_completion_tokens)
        _validate("chat", prompt, params)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream("chat", prompt, params, body.store, include), media_type="text/event-stream")
        done = await _collect("chat", prompt, params, body.store)
        return {
            "id": done.id, "object": "chat.completion", "created": int(time.time()), "model": daemon.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(done), "sloth": _extra(done),
        }

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        _check_model(body.model)
        params = body.sampling(cfg.generation)
        _validate("completion", body.prompt, params)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream("completion", body.prompt, params, body.store, include),
                                     media_type="text/event-stream")
        done = await _collect("completion", body.prompt, params, body.store)
        return {
            "id": done.id, "object": "text_completion", "created": int(time.time()), "model": daemon.model_name,
            "choices": [{"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(done), "sloth": _extra(done),
        }

    # -- learning signals ---------------------------------------------------------------------------------------
    @app.post("/sloth/feedback")
    async def feedback(body: FeedbackRequest) -> dict:
        try:
            out = daemon.store.add_feedback(body.interaction_id, rating=body.rating, correction=body.correction,
                                            comment=body.comment)
        except NotFound:
            raise not_found(f"no logged turn with id {body.interaction_id!r} (turns sent with store=false are not "
                            "logged)", param="interaction_id") from None
        except InvalidInput as e:
            raise bad_request(str(e)) from None
        return {**out, "pending_examples": daemon.store.count_pending()}

    @app.post("/sloth/teach")
    async def teach(body: TeachRequest) -> dict:
        ids, added = [], 0
        try:
            for pair in body.examples:
                ex, created = daemon.store.add_taught(pair.as_prompt(), pair.answer)
                ids.append(ex.id)
                added += created
            for doc in body.documents:
                ex, created = daemon.store.add_document(doc)
                ids.append(ex.id)
                added += created
        except (InvalidInput, ValueError) as e:
            raise bad_request(str(e)) from None
        return {"example_ids": ids, "added": added, "duplicates": len(ids) - added,
                "pending_examples": daemon.store.count_pending()}

    # -- updates and adapters -----------------------------------------------------------------------------------
    @app.get("/sloth/status")
    async def status() -> dict:
        return daemon.status()

    @app.post("/sloth/updates", status_code=202)
    async def trigger() -> dict:
        try:
            update_id = daemon.updater.start("manual")
        except NothingToTrain as e:
            raise conflict(str(e), "nothing_to_train") from None
        except UpdateAlreadyRunning as e:
            raise conflict(f"an update is already running ({e})", "update_running") from None
        return {"update_id": update_id, "status": "running"}

    @app.get("/sloth/updates")
    async def updates(limit: int = 20) -> dict:
        return {"data": daemon.store.list_updates(limit=max(1, min(limit, 200)))}

    @app.get("/sloth/updates/{update_id}")
    async def update(update_id: int) -> dict:
        row = daemon.store.get_update(update_id)
        if row is None:
            raise not_found(f"no update {update_id}", param="update_id")
        return row

    @app.get("/sloth/adapters")
    async def adapters() -> dict:
        return {"current": daemon.registry.current(), "data": daemon.registry.to_json()}

    @app.post("/sloth/adapters/rollback")
    async def rollback(body: RollbackRequest) -> dict:
        version = None if body.version == "base" else body.version
        try:
            await daemon.updater.rollback(version)
        except AdapterNotFound as e:
            raise not_found(str(e), param="version") from None
        except ValueError as e:
            raise bad_request(str(e), param="version") from None
        except AdapterLoadError as e:
            raise APIError(503, str(e), type="server_error", code="adapter_load_failed") from None
        return {"current": daemon.registry.current()}

    @app.get("/sloth/interactions")
    async def interactions(limit: int = 50, offset: int = 0) -> dict:
        return {"data": daemon.store.list_interactions(limit=max(1, min(limit, 500)), offset=max(0, offset)),
                "total": daemon.store.count_interactions()}

    return app
