"""The ZeroMQ front end over real sockets (IPC and TCP) against a real daemon: the wire format of every op, the same
semantics and replay-store logging as HTTP, the API key on TCP, bad frames of every kind, busy clients, clients that
vanish mid-stream, and a clean shutdown."""

from __future__ import annotations

import json
import random
import shutil
import socket
import stat
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import zmq

from .conftest import API_KEY
from .daemon_proc import DaemonProcess, free_port
from .test_metrics import scrape

MAX_BYTES = 64 * 1024
MAX_INFLIGHT = 4
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def zd(tmp_path_factory, tiny_model):
    state = tmp_path_factory.mktemp("zmq") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    ipc, tcp = f"ipc://{state}/api.sock", f"tcp://127.0.0.1:{free_port()}"
    daemon = DaemonProcess(state, env={
        "SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_API_KEY": API_KEY,
        "SLOTH_TRAIN_STEPS": "2", "SLOTH_ZMQ_MAX_MESSAGE_BYTES": str(MAX_BYTES),
        "SLOTH_ZMQ_MAX_INFLIGHT": str(MAX_INFLIGHT),
    }, args=["--zmq", f"{ipc},{tcp}"]).start()
    daemon.ipc, daemon.tcp = ipc, tcp
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def http(zd):
    with httpx.Client(base_url=zd.url, headers=AUTH, timeout=60) as c:
        yield c


class Peer:
    """A raw ZeroMQ peer speaking the wire protocol by hand (DEALER, or REQ with its empty delimiter)."""

    def __init__(self, address: str, kind: int = zmq.DEALER, key: str | None = API_KEY):
        self.sock = zmq.Context.instance().socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.address = address
        self.key = key if address.startswith("tcp://") else None
        self.ids = iter(range(1, 10**9))

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 30) -> dict | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        data = self.sock.recv_multipart()[-1]  # after the empty delimiter, if the request had one
        return msgpack.unpackb(data) if data[:1] != b"{" else json.loads(data)

    def message(self, op: str, **fields) -> dict:
        msg = {"v": 1, "id": next(self.ids), "op": op, **fields}
        if self.key:
            msg["key"] = self.key
        return msg

    def call(self, op: str, timeout: float = 60, **fields) -> list[dict]:
        """Send one request; every message answering it, up to the last (final, result or error)."""
        msg = self.message(op, **fields)
        self.send(json.dumps(msg).encode())
        out = []
        while True:
            reply = self.recv(timeout)
            assert reply is not None, f"no answer to {op}"
            assert reply["id"] == msg["id"] and reply["v"] == 1
            out.append(reply)
            if reply["type"] != "chunk":
                return out

    def result(self, op: str, **fields) -> dict:
        reply = self.call(op, **fields)[-1]
        assert reply["type"] == "result", reply
        return reply["result"]

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture(params=["ipc", "tcp"])
def peer(request, zd):
    p = Peer(zd.ipc if request.param == "ipc" else zd.tcp)
    yield p
    p.close()


def chat(content: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0, **kw}


def error_of(replies: list[dict]) -> dict:
    assert len(replies) == 1 and replies[0]["type"] == "error", replies
    return replies[0]


def test_ipc_socket_is_owner_only(zd):
    st = Path(zd.ipc[len("ipc://"):]).stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_generation_streams_chunks_then_final_and_logs_as_zmq(peer, http):
    plain = peer.call("chat", **chat("What is sloth-daemon?"))
    assert len(plain) == 1  # no stream: only the final message
    final = plain[0]
    assert final["type"] == "final" and final["interaction_id"].startswith("chatcmpl-")
    assert final["finish_reason"] in ("stop", "length") and final["logged"] is True
    assert final["usage"]["completion_tokens"] <= 12 and final["usage"]["total_tokens"] > 12
    assert final["adapter_version"] is None and final["model"] == "sloth-tiny"

    streamed = peer.call("chat", **chat("What is sloth-daemon?", stream=True))
    chunks, last = streamed[:-1], streamed[-1]
    assert chunks and all(m["type"] == "chunk" and m["text"] for m in chunks)
    assert "".join(m["text"] for m in chunks) == last["text"] == final["text"]  # greedy: both ways agree

    done = peer.call("complete", prompt="Once upon", max_tokens=5, temperature=0)[-1]
    assert done["type"] == "final" and done["interaction_id"].startswith("cmpl-")
    rows = {r["id"]: r for r in http.get("/sloth/interactions", params={"limit": 10}).json()["data"]}
    for m in (final, last, done):
        assert rows[m["interaction_id"]]["transport"] == "zmq"
        assert rows[m["interaction_id"]]["response"] == m["text"]


def test_store_false_is_served_but_never_logged(peer, http):
    before = http.get("/sloth/interactions").json()["total"]
    final = peer.call("chat", **chat("Hello", store=False, stream=True))[-1]
    assert final["type"] == "final" and final["text"] and final["logged"] is False
    assert http.get("/sloth/interactions").json()["total"] == before
    err = error_of(peer.call("feedback", interaction_id=final["interaction_id"], rating="up"))
    assert err["code"] == "not_found" and err["param"] == "interaction_id"


def test_feedback_and_teach_share_the_store_with_http(peer, http, zd):
    turn = peer.call("chat", **chat(f"Say something about {peer.address}"))[-1]  # a new example per run
    pending = peer.result("status")["pending_examples"]
    out = peer.result("feedback", interaction_id=turn["interaction_id"], correction="Something!")
    assert out["example_id"] and out["pending_examples"] == pending + 1
    # the same turn, rated over HTTP: one store, one id space
    up = http.post("/sloth/feedback", json={"interaction_id": turn["interaction_id"], "rating": "up"}).json()
    assert up["pending_examples"] == pending + 1 and up["example_id"] == out["example_id"]  # endorses the fix
    http_turn = http.post("/v1/chat/completions", json={"model": "sloth-tiny", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert peer.result("feedback", interaction_id=http_turn["id"], rating="down")["example_id"] is None
    taught = peer.result("teach", examples=[{"prompt": "Capital of Sloth Island?", "answer": "Leafton."}],
                         documents=["Sloths move slowly."])
    again = peer.result("teach", examples=[{"prompt": "Capital of Sloth Island?", "answer": "Leafton."}],
                        documents=["Sloths move slowly."])
    assert taught["example_ids"] == again["example_ids"] and again["duplicates"] == 2
    status = http.get("/sloth/status").json()
    assert status["pending_examples"] == peer.result("status")["pending_examples"]
    assert status["zmq"] == [zd.ipc, zd.tcp]


def test_import_is_the_http_import(peer, http):
    tag = peer.address  # new examples per run
    rows = [{"messages": [{"role": "user", "content": f"Import over {tag}?"}, {"role": "assistant", "content": "Yes."}]},
            {"instruction": f"Name the socket of {tag}.", "output": "A ROUTER."},
            {"conversations": [{"from": "human", "value": f"Import over {tag}?"}, {"from": "gpt", "value": "Yes."}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}]
    lines = [3, 4, 5, 6]
    pending = http.get("/sloth/status").json()["pending_examples"]
    err = error_of(peer.call("import", rows=rows, lines=lines))
    over_http = http.post("/sloth/import", json={"rows": rows, "lines": lines})
    assert over_http.status_code == 400
    assert err["code"] == "invalid_request" and err["param"] == over_http.json()["error"]["param"] == "messages.1.content"
    assert err["message"] == over_http.json()["error"]["message"] and "line 6" in err["message"]
    assert http.get("/sloth/status").json()["pending_examples"] == pending  # a bad row: nothing stored

    out = peer.result("import", rows=rows, lines=lines, documents=[f"Notes about {tag}."], skip_invalid=True)
    assert (out["rows"], out["examples"], out["added"], out["duplicates"], out["document_chunks"]) == (5, 4, 3, 1, 1)
    assert out["skipped"] == [{"line": 6, "field": "messages.1.content", "message": "must be a string, not int"}]
    assert out["pending_examples"] == pending + 3  # the ShareGPT row is the OpenAI row: stored once
    again = http.post("/sloth/import", json={"rows": rows[:3], "documents": [f"Notes about {tag}."]}).json()
    assert (again["added"], again["duplicates"]) == (0, 4)  # one store, whichever front end
    for fields, param in [({"format": "csv"}, "format"), ({"rows": "x"}, "rows"),
                          ({"format": "alpaca", "rows": [{"instruction": "x"}]}, "output")]:
        e = error_of(peer.call("import", **fields))
        assert e["code"] == "invalid_request" and e["param"] == param, e
        assert http.post("/sloth/import", json=fields).json()["error"]["param"] == param


@pytest.mark.parametrize("fields,code,param", [
    ({"messages": []}, "invalid_request", "messages"),
    ({"temperature": 5}, "invalid_request", "temperature"),
    ({"n": 0}, "invalid_request", "n"),
    ({"max_tokens": 100000}, "invalid_request", "max_tokens"),
    ({"model": "gpt-5"}, "not_found", "model"),
    ({"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 100}, "invalid_request", "messages"),
])
def test_invalid_generation_requests_match_http(zd, http, fields, code, param):
    p = Peer(zd.ipc)
    try:
        err = error_of(p.call("chat", **{**chat("Hello"), **fields}))
    finally:
        p.close()
    assert err["code"] == code and err["param"] == param and err["message"]
    body = {"model": "sloth-tiny", **chat("Hello"), **fields}
    assert http.post("/v1/chat/completions", json=body).json()["error"]["param"] == param


def test_tcp_needs_the_api_key_and_ipc_does_not(zd):
    for key in (None, "wrong"):
        p = Peer(zd.tcp, key=key)
        try:
            assert error_of(p.call("status"))["code"] == "unauthorized"
        finally:
            p.close()
    p = Peer(zd.ipc, key=None)
    try:
        assert p.result("models")["data"][0]["id"] == "sloth-tiny"
    finally:
        p.close()


def test_bad_frames_get_errors_and_never_hurt_the_daemon(zd, http):
    rng = random.Random(5)
    p = Peer(zd.ipc)

    def expect_error(*frames: bytes, code: str = "invalid_message", rid=None) -> dict:
        p.send(*frames)
        reply = p.recv(10)
        assert reply is not None and reply["type"] == "error" and reply["code"] == code, (frames[:1], reply)
        assert reply["id"] == rid
        return reply

    for _ in range(30):  # random bytes: none is a request
        expect_error(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    for frames in ([b"a", b"b"], [b"", b"", b"{}"], [b"{}", b"{}", b"{}"], [b""]):
        expect_error(*frames)
    for payload in (b"[1, 2]", b'"text"', b"null", b"{not json", b"[" * 60_000, b"\x81\xc1\xc1", b"\xde"):
        expect_error(payload)
    for rid in (None, 1.5, [1], True, "", "x" * 200):
        expect_error(json.dumps({"v": 1, "id": rid, "op": "status"}).encode())
    expect_error(json.dumps({"id": 7, "op": "status"}).encode(), code="unsupported_version", rid=7)
    expect_error(json.dumps({"v": 2, "id": 8, "op": "status"}).encode(), code="unsupported_version", rid=8)
    expect_error(json.dumps({"v": 1, "id": 9, "op": "launch"}).encode(), code="unknown_op", rid=9)
    expect_error(json.dumps({"v": 1, "id": 10}).encode(), code="unknown_op", rid=10)
    for op, fields, param in (("chat", {}, "messages"), ("complete", {}, "prompt"),
                              ("feedback", {"rating": "up"}, "interaction_id"), ("rollback", {}, "version"),
                              ("teach", {"bogus": 1}, "bogus"), ("updates", {"limit": "many"}, "limit")):
        reply = expect_error(json.dumps({"v": 1, "id": op, "op": op, **fields}).encode(), code="invalid_request",
                             rid=op)
        assert reply["param"] == param
    # oversized: up to twice the limit gets an answer; beyond that libzmq cuts the connection, which reconnects
    expect_error(b'{"v": 1, "id": 1, "op": "status", "pad": "' + b"x" * MAX_BYTES + b'"}', code="too_large")
    p.send(b"x" * (2 * MAX_BYTES + 1))
    assert p.recv(2) is None
    # msgpack requests are answered in msgpack
    p.send(msgpack.packb({"v": 1, "id": 11, "op": "models"}))
    assert p.sock.poll(10_000)
    reply = msgpack.unpackb(p.sock.recv())
    assert reply["id"] == 11 and reply["result"]["data"][0]["id"] == "sloth-tiny"
    # a REQ socket (with its empty delimiter frame) is answered the same way
    req = Peer(zd.ipc, kind=zmq.REQ)
    req.send(b"garbage")
    assert req.recv(10)["code"] == "invalid_message"
    assert req.call("status")[0]["result"]["model"] == "sloth-tiny"
    req.close()
    # not ZeroMQ at all on the TCP port
    host, port = zd.tcp[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(bytes(rng.randrange(256) for _ in range(4096)))
    idle = socket.create_connection((host, int(port)), timeout=5)  # and one that connects and says nothing
    # the same DEALER (reconnected), a new one, and HTTP all still work
    assert p.call("chat", **chat("Hello"))[-1]["type"] == "final"
    fresh = Peer(zd.tcp)
    assert fresh.call("chat", **chat("Hello", stream=True))[-1]["type"] == "final"
    fresh.close()
    idle.close()
    p.close()
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json={"model": "sloth-tiny", **chat("Hi")}).status_code == 200


def test_duplicate_ids_busy_clients_and_cancel(zd):
    p = Peer(zd.ipc)
    msgs = [p.message("chat", **chat("Tell me everything", max_tokens=400, stream=True))
            for _ in range(MAX_INFLIGHT + 3)]
    for m in msgs:
        p.send(json.dumps(m).encode())
    p.send(json.dumps(msgs[0]).encode())  # an id that is in flight
    errors = []
    while len(errors) < 4:  # three busy, one duplicate: answered at once, between the running streams' chunks
        reply = p.recv(30)
        assert reply is not None
        if reply["type"] == "error":
            errors.append(reply)
    running = [m["id"] for m in msgs[:MAX_INFLIGHT]]
    assert sorted((e["id"], e["code"]) for e in errors) == sorted(
        [(running[0], "invalid_request")] + [(m["id"], "busy") for m in msgs[MAX_INFLIGHT:]])
    for rid in running:  # cancel op: each stream ends with a `cancelled` error and its turn is not logged
        p.send(json.dumps(p.message("cancel", target=rid)).encode())
    ended, cancelled = set(), 0
    while len(ended) < MAX_INFLIGHT or cancelled < MAX_INFLIGHT:
        reply = p.recv(30)
        assert reply is not None
        if reply["type"] == "result":
            cancelled += reply["result"]["cancelled"]
        elif reply["type"] == "error":
            assert reply["code"] == "cancelled"
            ended.add(reply["id"])
        else:
            assert reply["type"] == "chunk" and reply["id"] in running
    assert ended == set(running)
    p.close()


def test_vanished_client_does_not_stall_others(zd, http):
    before = http.get("/sloth/interactions").json()["total"]
    gone = Peer(zd.ipc)
    gone.send(json.dumps(gone.message("chat", **chat("Tell me a story", max_tokens=1500, stream=True))).encode())
    assert gone.recv(30)["type"] == "chunk"
    gone.close()  # mid-stream, without a word
    t0 = time.monotonic()
    other = Peer(zd.tcp)
    assert other.call("chat", timeout=30, **chat("Hello"))[-1]["type"] == "final"
    other.close()
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 10
    while http.get("/sloth/status").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http.get("/sloth/status").json()["in_flight"] == {}
    assert http.get("/sloth/interactions").json()["total"] == before + 1  # the abandoned turn is not logged


def test_update_ops(zd):
    p = Peer(zd.tcp)
    p.result("teach", examples=[{"prompt": "Secret word?", "answer": "Pineapple."}])
    started = p.result("trigger_update")
    assert started["status"] == "running"
    err = error_of(p.call("trigger_update"))
    assert err["code"] == "conflict" and err["reason"] == "update_running"
    row = p.result("updates", update_id=started["update_id"])
    assert row["id"] == started["update_id"] and row["trigger"] == "manual"
    assert [u["id"] for u in p.result("updates", limit=5)["data"]] == [started["update_id"]]
    assert p.result("adapters")["current"] is None
    assert p.result("rollback", version="base") == {"current": None}
    err = error_of(p.call("rollback", version="v000042"))
    assert err["code"] == "not_found" and err["param"] == "version"
    assert error_of(p.call("updates", update_id=999))["code"] == "not_found"
    page = p.result("interactions", limit=2)
    assert len(page["data"]) == 2 and page["total"] >= 2
    p.close()


def test_metrics_count_requests_by_op_and_outcome(zd):
    def counts(samples: dict, **labels: str) -> float:  # summed over the adapter versions
        return sum(v for (name, ls), v in samples.items()
                   if name == "sloth_zmq_requests_total" and labels.items() <= dict(ls).items())

    before = scrape(zd.url)
    p = Peer(zd.ipc)
    try:
        p.result("status")
        error_of(p.call("import", format="csv"))
        error_of(p.call("no_such_op"))
        p.send(b"not json")
        assert p.recv()["code"] == "invalid_message"
    finally:
        p.close()
    after = scrape(zd.url)
    for labels in ({"op": "status", "outcome": "ok"}, {"op": "import", "outcome": "invalid_request"},
                   {"op": "invalid", "outcome": "unknown_op"}, {"op": "invalid", "outcome": "invalid_message"}):
        assert counts(after, **labels) - counts(before, **labels) == 1, labels


def test_stop_is_clean_and_removes_the_socket(zd):
    assert zd.stop() == 0
    assert not Path(zd.ipc[len("ipc://"):]).exists()
