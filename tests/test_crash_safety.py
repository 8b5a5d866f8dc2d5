"""SIGKILL at the worst moments, on one state dir across three starts of the real daemon:

1. the trainer is killed mid-training (the daemon lives on, records the update failed, runs it again: promoted
   v000001); then the daemon is killed mid-adapter-write (the next version fully written and fsynced in its staging
   folder, not yet renamed: test hook `adapter-commit`);
2. after the restart that half-published adapter is gone and never served, the interrupted update is failed and
   runs again; the daemon is killed mid-swap (engine already serving the candidate, CURRENT not yet written: hook
   `adapter-swap`) while clients keep requests in flight;
3. the store passes `PRAGMA integrity_check`, every turn a client got back with `sloth.logged: true` is in it, and
   the restarted daemon serves the last promoted adapter, v000001, with the interrupted candidate marked rejected.

Test hooks (sloth_daemon/testhooks.py) are armed by creating `pause-<point>` in `SLOTH_TESTHOOK_DIR`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from .daemon_proc import DaemonProcess
from .test_crash_recovery import trainer_pids

pytestmark = pytest.mark.slow


def wait_until(pred, timeout: float, what: str, daemon: DaemonProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} after {timeout}s:\n{daemon.log()}")


def sigkill(daemon: DaemonProcess) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    wait_until(lambda: not trainer_pids(daemon.state_dir), 10, "the trainer outlived the daemon", daemon)


def teach(http: httpx.Client, *pairs: tuple[str, str]) -> None:
    r = http.post("/sloth/teach", json={"examples": [{"prompt": q, "answer": a} for q, a in pairs]})
    assert r.status_code == 200 and r.json()["added"] == len(pairs), r.text


class Load:
    """Clients that keep chat requests (streaming and not) in flight until the daemon dies; they record the id of
    every turn they got back with `sloth.logged: true`."""

    def __init__(self, url: str, clients: int = 4):
        self.url = url
        self.logged: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, i: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self._stop.is_set():
                n += 1
                body = {"model": "sloth-tiny", "max_tokens": 24, "stream": n % 2 == 0,
                        "messages": [{"role": "user", "content": f"client {i} request {n}"}]}
                try:
                    if body["stream"]:
                        self._stream(http, body)
                    else:
                        r = http.post("/v1/chat/completions", json=body)
                        r.raise_for_status()
                        if r.json()["sloth"]["logged"]:
                            self.logged.append(r.json()["id"])
                except (httpx.TransportError, httpx.HTTPStatusError) as e:
                    self.errors.append(repr(e))
                    return  # the daemon is gone

    def _stream(self, http: httpx.Client, body: dict) -> None:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("sloth", {}).get("logged"):
                        self.logged.append(chunk["id"])

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_sigkill_at_the_worst_moments(tmp_path, state_dir):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    config = tmp_path / "config.toml"
    config.write_text("[train]\nsteps = 100000\n")
    env = {"SLOTH_CONFIG": str(config), "SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false",
           "SLOTH_TESTHOOK_DIR": str(hooks)}
    adapters = state_dir / "adapters"

    # -- start 1: the trainer dies mid-training; the update runs again; then the daemon dies mid-adapter-write ----
    daemon = DaemonProcess(state_dir, env=env).start()
    with daemon.http() as http:
        teach(http, ("What is my cat called?", "Biscuit."), ("Where is the car?", "Level 3."))
        u1 = http.post("/sloth/updates").json()["update_id"]
        wait_until(lambda: (http.get(f"/sloth/updates/{u1}").json().get("progress") or 0) > 0, 300,
                   "update 1 made no progress", daemon)
        (trainer,) = trainer_pids(state_dir)
        os.kill(trainer, signal.SIGKILL)
        failed = daemon.wait_update(u1)
        assert failed["status"] == "failed" and "-9" in failed["reason"], failed
        assert not list(adapters.glob(".staging-*"))
        assert http.get("/sloth/status").json()["pending_examples"] == 2

        config.write_text("[train]\nsteps = 3\n")  # short updates from now on: a SIGHUP applies it live
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded: applied train" in daemon.log(), 30, "no reload", daemon)
        u2 = http.post("/sloth/updates").json()["update_id"]
        assert daemon.wait_update(u2)["adapter_version"] == "v000001"
        assert http.get("/sloth/status").json()["adapter"] == "v000001"

        teach(http, ("What is the wifi password?", "sloth-rocks."), ("Who is the best sloth?", "Sid."))
        (hooks / "pause-adapter-commit").touch()
        u3 = http.post("/sloth/updates").json()["update_id"]
    wait_until(lambda: (hooks / "paused-adapter-commit").exists(), 300, "update 3 never reached its commit", daemon)
    (staging,) = adapters.glob(".staging-*")
    assert {"adapter_config.json", "adapter_model.safetensors", "sloth_adapter.json"} <= {
        p.name for p in staging.iterdir()}
    assert sorted(p.name for p in adapters.glob("v*")) == ["v000001"]
    sigkill(daemon)
    (hooks / "pause-adapter-commit").unlink()

    # -- start 2: the half-published adapter is gone; the update runs again; the daemon dies mid-swap under load --
    daemon = DaemonProcess(state_dir, env=env).start()
    with daemon.http() as http:
        u = http.get(f"/sloth/updates/{u3}").json()
        assert u["status"] == "failed" and u["adapter_version"] is None
        assert not list(adapters.glob(".staging-*"))
        assert [a["version"] for a in http.get("/sloth/adapters").json()["data"]] == ["v000001"]
        status = http.get("/sloth/status").json()
        assert status["adapter"] == "v000001" and status["pending_examples"] == 2
        (hooks / "pause-adapter-swap").touch()
        u4 = http.post("/sloth/updates").json()["update_id"]
        wait_until(lambda: (hooks / "paused-adapter-swap").exists(), 300, "update 4 never reached its swap", daemon)
        assert http.get("/sloth/status").json()["adapter"] == "v000002"  # served from memory only
        load = Load(daemon.url)
        wait_until(lambda: len(load.logged) >= 16, 120, "the load got no answers", daemon)
    sigkill(daemon)
    load.stop()
    assert load.errors, "the clients never saw the daemon die"
    (hooks / "pause-adapter-swap").unlink()

    # -- after the crash: the store is intact and holds every answered, logged turn ----------------------------
    db = sqlite3.connect(state_dir / "replay.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {row[0] for row in db.execute("SELECT id FROM interactions")}
    finally:
        db.close()
    missing = set(load.logged) - stored
    assert not missing, f"{len(missing)} of {len(load.logged)} answered turns were lost"

    # -- start 3: the last promoted adapter serves; the interrupted candidate is never served ------------------
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        with daemon.http() as http:
            status = http.get("/sloth/status").json()
            assert status["adapter"] == "v000001" and status["pending_examples"] == 2
            u = http.get(f"/sloth/updates/{u4}").json()
            assert u["status"] == "failed" and "stopped" in u["reason"]
            listed = {a["version"]: a for a in http.get("/sloth/adapters").json()["data"]}
            assert listed["v000001"]["current"] and listed["v000001"]["status"] == "promoted"
            assert listed["v000002"]["status"] == "rejected" and "interrupted" in listed["v000002"]["reason"]
            r = http.post("/sloth/adapters/rollback", json={"version": "v000002"})
            assert r.status_code == 400  # never promoted, so it cannot be served
            reply = http.post("/v1/chat/completions", json={"model": "sloth-tiny", "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
            assert reply.json()["sloth"]["adapter_version"] == "v000001"
    finally:
        assert daemon.stop() == 0, daemon.log()
    shutil.rmtree(hooks)
