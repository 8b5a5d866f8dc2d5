"""The HTTP front end (FastAPI): OpenAI-compatible serving plus the daemon's own endpoints under `/sloth/`.

OpenAI-compatible: `GET /v1/models[/{model}]`, `POST /v1/chat/completions`, `POST /v1/completions` (both with SSE
streaming).
Daemon: `POST /sloth/feedback`, `POST /sloth/teach`, `POST /sloth/import` (datasets), `GET /sloth/status`,
`POST /sloth/updates` (trigger), `GET /sloth/updates[/{id}]`, `GET /sloth/adapters`, `POST /sloth/adapters/rollback`,
`GET /sloth/interactions`, `GET /sloth/examples/set-aside`, `POST /sloth/examples/requeue`, `POST /sloth/forget`,
`DELETE /sloth/adapters/{version}`, `GET /sloth/adapters/{version}/files[/{name}]` (a promoted version's files, for
a remote vLLM's resolver plugin: `adapter_files`).
`GET /health` is 200 once the daemon serves. `GET /metrics` is the Prometheus exposition (`metrics.py`); `GET /` is
the status page (`api/page.py`), which reads the JSON API from the browser. Every error is an OpenAI-style body with
a 4xx/5xx status (429 and 503 with `Retry-After`).
The edge (`api/edge.py`) refuses bodies over `limits.max_request_bytes` (413), bodies that arrive too slowly (408)
and cancels a route whose client hung up; `Idempotency-Key` on the generation routes makes a retry get the first
answer; `GET /openapi.json` documents what the routes really answer (`api/openapi.py`).
With `api_key` set every route but `/health` needs `Authorization: Bearer <key>` (`api/auth.py`); browsers on the
origins in `cors_allowed_origins` may call the API (Starlette's CORSMiddleware; preflights need no key).
Responses carry the turn id as `id`; that id is what `/sloth/feedback` takes. The operations themselves live in
`sloth_daemon.operations` (shared with the ZeroMQ front end); this module maps them to routes and OpenAI bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated, Any, AsyncIterator

from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..engine.base import TextDelta
from ..dataio.importer import ImportRequest
from ..engine.logprobs import chat_logprobs, completion_logprobs
from ..operations import OpError, Operations, Turn, usage, validation_error
from ..turns import Choice, TurnDone, new_turn_id
from .auth import bearer_key_matches, key_exempt
from .edge import EdgeGuard
from .errors import APIError
from .openapi import install as install_openapi
from .page import mount_page
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ForgetRequest,
    RequeueRequest,
    RollbackRequest,
    TeachRequest,
)

log = logging.getLogger(__name__)

_ERROR_TYPES = {"invalid_request": "invalid_request_error", "unauthorized": "authentication_error",
                "not_found": "not_found_error", "conflict": "conflict_error", "too_large": "invalid_request_error",
                "busy": "rate_limit_error"}
MAX_INT64 = 2**63 - 1  # SQLite's INTEGER: larger ids and offsets are a 400, not an overflow deeper down
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255, description=(
    "a retry with the same key and body within `idempotency_window_s` gets the first answer, not a new one"))]


def _scoped(key: str | None) -> str | None:
    return None if key is None else "http:" + key


def api_error(e: OpError) -> APIError:
    """An operation's error as an OpenAI-style error: the category picks status and type, the reason is the code."""
    code = e.reason or ("not_found" if e.code == "not_found" else None)
    return APIError(e.status, e.message, type=_ERROR_TYPES.get(e.code, "server_error"), param=e.param, code=code,
                    retry_after_s=e.retry_after_s)


def route_of(app: FastAPI, scope: dict) -> str:
    """The path template a request matched (`/sloth/updates/{update_id}`), for metric labels; "other" when none
    did (unknown paths must not each make a label value)."""
    for route in app.router.routes:
        if route.matches(scope)[0] == Match.FULL:
            return getattr(route, "path", "other")
    return "other"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(ops: Operations, lifespan: Any = None) -> FastAPI:
    """The FastAPI app over `ops`; `lifespan` starts and stops the daemon around serving."""
    # No redirects for a trailing slash: every answer is one the OpenAPI schema documents (a 404 for unknown paths).
    app = FastAPI(title="sloth-daemon", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    cfg = ops.cfg

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(OpError)
    async def _op_error(_req: Request, exc: OpError) -> JSONResponse:
        return api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return api_error(validation_error(list(exc.errors()))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = cfg.api_key  # read per request: a SIGHUP reload may change it
        if key and not key_exempt(request, cfg):
            if not bearer_key_matches(request.headers.get("authorization"), key):
                return APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                type="authentication_error", code="invalid_api_key").response()
        return await call_next(request)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        # Outside the key check, so refused requests are counted too; the duration is to the response's headers.
        t0 = time.monotonic()
        response = await call_next(request)
        ops.observe_http(route_of(app, request.scope), response.status_code, time.monotonic() - t0)
        return response

    # Around the key check, the metrics and the routes (only CORS is outside it): body limit and deadline, and
    # cancelling a route whose client went away (api/edge.py).
    app.add_middleware(EdgeGuard, limits=lambda: (cfg.limits.max_request_bytes, cfg.http_body_timeout_s))

    # Added last, so outermost: preflights are answered before the key check (browsers send no credentials with
    # them), and every response, a 401 included, carries the CORS headers an allowed origin needs to read it.
    app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_allowed_origins), allow_methods=["*"],
                       allow_headers=["*"], allow_credentials=False, max_age=600)

    # -- metrics and the status page ----------------------------------------------------------------------------
    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = await ops.metrics()  # the store read and the rendering run off the event loop
        return Response(body, media_type=content_type)

    mount_page(app)

    # -- health and models --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        return ops.health()

    @app.get("/v1/models")
    async def models() -> dict:
        return ops.models()

    @app.get("/v1/models/{model:path}")  # ids may hold a slash ("org/name"), as in OpenAI's and vLLM's routes
    async def model(model: str) -> dict:
        return ops.model(model)

    # -- generation ---------------------------------------------------------------------------------------------
    def _extra(done: TurnDone) -> dict:
        return {"adapter_version": done.adapter_version, "logged": done.logged, "journaled": done.journaled}

    def _message(c: Choice) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": c.message_content}
        if c.tool_calls:
            message["tool_calls"] = list(c.tool_calls)
        return message

    def _logprobs(kind: str, tokens: Any) -> dict | None:
        if tokens is None:
            return None
        return chat_logprobs(tokens) if kind == "chat" else completion_logprobs(tokens)

    async def _stream(turn: Turn, include_usage: bool) -> AsyncIterator[str]:
        kind = turn.kind
        turn_id = turn.replay.id if turn.replay is not None else new_turn_id(kind)
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        want_logprobs = turn.params.logprobs

        def chunk(index: int, delta_or_text: Any, finish: str | None, logprobs: Any = None, **extra: Any) -> dict:
            lp = _logprobs(kind, logprobs) if want_logprobs and logprobs is not None else None
            if kind == "chat":
                choice = {"index": index, "delta": delta_or_text, "finish_reason": finish, "logprobs": lp}
            else:
                choice = {"index": index, "text": delta_or_text, "finish_reason": finish, "logprobs": lp}
            return {"id": turn_id, "object": obj, "created": created, "model": ops.model_name,
                    "choices": [choice], **extra}

        if kind == "chat":
            for index in range(turn.params.n):
                yield _sse(chunk(index, {"role": "assistant", "content": ""}, None))
        try:
            async for ev in ops.run(turn, transport="http", turn_id=turn_id):
                if isinstance(ev, TextDelta):
                    yield _sse(chunk(ev.index, {"content": ev.text} if kind == "chat" else ev.text, None,
                                     ev.logprobs))
                elif isinstance(ev, TurnDone):
                    if turn.tool_use is not None and turn.tool_use.parses:  # held back until parsed: send now
                        for c in ev.choices:
                            delta: dict[str, Any] = {"content": c.message_content}
                            if c.tool_calls:
                                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(c.tool_calls)]
                            yield _sse(chunk(c.index, delta, None, c.logprobs))
                    for c in ev.choices:
                        yield _sse(chunk(c.index, {} if kind == "chat" else "", c.finish_reason, sloth=_extra(ev)))
                    if include_usage:
                        yield _sse({"id": turn_id, "object": obj, "created": created, "model": ops.model_name,
                                    "choices": [], "usage": usage(ev)})
        except OpError as e:
            yield _sse(api_error(e).body())
        except Exception as e:  # the response has started: the failure goes into the stream, which still ends
            log.exception("stream %s failed", turn_id)
            yield _sse(APIError(500, f"internal error: {e.__class__.__name__}", type="server_error").body())
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, idempotency_key: IdempotencyKey = None):
        turn = await ops.prepare_chat(body, idempotency_key=_scoped(idempotency_key))
        if body.streaming:
            return StreamingResponse(_stream(turn, body.include_usage), media_type="text/event-stream")
        done = await ops.collect(turn, transport="http")
        return {
            "id": done.id, "object": "chat.completion", "created": int(time.time()), "model": ops.model_name,
            "choices": [{"index": c.index, "message": _message(c), "finish_reason": c.finish_reason,
                         "logprobs": _logprobs("chat", c.logprobs)} for c in done.choices],
            "usage": usage(done), "sloth": _extra(done),
        }

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, idempotency_key: IdempotencyKey = None):
        turn = await ops.prepare_completion(body, idempotency_key=_scoped(idempotency_key))
        if body.streaming:
            return StreamingResponse(_stream(turn, body.include_usage), media_type="text/event-stream")
        done = await ops.collect(turn, transport="http")
        return {
            "id": done.id, "object": "text_completion", "created": int(time.time()), "model": ops.model_name,
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": _logprobs("completion", c.logprobs)} for c in done.choices],
            "usage": usage(done), "sloth": _extra(done),
        }

    # -- learning signals ---------------------------------------------------------------------------------------
    @app.post("/sloth/feedback")
    async def feedback(body: FeedbackRequest) -> dict:
        return await ops.feedback(body)

    @app.post("/sloth/teach")
    async def teach(body: TeachRequest) -> dict:
        return await ops.teach(body)

    @app.get("/sloth/examples/set-aside")
    async def set_aside(limit: Annotated[int, Query(ge=1, le=MAX_INT64)] = 100) -> dict:
        return await ops.set_aside(limit)

    @app.post("/sloth/examples/requeue")
    async def requeue(body: RequeueRequest) -> dict:
        return await ops.requeue(body)

    @app.post("/sloth/forget")
    async def forget(body: ForgetRequest) -> dict:
        return await ops.forget(body)

    @app.post("/sloth/import")
    async def import_examples(body: ImportRequest) -> dict:
        return await ops.import_examples(body)

    # -- updates and adapters -----------------------------------------------------------------------------------
    @app.get("/sloth/status")
    async def status() -> dict:
        return await ops.status()

    @app.post("/sloth/updates", status_code=202)
    async def trigger() -> dict:
        return await ops.trigger_update()

    @app.get("/sloth/updates")
    async def updates(limit: Annotated[int, Query(ge=1, le=MAX_INT64)] = 20) -> dict:
        return await ops.updates(limit)

    @app.get("/sloth/updates/{update_id}")
    async def update(update_id: Annotated[int, Path(ge=1, le=MAX_INT64)]) -> dict:
        return await ops.update(update_id)

    @app.get("/sloth/adapters")
    async def adapters() -> dict:
        return await ops.adapters()

    @app.delete("/sloth/adapters/{version}")
    async def remove_adapter(version: str) -> dict:
        return await asyncio.to_thread(ops.remove_adapter, version)

    @app.get("/sloth/adapters/{version}/files")
    async def adapter_files(version: str) -> dict:
        return await asyncio.to_thread(ops.adapter_files, version)

    @app.get("/sloth/adapters/{version}/files/{name}", response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def adapter_file(version: str, name: str) -> FileResponse:
        path = await asyncio.to_thread(ops.adapter_file, version, name)
        return FileResponse(path, media_type="application/octet-stream")

    @app.post("/sloth/adapters/rollback")
    async def rollback(body: RollbackRequest) -> dict:
        return await ops.rollback(body)

    @app.get("/sloth/interactions")
    async def interactions(limit: Annotated[int, Query(ge=1, le=MAX_INT64)] = 50,
                           offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0) -> dict:
        return await ops.interactions(limit, offset)

    install_openapi(app)
    return app
