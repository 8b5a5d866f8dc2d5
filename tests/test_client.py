"""`sloth_daemon.client` (sync and asyncio) and `sloth-daemon chat`, against the shared real daemon over its default
ZeroMQ address (an IPC socket in the state dir), plus timeouts and reconnects against a scripted ROUTER."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
import zmq

from sloth_daemon.api.zmq_protocol import resolve_addresses
from sloth_daemon.client import AsyncSlothClient, Completion, SlothClient, SlothError

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def address(shared_daemon) -> str:
    return resolve_addresses("auto", shared_daemon.state_dir)[0]  # the daemon's default: zmq = "auto"


@pytest.fixture(scope="module")
def http(shared_daemon):
    with httpx.Client(base_url=shared_daemon.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture
def client(address):
    with SlothClient(address, timeout=60) as c:
        yield c


def total(http) -> int:
    return http.get("/sloth/interactions").json()["total"]


def test_sync_client_every_op(client, http):
    r = client.chat("What is sloth-daemon?", max_tokens=12, temperature=0)
    assert isinstance(r, Completion) and r.interaction_id.startswith("chatcmpl-") and r.logged
    assert r.usage["completion_tokens"] <= 12 and r.finish_reason in ("stop", "length")
    stream = client.chat([{"role": "user", "content": "What is sloth-daemon?"}], stream=True, max_tokens=12,
                         temperature=0)
    chunks = list(stream)
    assert len(chunks) > 1 and "".join(chunks) == stream.final.text == r.text
    c = client.complete("Once upon", max_tokens=5, temperature=0)
    assert c.interaction_id.startswith("cmpl-") and client.complete("Once upon", stream=True, max_tokens=5,
                                                                    temperature=0).text() == c.text
    row = http.get("/sloth/interactions", params={"limit": 1}).json()["data"][0]
    assert row["transport"] == "zmq" and row["response"] == c.text

    pending = client.status()["pending_examples"]
    assert client.feedback(r.interaction_id, correction="A learning daemon.")["pending_examples"] == pending + 1
    taught = client.teach(examples=[{"prompt": "Client test question?", "answer": "Client test answer."}],
                          documents=["A document taught over ZeroMQ."])
    assert len(taught["example_ids"]) == 2
    imported = client.import_examples([{"instruction": "Client import question?", "output": "Client import answer."}],
                                      documents=["A document imported over ZeroMQ."])
    assert (imported["rows"], imported["added"] + imported["duplicates"], imported["document_chunks"]) == (2, 2, 1)
    assert client.models()["data"][0]["id"] == "sloth-tiny"
    assert client.adapters()["current"] == http.get("/sloth/adapters").json()["current"]
    assert client.updates(limit=3)["data"] == http.get("/sloth/updates", params={"limit": 3}).json()["data"]
    assert client.interactions(limit=1)["data"][0]["id"] == row["id"]
    assert client.status()["zmq"] == [client.address]


def test_sync_client_errors(client):
    with pytest.raises(SlothError) as e:
        client.feedback("chatcmpl-nope", rating="up")
    assert e.value.code == "not_found" and e.value.param == "interaction_id"
    with pytest.raises(SlothError) as e:
        client.chat("Hello", temperature=9)
    assert e.value.code == "invalid_request" and e.value.param == "temperature"
    with pytest.raises(SlothError) as e:
        client.import_examples([{"instruction": "x"}], lines=[7])
    assert e.value.code == "invalid_request" and e.value.param == "output" and "line 7" in e.value.message
    with pytest.raises(SlothError) as e:
        client.update(99999)
    assert e.value.code == "not_found"
    with pytest.raises(SlothError) as e:
        client.rollback("v000777")
    assert e.value.code == "not_found"
    with pytest.raises(SlothError) as e:
        list(client.chat("x" * 5000, stream=True, max_tokens=100))
    assert e.value.reason == "context_length_exceeded"
    assert client.chat("Still fine?", max_tokens=3).text is not None  # errors leave the client usable


def test_leaving_a_stream_early_cancels_the_turn(client, http):
    before = total(http)
    stream = client.chat("Tell me a long story", stream=True, max_tokens=1500)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert stream.final is None
    # The engine serves in arrival order: had the abandoned turn run on, it would be logged before this answer.
    after = client.chat("Hello", max_tokens=4, store=False)
    assert after.logged is False and total(http) == before


def test_twenty_async_clients_stream_at_once(address, http):
    before = total(http)

    async def one(i: int) -> tuple[list[str], Completion]:
        async with AsyncSlothClient(address, timeout=120) as c:
            stream = await c.chat(f"Hello number {i}", stream=True, max_tokens=10)
            chunks = [t async for t in stream]
            return chunks, stream.final

    async def main():
        return await asyncio.gather(*(one(i) for i in range(20)))

    results = asyncio.run(main())
    ids = [final.interaction_id for _, final in results]
    assert len(set(ids)) == 20
    for chunks, final in results:
        assert chunks and "".join(chunks) == final.text and final.logged
    rows = http.get("/sloth/interactions", params={"limit": 100}).json()["data"]
    logged = [r["id"] for r in rows if r["id"] in ids]
    assert sorted(logged) == sorted(ids)  # each exactly once
    assert all(r["transport"] == "zmq" for r in rows if r["id"] in ids)
    assert total(http) == before + 20


def test_async_client_ops_share_one_socket(address):
    async def main():
        async with AsyncSlothClient(address, timeout=60) as c:
            status, models, turn = await asyncio.gather(c.status(), c.models(), c.chat("Hi", max_tokens=4))
            assert status["model"] == models["data"][0]["id"] == "sloth-tiny"
            text = await (await c.complete("Once upon", stream=True, max_tokens=5, temperature=0)).text()
            plain = await c.complete("Once upon", max_tokens=5, temperature=0)
            assert text == plain.text
            with pytest.raises(SlothError) as e:
                await c.feedback(turn.interaction_id)
            assert e.value.code == "invalid_request"
            assert (await c.feedback(turn.interaction_id, rating="down"))["example_id"] is None

    asyncio.run(main())


class ScriptedRouter:
    """A ROUTER that ignores the first `drop` requests and answers the rest, recording who sent what."""

    def __init__(self, drop: int):
        # Its own context: close() terms it, which returns only once the listener is really gone (a socket's
        # close is finished later by ZeroMQ's I/O thread, so a connect right after close() could still succeed).
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.drop = drop
        self.seen: list[tuple[bytes, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, payload = self.sock.recv_multipart()
            msg = json.loads(payload)
            self.seen.append((identity, msg))
            if len(self.seen) > self.drop:
                reply = {"v": 1, "id": msg["id"], "type": "result", "op": msg["op"], "result": {"ok": True}}
                self.sock.send_multipart([identity, json.dumps(reply).encode()])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)
        self._ctx.term()


def test_timeouts_reconnect_and_retry_only_idempotent_ops():
    server = ScriptedRouter(drop=2)
    try:
        with SlothClient(server.address, timeout=0.5, retries=2) as c:
            assert c.status() == {"ok": True}  # two silent tries, then a third on a third socket
            assert len(server.seen) == 3 and len({identity for identity, _ in server.seen}) == 3
            assert len({m["id"] for _, m in server.seen}) == 3
        server.seen.clear()
        server.drop = 1
        with SlothClient(server.address, timeout=0.5, retries=2) as c:
            with pytest.raises(SlothError) as e:
                c.feedback("chatcmpl-x", rating="up")  # could log twice: never resent
            assert e.value.code == "timeout" and len(server.seen) == 1
            assert c.feedback("chatcmpl-x", rating="up") == {"ok": True}  # the next call goes out on a new socket

        async def main():
            server.seen.clear()
            server.drop = 1
            async with AsyncSlothClient(server.address, timeout=0.5, retries=1) as c:
                assert await c.adapters() == {"ok": True}
            assert len({identity for identity, _ in server.seen}) == 2

        asyncio.run(main())
    finally:
        server.close()
    with SlothClient(server.address, timeout=0.3, retries=0) as c:
        with pytest.raises(SlothError) as e:
            c.status()
        assert e.value.code == "unreachable"


def chat_cli(*args: str, input: str, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sloth_daemon.cli", "chat", *args], input=input, text=True,
                          capture_output=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", "SLOTH_API_KEY": API_KEY})


def test_chat_command_through_a_pipe(shared_daemon, http, tmp_path):
    pending = http.get("/sloth/status").json()["pending_examples"]
    before = total(http)
    script = "What is sloth-daemon?\n/fix A daemon that learns from you.\n/down\n/status\n/quit\nnever sent\n"
    # Found as `status` finds it (--url, else the config's host and port), from a directory that is not the
    # daemon's: the ZeroMQ address comes from the daemon itself.
    r = chat_cli("--url", shared_daemon.url, "--max-tokens", "16", input=script, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sloth> ") and "correction saved" in r.stdout and "rated down" in r.stdout
    assert "sloth-tiny with adapter" in r.stdout
    row = http.get("/sloth/interactions", params={"limit": 1}).json()["data"][0]
    assert total(http) == before + 1 and row["transport"] == "zmq"
    assert row["prompt"][-1]["content"] == "What is sloth-daemon?"
    assert row["response"] in r.stdout
    assert http.get("/sloth/status").json()["pending_examples"] == pending + 1  # the correction; a thumbs-down alone


def test_chat_command_unreachable_daemon_exits_3(tmp_path):
    r = chat_cli("--zmq", f"ipc://{tmp_path}/nothing.sock", "--timeout", "1", input="Hello\n")
    assert r.returncode == 3 and "not reachable" in r.stderr
