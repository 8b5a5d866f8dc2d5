"""Killing the daemon with SIGKILL in the middle of an update: the trainer dies with it, and the next start records
the update as failed, removes the half-written adapter, keeps every logged turn, and can run the update again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .daemon_proc import DaemonProcess

pytestmark = pytest.mark.slow


def trainer_pids(state_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "sloth_daemon.trainer" in cmd and str(state_dir) in cmd:
                pids.append(int(proc.name))
    return pids


def test_sigkill_mid_update_then_restart(state_dir):
    slow = {"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_TRAIN_STEPS": "100000"}
    daemon = DaemonProcess(state_dir, env=slow).start()
    try:
        with daemon.http() as http:
            turn = http.post("/v1/chat/completions", json={"model": "sloth-tiny", "max_tokens": 8,
                                                            "messages": [{"role": "user", "content": "Hi"}]}).json()
            http.post("/sloth/teach", json={"examples": [{"prompt": "Lucky number?", "answer": "Seven."}]})
            update_id = http.post("/sloth/updates").json()["update_id"]
            # The update waits for the anchors (generated at first start) before its trainer starts.
            deadline = time.monotonic() + 360
            while (http.get(f"/sloth/updates/{update_id}").json().get("progress") or 0) <= 0:
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.3)
    except BaseException:
        daemon.proc.kill()  # never leave a daemon training 100000 steps behind a failed test
        raise
    assert trainer_pids(state_dir)
    assert list((state_dir / "adapters").glob(".staging-*"))
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    deadline = time.monotonic() + 10
    while trainer_pids(state_dir):
        assert time.monotonic() < deadline, "the trainer outlived the killed daemon"
        time.sleep(0.1)

    daemon = DaemonProcess(state_dir, env={**slow, "SLOTH_TRAIN_STEPS": "5"}).start()
    try:
        with daemon.http() as http:
            failed = http.get(f"/sloth/updates/{update_id}").json()
            assert failed["status"] == "failed" and "stopped" in failed["reason"]
            assert not list((state_dir / "adapters").glob(".staging-*"))
            assert http.get("/sloth/adapters").json()["data"] == []
            rows = http.get("/sloth/interactions").json()["data"]
            assert turn["id"] in [r["id"] for r in rows]
            status = http.get("/sloth/status").json()
            assert status["pending_examples"] == 1 and status["adapter"] is None
            again = http.post("/sloth/updates").json()["update_id"]
            assert daemon.wait_update(again)["status"] in ("promoted", "rejected")
            assert [a["version"] for a in http.get("/sloth/adapters").json()["data"]] == ["v000001"]
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert os.path.exists(state_dir / "replay.db")
