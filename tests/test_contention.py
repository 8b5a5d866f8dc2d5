"""Another process holds the replay store's SQLite write lock while clients use a real daemon (issue 12, items 1-2).

While the lock is held: `/health` and the watchdog keep their pace, generation answers (the turn goes to the
journal: `logged: false`, `journaled: true`), a stream ends with its finish chunk and `[DONE]`, writes (teach,
feedback) fail fast with 503 + `Retry-After`, reads (status) still answer, the CLI's `replay stats` reads, and a
second daemon on the same state dir exits at once naming the holder. Once the lock is released the journaled turns
reach the store; a journal left by a SIGKILL is logged at the next start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .daemon_proc import DaemonProcess
from .test_service_lifecycle import NotifyListener

pytestmark = pytest.mark.slow

BUSY_TIMEOUT_S = 0.5
HOLDER = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
conn.execute("CREATE TABLE IF NOT EXISTS _lock_holder (x)")
print("locked", flush=True)
sys.stdin.read()  # holds the write lock until the test closes our stdin
conn.execute("ROLLBACK")
"""


class WriteLock:
    """A separate process that holds replay.db's write lock (as `BEGIN IMMEDIATE` in the sqlite3 shell would)."""

    def __init__(self, db):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


def chat(model="sloth-tiny", **kw):
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, **kw}


@pytest.fixture
def daemon(tmp_path, tiny_model):
    state = tmp_path / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    d = DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false",
                                  "SLOTH_STORE_BUSY_TIMEOUT_S": str(BUSY_TIMEOUT_S),
                                  "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
    notify = NotifyListener(tmp_path / "notify.sock", d.port)
    d.start()
    yield d, notify
    d.stop(signal.SIGKILL)
    notify.close()


def test_a_locked_store_fails_fast_and_loses_no_answer(daemon, tmp_path):
    d, notify = daemon
    http = d.http()
    assert http.post("/v1/chat/completions", json=chat()).json()["sloth"]["logged"] is True
    before = http.get("/sloth/interactions").json()["total"]

    lock = WriteLock(d.state_dir / "replay.db")
    since = len(notify.messages)
    t_locked = time.monotonic()
    try:
        for _ in range(3):
            t0 = time.monotonic()
            assert http.get("/health").status_code == 200
            assert time.monotonic() - t0 < 0.5

        t0 = time.monotonic()
        r = http.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200, r.text
        answered = r.json()
        assert answered["choices"][0]["message"]["content"] is not None
        assert answered["sloth"]["logged"] is False and answered["sloth"]["journaled"] is True
        assert time.monotonic() - t0 < BUSY_TIMEOUT_S + 5

        with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        final = json.loads(lines[-2][6:])
        assert final["choices"][0]["finish_reason"] in ("stop", "length")
        assert final["sloth"] == {**final["sloth"], "logged": False, "journaled": True}
        streamed_id = final["id"]

        for path, body in (("/sloth/teach", {"documents": ["Sloths sleep a lot."]}),
                           ("/sloth/feedback", {"interaction_id": answered["id"], "rating": "up"})):
            t0 = time.monotonic()
            r = http.post(path, json=body)
            assert time.monotonic() - t0 < BUSY_TIMEOUT_S + 2
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "store_busy" and r.json()["error"]["type"] == "server_error"

        status = http.get("/sloth/status")  # reads go on beside the held write lock
        assert status.status_code == 200 and status.json()["journaled_turns"] == 2
        assert status.json()["interactions"] == before

        # The CLI reads the store while the daemon runs and another process writes.
        stats = subprocess.run([sys.executable, "-m", "sloth_daemon.cli", "replay", "stats", "--json",
                                "--state-dir", str(d.state_dir)], capture_output=True, text=True, timeout=120)
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["interactions"] == before

        # A second daemon on the same state dir exits at once and names the holder.
        second = subprocess.run([sys.executable, "-m", "sloth_daemon.cli", "serve", "--port", "0",
                                 "--state-dir", str(d.state_dir)], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "SLOTH_ZMQ": "off"})
        assert second.returncode == 4, second.stderr
        assert f"pid {d.proc.pid}" in second.stderr and "another sloth-daemon" in second.stderr

        # The watchdog kept its pace all along (every 0.5 s; systemd would kill a daemon silent for WatchdogSec).
        pings = [t for t, f in notify.messages[since:] if f.get("WATCHDOG") == "1"]
        gaps = [b - a for a, b in zip([t_locked, *pings], pings)]
        assert pings and max(gaps) < 1.5, gaps
    finally:
        lock.release()

    deadline = time.monotonic() + 30
    while http.get("/sloth/status").json()["journaled_turns"]:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.3)
    ids = {row["id"] for row in http.get("/sloth/interactions").json()["data"]}
    assert {answered["id"], streamed_id} <= ids
    fb = http.post("/sloth/feedback", json={"interaction_id": answered["id"], "rating": "up"})
    assert fb.status_code == 200 and fb.json()["example_id"]
    assert not (d.state_dir / "turn-journal.jsonl").exists()


def test_the_journal_survives_a_crash(daemon):
    d, _ = daemon
    http = d.http()
    lock = WriteLock(d.state_dir / "replay.db")
    try:
        answered = http.post("/v1/chat/completions", json=chat()).json()
        assert answered["sloth"]["journaled"] is True
        d.stop(signal.SIGKILL)
    finally:
        lock.release()
    assert answered["id"] in (d.state_dir / "turn-journal.jsonl").read_text()
    d.start()
    row = [r for r in d.http().get("/sloth/interactions").json()["data"] if r["id"] == answered["id"]]
    assert row and row[0]["response"] == answered["choices"][0]["message"]["content"]
    assert not (d.state_dir / "turn-journal.jsonl").exists()
