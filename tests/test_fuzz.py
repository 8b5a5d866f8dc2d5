"""Fuzzing the HTTP API from its own OpenAPI schema, and the ZeroMQ protocol with random frames and fields (issue 12,
item 8), on one real daemon.

Every operation of `GET /openapi.json` (but `POST /sloth/updates`, which trains) gets seeded random bodies and
parameters from `tests/fuzzing.py`: conforming ones, mutated ones and raw garbage. Each answer must come within its
timeout (no hang), be a status the schema documents for that operation, never a 5xx (a 503 only as the documented
`store_busy`), and every error must be an OpenAI-style body; a stream must end with `[DONE]`. ZeroMQ gets random
frame counts, random bytes, JSON and msgpack requests with random ops and fields: every message is answered, with
`internal` never among the codes. Afterwards the daemon is healthy and serves both transports.
Bounded (`SEED`, `PER_OPERATION`, a 4-token generation limit) so the whole module runs in about a minute.
"""

from __future__ import annotations

import json
import shutil
from urllib.parse import quote

import httpx
import msgpack
import pytest
import zmq

from .daemon_proc import DaemonProcess
from .fuzzing import SchemaFuzzer, dumps

pytestmark = pytest.mark.slow

SEED = 12
PER_OPERATION = 24  # conforming + mutated bodies per operation (plus garbage for those with a body)
TIMEOUT_S = 60  # an answer later than this is a hang
SKIPPED = {("post", "/sloth/updates")}  # would start real training; it takes no input
ZMQ_CODES = {"invalid_message", "unsupported_version", "unknown_op", "too_large", "unauthorized", "busy",
             "invalid_request", "not_found", "conflict", "cancelled"}
ZMQ_OPS = {"chat": "ChatCompletionRequest", "complete": "CompletionRequest", "feedback": "FeedbackRequest",
           "teach": "TeachRequest", "import": "ImportRequest", "rollback": "RollbackRequest",
           "requeue": "RequeueRequest", "status": None, "models": None, "adapters": None, "updates": None,
           "interactions": None, "set_aside": None, "cancel": None}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model):
    state = tmp_path_factory.mktemp("fuzz") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    d = DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false",
                                  "SLOTH_GENERATION_MAX_TOKENS_LIMIT": "4", "SLOTH_LIMITS_MAX_REQUEST_BYTES": "262144",
                                  "SLOTH_HTTP_BODY_TIMEOUT_S": "5"}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def schema(daemon):
    return httpx.get(daemon.url + "/openapi.json", timeout=TIMEOUT_S).json()


def check_answer(r: httpx.Response, documented: dict, what: str) -> None:
    assert str(r.status_code) in documented, f"{what}: status {r.status_code} is not in the schema: {r.text[:300]}"
    if r.status_code >= 500:
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_busy", f"{what}: {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), what
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", f"{what}: stream without [DONE]: {r.text[-300:]}"
        for line in lines[:-1]:
            event = json.loads(line[6:])
            assert "choices" in event or "error" in event, what
            if "error" in event:
                assert event["error"]["type"] != "server_error", f"{what}: {event}"
    elif r.headers.get("content-type", "").startswith("application/json"):
        r.json()


def param_value(fuzz: SchemaFuzzer, spec: dict) -> str:
    r = fuzz.rng
    value = fuzz.conforming(spec["schema"]) if r.random() < 0.5 else fuzz.mutated({"x": 1})
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    return str(value)


def test_http_api_answers_fuzzed_requests_with_documented_4xx(daemon, schema):
    fuzz = SchemaFuzzer(SEED, schema["components"])
    sent = 0
    with httpx.Client(base_url=daemon.url, timeout=TIMEOUT_S) as http:
        for path, methods in schema["paths"].items():
            for method, op in methods.items():
                if (method, path) in SKIPPED:
                    continue
                body_schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
                params = op.get("parameters", [])
                cases: list[bytes | None] = []
                for i in range(PER_OPERATION if body_schema or params else 1):
                    if body_schema is None:
                        cases.append(None)
                        continue
                    value = fuzz.conforming(body_schema)
                    cases.append(dumps(value if i % 2 == 0 else fuzz.mutated(value)))
                if body_schema is not None:
                    cases += [fuzz.garbage() for _ in range(4)]
                for body in cases:
                    url, query, headers = path, {}, {"content-type": "application/json"}
                    for p in params:
                        value = param_value(fuzz, p)
                        if p["in"] == "path":
                            url = url.replace("{" + p["name"] + "}", quote(value, safe="", errors="surrogatepass") or "x")
                        elif p["in"] == "query":
                            query[p["name"]] = value
                        elif p["in"] == "header" and value.isascii() and value.isprintable() and value == value.strip():
                            headers[p["name"]] = value
                    what = f"{method.upper()} {url} {query} {body[:200] if body else body!r}"
                    if query:  # encoded here: httpx refuses what a hostile client sends (lone surrogates)
                        url += "?" + "&".join(f"{k}={quote(v, safe='', errors='surrogatepass')}"
                                              for k, v in query.items())
                    r = http.request(method.upper(), url, content=body, headers=headers)
                    check_answer(r, op["responses"], what)
                    sent += 1
    assert sent > 200
    assert httpx.get(daemon.url + "/health", timeout=TIMEOUT_S).status_code == 200


def test_zmq_answers_fuzzed_messages_with_error_codes(daemon, schema):
    fuzz = SchemaFuzzer(SEED + 1, schema["components"])
    r = fuzz.rng
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"ipc://{daemon.state_dir / 'api.sock'}")
    try:
        for i in range(200):
            op = r.choice([*ZMQ_OPS, "trigger", "", 7])
            fields: dict = {}
            if isinstance(op, str) and ZMQ_OPS.get(op):
                fields = fuzz.conforming({"$ref": f"#/components/schemas/{ZMQ_OPS[op]}"})
            elif op in ("updates", "interactions", "set_aside", "cancel"):
                fields = {r.choice(["limit", "offset", "update_id", "target"]): r.choice([1, 2**63, -1, "x", None])}
            msg = {"v": r.choice([1, 1, 1, 2, "1", None]), "id": r.choice([f"f{i}", i + 1, "", None, 1.5, "\ud800"]),
                   "op": op, **fields}
            if r.random() < 0.3:
                msg = fuzz.mutated(msg)
            kind = r.random()
            if kind < 0.1:
                frames = [fuzz.garbage()]
            elif kind < 0.15:
                frames = [b"", b"", dumps(msg)]  # a frame count no client sends
            elif kind < 0.35 and isinstance(msg, dict):
                try:
                    frames = [msgpack.packb(msg)]
                except (TypeError, ValueError, OverflowError):
                    frames = [dumps(msg)]
            else:
                frames = [dumps(msg)]
            sock.send_multipart(frames)
            # Every message is answered: replies up to its last one (final, result or error), in time.
            while True:
                assert sock.poll(TIMEOUT_S * 1000), f"no answer to {frames!r}"[:500]
                data = sock.recv_multipart()[-1]
                reply = msgpack.unpackb(data) if data[:1] != b"{" else json.loads(data)
                assert reply.get("type") in ("chunk", "final", "result", "error"), reply
                if reply["type"] == "error":
                    assert reply["code"] in ZMQ_CODES, (frames, reply)
                if reply["type"] != "chunk":
                    break
    finally:
        sock.close(linger=0)
        ctx.term()
    with httpx.Client(base_url=daemon.url, timeout=TIMEOUT_S) as http:
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/chat/completions", json={"model": "sloth-tiny", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
        assert ok.status_code == 200 and ok.json()["sloth"]["logged"] is True
