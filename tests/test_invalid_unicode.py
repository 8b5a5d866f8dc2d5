"""Text that is not valid Unicode (a lone UTF-16 surrogate, as JSON's `"\\ud83d"` escape carries it, or as a JS app's
`JSON.stringify` writes half an emoji) is refused at the edge, naming the field: HTTP 400 (streaming or not), ZeroMQ
`invalid_request` (a bad request `id` still gets an answer), and the Python client raises `SlothError` before it
sends anything. Nothing is generated or logged for such a request, and the daemon keeps serving.

The `openai` client cannot send such text at all (it fails to encode it), so HTTP requests here are raw JSON bytes.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import zmq

from sloth_daemon.api.zmq_protocol import resolve_addresses
from sloth_daemon.client import AsyncSlothClient, SlothClient, SlothError
from sloth_daemon.textcheck import invalid_text

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
BAD = "\\ud83d"  # as it appears in the JSON text: a high surrogate with no low one after it


@pytest.fixture(scope="module")
def http(shared_daemon):
    with httpx.Client(base_url=shared_daemon.url, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def address(shared_daemon) -> str:
    return resolve_addresses("auto", shared_daemon.state_dir)[0]


def total(http) -> int:
    return http.get("/sloth/interactions").json()["total"]


def raw(obj: dict, bad: str) -> bytes:
    """`obj` as JSON text with the placeholder string `@BAD@` replaced by a raw lone-surrogate escape."""
    return json.dumps(obj).replace("@BAD@", bad).encode()


CHAT = {"model": "sloth-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi @BAD@ there"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "messages": [{"role": "user", "content": "@BAD@"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "@BAD@"}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "stop": ["ok", "@BAD@"]}, "stop.1"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stop": "@BAD@"}, "stop"),
    ("/v1/chat/completions", {**CHAT, "model": "sloth-tiny@BAD@"}, "model"),
    ("/v1/completions", {"model": "sloth-tiny", "prompt": "Once @BAD@", "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"model": "sloth-tiny", "prompt": "Once", "max_tokens": 4, "stream": True, "stop": ["@BAD@"]},
     "stop.0"),
    ("/sloth/teach", {"examples": [{"prompt": "Q?", "answer": "A @BAD@"}]}, "examples.0.answer"),
    ("/sloth/teach", {"documents": ["fine", "@BAD@"]}, "documents.1"),
    ("/sloth/feedback", {"interaction_id": "chatcmpl-x", "correction": "@BAD@"}, "correction"),
    ("/sloth/feedback", {"interaction_id": "chatcmpl-@BAD@", "rating": "up"}, "interaction_id"),
    ("/sloth/adapters/rollback", {"version": "v@BAD@"}, "version"),
])
def test_http_refuses_lone_surrogates_naming_the_field(http, path, body, param):
    before = total(http)
    for bad in (BAD, "\\udc00"):  # a high surrogate alone, and a low one alone
        r = http.post(path, content=raw(body, bad))
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")  # not an SSE stream, even with stream: true
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param
        assert "surrogate" in err["message"] and err["message"].startswith(param)
    assert total(http) == before  # nothing generated was logged
    assert http.post("/v1/chat/completions", content=raw(CHAT, BAD)).status_code == 200  # still serving


def test_a_valid_surrogate_pair_is_just_an_emoji(http):
    r = http.post("/v1/chat/completions", content=raw({**CHAT, "messages": [
        {"role": "user", "content": "Hi @BAD@"}]}, "\\ud83d\\ude00"))  # U+1F600, written as a pair
    assert r.status_code == 200, r.text
    row = http.get("/sloth/interactions", params={"limit": 1}).json()["data"][0]
    assert row["id"] == r.json()["id"] and row["prompt"][0]["content"] == "Hi \U0001F600"


def test_invalid_text_walks_every_container():
    assert invalid_text({"a": [{"b": "ok"}, {"c": ("x", "\ud800")}]}) == (
        "a.1.c.1", invalid_text("\ud800")[1])
    assert invalid_text({"k\udfff": 1})[0] == ""
    assert invalid_text({"ok": ["é", "\U0001F600", 3, None]}) is None


class RawPeer:
    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def ask(self, payload: bytes, timeout: float = 30) -> list[dict]:
        """Every reply to one request, up to the one that ends it."""
        self.sock.send(payload)
        out = []
        while True:
            assert self.sock.poll(int(timeout * 1000)), f"no reply to {payload[:80]!r}"
            out.append(json.loads(self.sock.recv()))
            if out[-1]["type"] != "chunk":
                return out

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def peer(address):
    p = RawPeer(address)
    yield p
    p.close()


@pytest.mark.parametrize("op,fields,param", [
    ("chat", {"messages": [{"role": "user", "content": "@BAD@"}], "max_tokens": 4}, "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "stop": ["@BAD@"]}, "stop.0"),
    ("complete", {"prompt": "Once @BAD@", "max_tokens": 4}, "prompt"),
    ("teach", {"examples": [{"prompt": "@BAD@", "answer": "A"}]}, "examples.0.prompt"),
    ("feedback", {"interaction_id": "x", "comment": "@BAD@", "rating": "up"}, "comment"),
    ("status", {"extra": {"deep": ["@BAD@"]}}, "extra.deep.0"),
    ("status", {"key": "@BAD@"}, "key"),
    ("st@BAD@tus", {}, "op"),
])
def test_zmq_refuses_lone_surrogates_naming_the_field(peer, http, op, fields, param):
    before = total(http)
    replies = peer.ask(raw({"v": 1, "id": "r1", "op": op, **fields}, BAD))
    assert len(replies) == 1, replies
    err = replies[0]
    assert err["type"] == "error" and err["id"] == "r1", err
    assert err["code"] == "invalid_request" and err["param"] == param and "surrogate" in err["message"]
    assert total(http) == before


def test_zmq_bad_id_still_gets_a_reply(peer):
    for rid in (BAD, "ok\\udc80"):
        err = peer.ask(raw({"v": 1, "id": "@BAD@", "op": "status"}, rid))[0]
        assert err["type"] == "error" and err["id"] is None and err["code"] == "invalid_message"
        assert err["message"].startswith("id:")
    assert peer.ask(b'{"v": 1, "id": "fine", "op": "models"}')[0]["type"] == "result"


def test_python_client_raises_sloth_error_never_an_encoding_error(address, http):
    before = total(http)
    with SlothClient(address, timeout=60) as c:
        for call, param in [
            (lambda: c.chat("Hi \ud83d"), "messages.0.content"),
            (lambda: c.chat([{"role": "user", "content": "Hi"}], stream=True, stop=["\udc00"]), "stop.0"),
            (lambda: c.complete("Once \ud800"), "prompt"),
            (lambda: c.teach(documents=["\ud800"]), "documents.0"),
            (lambda: c.feedback("chatcmpl-x", correction="\ud800"), "correction"),
        ]:
            with pytest.raises(SlothError) as e:
                call()
            assert e.value.code == "invalid_request" and e.value.param == param
        assert c.chat("Hi", max_tokens=4).text is not None  # the client still works

    async def run_async() -> None:
        async with AsyncSlothClient(address, timeout=60) as ac:
            with pytest.raises(SlothError) as e:
                await ac.chat([{"role": "user", "content": "\ud83d"}])
            assert e.value.param == "messages.0.content"
            assert (await ac.chat("Hi", max_tokens=4)).logged

    asyncio.run(run_async())
    with SlothClient(address, timeout=60, api_key="k\ud800") as c:
        with pytest.raises(SlothError) as e:
            c.status()
        assert e.value.param == "key"
    assert total(http) == before + 2
