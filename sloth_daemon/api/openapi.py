"""The OpenAPI schema (`GET /openapi.json`) as the HTTP API really answers, from FastAPI's own generated schema.

FastAPI documents a 422 for every route with parameters, while this API answers invalid requests with 400 (OpenAI's
status), and it knows nothing of the statuses that middleware and operations produce. `install(app)` replaces the
app's `openapi()` with one that takes FastAPI's schema and then, per operation:
- drops 422 and the validation-error schemas; adds every error status the route can answer (`ROUTE_ERRORS`, plus
  401 wherever the API key applies, 400/408/413 wherever a request body or parameters are read), each with the
  OpenAI-style `ErrorResponse` body, and `Retry-After` on 409 (idempotency key in use), 429 and 503;
- documents `text/event-stream` beside JSON for the routes that stream (`stream: true`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

STATUS_TEXT = {
    400: "invalid request (the error's `param` names the field)",
    401: "missing or wrong API key",
    404: "unknown model, turn, update or adapter version",
    408: "the request body did not arrive within `http_body_timeout_s`",
    409: "conflict (an update is running or there is nothing to train; an idempotency key in use)",
    413: "request body over `limits.max_request_bytes`, or a taught text over its `limits.*` (the error names the field)",
    429: "the engine has `max_queued_requests` requests queued or running; retry after `Retry-After` seconds",
    503: "the engine failed, or the replay store is busy (`code: store_busy`); retry after `Retry-After` seconds",
}
RETRY_AFTER = {409, 429, 503}
STREAMING = {("post", "/v1/chat/completions"), ("post", "/v1/completions")}
ROUTE_ERRORS: dict[tuple[str, str], set[int]] = {
    ("get", "/v1/models/{model}"): {404},
    ("post", "/v1/chat/completions"): {404, 409, 429, 503},
    ("post", "/v1/completions"): {404, 409, 429, 503},
    ("post", "/sloth/feedback"): {404, 503},
    ("post", "/sloth/teach"): {503},
    ("get", "/sloth/status"): {503},
    ("post", "/sloth/updates"): {409, 503},
    ("get", "/sloth/updates"): {503},
    ("get", "/sloth/updates/{update_id}"): {404, 503},
    ("post", "/sloth/adapters/rollback"): {404, 503},
    ("get", "/sloth/interactions"): {503},
    ("get", "/sloth/examples/set-aside"): {503},
    ("post", "/sloth/examples/requeue"): {503},
    ("post", "/sloth/import"): {503},
    ("post", "/sloth/forget"): {404, 409, 503},
    ("delete", "/sloth/adapters/{version}"): {404, 409},
    ("get", "/sloth/adapters/{version}/files"): {404},
    ("get", "/sloth/adapters/{version}/files/{name}"): {404},
    ("get", "/metrics"): {503},
}
OPEN_ROUTES = {("get", "/health")}  # answered without the API key (`/metrics` too on loopback, when configured)

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}


def _error_response(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {"description": STATUS_TEXT[status], "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    if status in RETRY_AFTER:
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer"}}}
    return out


def build_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            errors = set(ROUTE_ERRORS.get((method, path), ()))
            if (method, path) not in OPEN_ROUTES:
                errors.add(401)
            if "requestBody" in op:
                errors |= {400, 408, 413}
            if op.get("parameters"):
                errors.add(400)
            for status in sorted(errors):
                responses[str(status)] = _error_response(status)
            if (method, path) in STREAMING:
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {})["text/event-stream"] = {"schema": {
                    "type": "string", "description": "server-sent events: `data: {chunk}` lines, then "
                    "`data: [DONE]`; a failure after the stream started is an `data: {\"error\": ...}` event"}}
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
