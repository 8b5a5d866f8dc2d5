"""Issue 12 items 3, 5 and 6 on one real daemon, over real HTTP (official `openai` client too) and real ZeroMQ:
a client that hangs up cancels its generation (streaming or not, HTTP and ZeroMQ) and the turn is not logged; an
`Idempotency-Key` (ZeroMQ: `idempotency_key`) retry gets the first answer; admission control answers 429 with
`Retry-After`; the HTTP edge refuses oversized bodies (413, memory back to where it was), slow bodies (408) and slow
request heads; integer parameters out of SQLite's range are 400s; the OpenAPI schema says what the API answers;
a thumbs-up on an empty answer keeps its rating."""

from __future__ import annotations

import json
import shutil
import socket
import time

import httpx
import openai
import pytest
import zmq

from .daemon_proc import DaemonProcess

pytestmark = pytest.mark.slow

MAX_BODY = 65536
LIMIT = 2  # max_queued_requests
LONG = 1500  # max_tokens of a generation that cannot end by itself within the tests' waits
NO_EOS: dict[str, float] = {}  # logit_bias that keeps the model from ending a LONG generation early (set below)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model):
    state = tmp_path_factory.mktemp("edge") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(tiny_model).eos_token_id
    NO_EOS.update({str(t): -100.0 for t in (eos if isinstance(eos, list) else [eos])})
    d = DaemonProcess(state, env={
        "SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_MAX_QUEUED_REQUESTS": str(LIMIT),
        "SLOTH_LIMITS_MAX_REQUEST_BYTES": str(MAX_BODY), "SLOTH_HTTP_HEADER_TIMEOUT_S": "2",
        "SLOTH_HTTP_BODY_TIMEOUT_S": "2", "SLOTH_GENERATION_MAX_TOKENS_LIMIT": "2000"}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def http(daemon):
    with daemon.http() as c:
        yield c


def chat(content="Tell me a long story about a sloth.", max_tokens=LONG, **kw):
    body = {"model": "sloth-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": 1, **kw}
    if max_tokens == LONG:
        # The taught tiny model answers briefly and fast: a long generation must not end early (no end-of-turn
        # token) and gets 8 choices, generated one after another (seconds, not the tests' fractions of one).
        body.update(logit_bias=dict(NO_EOS), n=8)
    return body


def logged(http) -> int:
    return http.get("/sloth/interactions").json()["total"]


def wait_idle(http, timeout=10.0) -> None:
    """Until nothing is queued or generating; fails if generations keep running (i.e. were not cancelled)."""
    deadline = time.monotonic() + timeout
    while True:
        status = http.get("/sloth/status").json()
        if status["admission"]["in_flight"] == 0 and not status["in_flight"]:
            return
        assert time.monotonic() < deadline, f"generation still running after its client left: {status}"
        time.sleep(0.1)


def wait_generating(http, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not http.get("/sloth/status").json()["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_http_clients_that_hang_up_cancel_their_generation(daemon, http):
    before = logged(http)
    # Non-streaming: the official client with a short timeout and its default retries (3 attempts, 3 hang-ups).
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="none", timeout=0.5, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(**chat())
    wait_idle(http)
    # Streaming: hang up after the first event (the role chunk, sent as generation starts).
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=chat(stream=True), timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))
    wait_idle(http)
    assert logged(http) == before  # undelivered turns are not logged
    # The engine is free at once for the next client.
    assert http.post("/v1/chat/completions", json=chat(max_tokens=2)).json()["sloth"]["logged"] is True


def test_zmq_clients_that_hang_up_cancel_their_generation(daemon, http):
    before = logged(http)
    ctx = zmq.Context()
    try:
        for stream in (False, True):
            sock = ctx.socket(zmq.DEALER)
            sock.connect(f"ipc://{daemon.state_dir / 'api.sock'}")
            sock.send(json.dumps({"v": 1, "id": f"gone-{stream}", "op": "chat", "stream": stream,
                                  **chat()}).encode())
            wait_generating(http)
            sock.close(linger=0)
            wait_idle(http)
    finally:
        ctx.term()
    assert logged(http) == before


def test_idempotency_key_returns_the_first_answer(daemon, http):
    key = {"Idempotency-Key": "retry-me-1"}
    first = http.post("/v1/chat/completions", json=chat(max_tokens=6), headers=key).json()
    before = logged(http)
    again = http.post("/v1/chat/completions", json=chat(max_tokens=6), headers=key).json()
    assert again["id"] == first["id"] and again["choices"] == first["choices"]
    with http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=6, stream=True), headers=key) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert {e["id"] for e in events} == {first["id"]}  # the same answer, delivered as a stream
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == \
        first["choices"][0]["message"]["content"]
    assert logged(http) == before  # nothing generated or logged again
    other = http.post("/v1/chat/completions", json=chat(max_tokens=7), headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_in_use"
    # ZeroMQ: the same idempotency_key and request again gets the same answer (a new request id, as after a reconnect).
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"ipc://{daemon.state_dir / 'api.sock'}")
    try:
        answers = []
        for attempt in range(2):
            sock.send(json.dumps({"v": 1, "id": f"zmq-retry-{attempt}", "op": "chat", "idempotency_key": "zmq-retry",
                                  **chat(max_tokens=6)}).encode())
            assert sock.poll(60_000)
            answers.append(json.loads(sock.recv()))
        assert answers[0]["type"] == "final" and answers[0]["interaction_id"] == answers[1]["interaction_id"]
        assert answers[0]["text"] == answers[1]["text"]
        # The same request id without the key is a request of its own (ids are numbered per connection).
        sock.send(json.dumps({"v": 1, "id": "zmq-retry-0", "op": "chat", **chat(max_tokens=6)}).encode())
        assert sock.poll(60_000)
        assert json.loads(sock.recv())["interaction_id"] != answers[0]["interaction_id"]
    finally:
        sock.close(linger=0)
        ctx.term()


def test_admission_control_answers_429_with_retry_after(daemon, http):
    assert http.get("/sloth/status").json()["admission"]["limit"] == LIMIT
    # LIMIT long generations hold the engine (the first event of a stream is sent once it is admitted).
    streams = [httpx.stream("POST", daemon.url + "/v1/chat/completions", json=chat(stream=True, store=False),
                            timeout=60) for _ in range(LIMIT)]
    readers = []  # kept: dropping a half-read line iterator closes the connection (httpcore), i.e. hangs up
    try:
        for s in streams:
            readers.append(s.__enter__().iter_lines())
            assert next(readers[-1]).startswith("data: {")
        refused = http.post("/v1/chat/completions", json=chat(max_tokens=2))
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_busy"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"ipc://{daemon.state_dir / 'api.sock'}")
        sock.send(json.dumps({"v": 1, "id": 1, "op": "chat", **chat(max_tokens=2)}).encode())
        assert sock.poll(30_000)
        assert json.loads(sock.recv())["code"] == "busy"
        sock.close(linger=0)
        ctx.term()
        assert http.get("/health").status_code == 200 and http.get("/sloth/status").status_code == 200
        status = http.get("/sloth/status").json()["admission"]
        assert status["refused_total"] >= 2 and status["in_flight"] == LIMIT
        metrics = http.get("/metrics").text
        assert f"sloth_admission_limit {LIMIT}.0" in metrics and "sloth_admission_refused_total" in metrics
    finally:
        for s in streams:
            s.__exit__(None, None, None)  # hanging up cancels them
    wait_idle(http)
    assert http.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_oversized_and_slow_requests_are_refused_at_the_edge(daemon, http):
    rss = rss_bytes(daemon.proc.pid)
    big = b'{"model": "sloth-tiny", "messages": [{"role": "user", "content": "' + b"x" * 72_000_000 + b'"}]}'
    r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for _ in range(100):
            yield b"x" * 10_000
    r = http.post("/sloth/teach", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert rss_bytes(daemon.proc.pid) - rss < 30_000_000  # the bodies were never held
    assert http.post("/sloth/teach", json={"documents": ["y" * 1000]}).status_code == 200  # small ones pass

    # A body that stops half-way gets 408; a request head that never ends is cut off.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as s:
        s.sendall(b"POST /sloth/teach HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        assert s.recv(1000).startswith(b"HTTP/1.1 408")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        assert s.recv(1000) == b""  # closed by the daemon
    assert http.get("/health").status_code == 200


def test_integers_beyond_sqlite_are_400_on_both_transports(daemon, http):
    for path, param in (("/sloth/updates/9223372036854775808", "update_id"),
                        ("/sloth/interactions?offset=9223372036854775808", "offset"),
                        ("/sloth/interactions?limit=-1", "limit"), ("/sloth/updates?limit=0", "limit")):
        r = http.get(path)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"ipc://{daemon.state_dir / 'api.sock'}")
    try:
        for op, fields in (("updates", {"update_id": 2**63}), ("interactions", {"offset": 2**63})):
            sock.send(json.dumps({"v": 1, "id": op, "op": op, **fields}).encode())
            assert sock.poll(30_000)
            assert json.loads(sock.recv())["code"] == "invalid_request"
    finally:
        sock.close(linger=0)
        ctx.term()


def test_openapi_schema_matches_the_answers(http):
    schema = http.get("/openapi.json").json()
    ops = [(p, m, op) for p, ms in schema["paths"].items() for m, op in ms.items()]
    assert all("422" not in op["responses"] for _, _, op in ops)
    chat_op = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "409", "413", "429", "503"} <= set(chat_op)
    assert "text/event-stream" in chat_op["200"]["content"]
    assert "Retry-After" in chat_op["429"]["headers"]
    assert schema["paths"]["/sloth/updates/{update_id}"]["get"]["responses"]["404"]


def test_thumbs_up_on_an_empty_answer_keeps_the_rating(http):
    greedy = http.post("/v1/completions", json={"model": "sloth-tiny", "prompt": "Once upon a time",
                                                "max_tokens": 4, "temperature": 0}).json()
    first = greedy["choices"][0]["text"][:1]
    empty = http.post("/v1/completions", json={"model": "sloth-tiny", "prompt": "Once upon a time", "max_tokens": 4,
                                               "temperature": 0, "stop": [first]}).json()
    assert empty["choices"][0]["text"] == "" and empty["sloth"]["logged"]
    r = http.post("/sloth/feedback", json={"interaction_id": empty["id"], "rating": "up"})
    assert r.status_code == 200 and r.json()["feedback_id"] and r.json()["example_id"] is None
