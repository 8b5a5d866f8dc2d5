"""The daemon's process life as systemd sees it, on one real daemon started under a NOTIFY_SOCKET this test binds:
READY=1 exactly once the HTTP socket accepts, STATUS= lines, WATCHDOG=1 at half of $WATCHDOG_USEC, a SIGHUP
reload (RELOADING=1 … READY=1) that applies live settings and reports the rest, then SIGTERM during an update and
during streaming requests: STOPPING=1, new connections refused, the streams in flight complete and are logged, the
update is recorded as failed ("daemon stopping") with its examples pending again, and the process exits 0.

The tests run in file order on one shared daemon (one start for all of them); the last one stops it."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from sloth_replay import ReplayStore

from .daemon_proc import DaemonProcess, free_port
from .test_crash_recovery import trainer_pids

pytestmark = pytest.mark.slow

WATCHDOG_USEC = 1_000_000  # pings expected every 0.5 s
KEY = "reloaded-key"


class NotifyListener:
    """Binds a NOTIFY_SOCKET and records every datagram with its arrival time; on READY=1 it checks at once that
    the daemon's HTTP port accepts connections (READY must not come before the socket listens)."""

    def __init__(self, path: Path, port: int):
        self.path = str(path)
        self.port = port
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.port_open_at_ready: list[bool] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536).decode()
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.split("\n"))
            if "READY" in fields and not self.port_open_at_ready:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    self.port_open_at_ready.append(True)
                except OSError:
                    self.port_open_at_ready.append(False)
            self.messages.append((time.monotonic(), fields))

    def values(self, key: str) -> list[str]:
        return [f[key] for _, f in self.messages if key in f]

    def wait_for(self, pred, timeout: float = 30, since: int = 0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, fields in self.messages[since:]:
                if pred(fields):
                    return fields
            time.sleep(0.05)
        raise TimeoutError(f"no matching notify message; got {[f for _, f in self.messages[since:]][-20:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("svc")
    state = root / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    config = root / "config.toml"
    config.write_text('log_level = "info"\n')
    daemon = DaemonProcess(state, env={
        "SLOTH_CONFIG": str(config), "SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_TRAIN_STEPS": "100000",
        "NOTIFY_SOCKET": str(root / "notify.sock"), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    listener = NotifyListener(root / "notify.sock", daemon.port)
    daemon.start()
    yield daemon, listener, config
    daemon.stop(signal.SIGKILL)
    listener.close()


def test_ready_status_and_watchdog(service):
    daemon, notify, _ = service
    ready = notify.wait_for(lambda f: f.get("READY") == "1")
    assert notify.port_open_at_ready == [True]
    assert ready["STATUS"] == "serving base model; idle, 0 examples pending"
    statuses = notify.values("STATUS")
    assert statuses.index(ready["STATUS"]) > 0 and all(s.startswith("starting") for s in statuses[:2])

    with daemon.http() as http:
        assert http.post("/sloth/teach", json={"examples": [
            {"prompt": f"Code word {i}?", "answer": f"Word {i}."} for i in range(3)]}).status_code == 200
    notify.wait_for(lambda f: f.get("STATUS") == "serving base model; idle, 3 examples pending", timeout=10)
    with daemon.http() as http:
        # Started now (it trains on through the reload test) and stopped by SIGTERM in the last test.
        update_id = http.post("/sloth/updates").json()["update_id"]
    assert update_id == 1
    notify.wait_for(lambda f: f.get("STATUS") == f"serving base model; training update {update_id} 0%", timeout=10)

    start = len(notify.messages)
    time.sleep(2.0)
    pings = [t for t, f in notify.messages[start:] if f.get("WATCHDOG") == "1"]
    assert 3 <= len(pings) <= 6  # every WATCHDOG_USEC / 2
    assert pings[-1] - pings[0] >= 0.9


def test_sighup_applies_live_settings_and_reports_the_rest(service):
    daemon, notify, config = service
    # port: the flag (--port) still wins over the file, so it does not count as a change; host does.
    config.write_text(f'log_level = "debug"\napi_key = "{KEY}"\nport = {free_port()}\nhost = "127.0.0.2"\n'
                      "[generation]\nmax_tokens = 3\n")
    since = len(notify.messages)
    daemon.proc.send_signal(signal.SIGHUP)
    notify.wait_for(lambda f: f.get("RELOADING") == "1" and "MONOTONIC_USEC" in f, since=since)
    ready = notify.wait_for(lambda f: f.get("READY") == "1", since=since)
    assert ready["STATUS"].startswith("serving base model; training update 1 ")
    assert ready["STATUS"].endswith("; restart to apply host")

    body = {"model": "sloth-tiny", "messages": [{"role": "user", "content": "Tell me everything."}]}
    assert httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
    with httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3  # the new default
        assert http.get("/sloth/status").json()["restart_needed"] == ["host"]

        config.write_text('log_level = "loud"\n')
        since = len(notify.messages)
        daemon.proc.send_signal(signal.SIGHUP)
        ready = notify.wait_for(lambda f: f.get("READY") == "1", since=since)
        assert "config reload failed" in ready["STATUS"]
        assert http.get("/sloth/status").status_code == 200  # the running configuration (and key) stay

        config.write_text(f'api_key = "{KEY}"\n[train]\ndevices = [63]\n')  # a GPU this machine lacks
        since = len(notify.messages)
        daemon.proc.send_signal(signal.SIGHUP)
        ready = notify.wait_for(lambda f: f.get("READY") == "1", since=since)
        assert "config reload failed" in ready["STATUS"]
    assert "log_level: Input should be" in daemon.log()
    assert "train.devices: cuda:63 is not on this machine" in daemon.log()


def test_sigterm_during_an_update_and_streams(service):
    daemon, notify, _ = service
    headers = {"Authorization": f"Bearer {KEY}"}
    update_id = 1
    with httpx.Client(base_url=daemon.url, headers=headers, timeout=60) as http:
        deadline = time.monotonic() + 360  # the update first waits for the anchors (32 probes)
        while (http.get(f"/sloth/updates/{update_id}").json().get("progress") or 0) <= 0:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.2)
    assert trainer_pids(daemon.state_dir)

    n_streams = 10
    started = threading.Barrier(n_streams + 1, timeout=60)
    results: list[dict] = []

    def stream(i: int) -> None:
        chunks, finish, done = [], None, False
        body = {"model": "sloth-tiny", "stream": True, "max_tokens": 300,
                "messages": [{"role": "user", "content": f"Tell me a long story, number {i}."}]}
        with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=120) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    break
            started.wait()  # this request is in flight: its first chunk arrived
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    chunks.append(chunk)
                    finish = chunk["choices"][0]["finish_reason"] or finish
        results.append({"id": chunks[-1]["id"], "finish": finish, "done": done, "end": time.monotonic(),
                        "logged": chunks[-1].get("sloth", {}).get("logged")})

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    started.wait()
    since = len(notify.messages)
    daemon.proc.send_signal(signal.SIGTERM)
    notify.wait_for(lambda f: f.get("STOPPING") == "1", since=since, timeout=10)
    deadline = time.monotonic() + 5
    while True:  # the listening socket closes at once
        try:
            socket.create_connection(("127.0.0.1", daemon.port), timeout=1).close()
        except ConnectionRefusedError:
            refused_at = time.monotonic()
            break
        assert time.monotonic() < deadline, "the daemon still accepts connections after SIGTERM"
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    assert daemon.proc.wait(120) == 0, daemon.log()

    assert len(results) == n_streams
    assert all(r["done"] and r["finish"] in ("stop", "length") and r["logged"] for r in results), results
    assert max(r["end"] for r in results) > refused_at  # streams were still running when new ones were refused
    assert not trainer_pids(daemon.state_dir)
    assert not list((daemon.state_dir / "adapters").glob(".staging-*"))
    store = ReplayStore.open_readonly(daemon.state_dir / "replay.db")
    try:
        update = store.get_update(update_id)
        assert (update["status"], update["reason"]) == ("failed", "daemon stopping")
        assert store.count_pending() == 3  # the stopped update's examples wait for the next one
        assert all(store.get_interaction(r["id"]) for r in results)
    finally:
        store.close()
