"""Automatic updates with the real APScheduler inside the real daemon: corrections given as feedback reach the
threshold, exactly one update starts by itself, and the corrected answers are served afterwards. The daemon logs
JSON (`log_format = "json"`), and its periodic checks stay out of the log at INFO."""

from __future__ import annotations

import json
import time

import pytest

from .daemon_proc import DaemonProcess

pytestmark = pytest.mark.slow

CORRECTIONS = [("What is my favourite food?", "Lasagne, every Friday."), ("Where do I work?", "At the sloth sanctuary.")]


def greedy(http, prompt):
    r = http.post("/v1/chat/completions", json={"model": "sloth-tiny", "temperature": 0, "max_tokens": 48,
                                                 "messages": [{"role": "user", "content": prompt}]})
    return r.json()


def test_threshold_starts_exactly_one_update_that_learns_the_corrections(state_dir):
    env = {"SLOTH_SCHEDULE_MIN_NEW_EXAMPLES": "2", "SLOTH_SCHEDULE_CHECK_SECONDS": "0.5",  # the default recipe
           "SLOTH_LOG_FORMAT": "json"}
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        with daemon.http() as http:
            for prompt, answer in CORRECTIONS:
                turn = greedy(http, prompt)
                assert turn["choices"][0]["message"]["content"] != answer
                fb = http.post("/sloth/feedback", json={"interaction_id": turn["id"], "rating": "down",
                                                        "correction": answer})
                assert fb.status_code == 200
            deadline = time.monotonic() + 30
            while not (updates := http.get("/sloth/updates").json()["data"]):
                assert time.monotonic() < deadline, "the scheduler never started an update"
                time.sleep(0.2)
            assert updates[0]["trigger"] == "threshold"
            done = daemon.wait_update(updates[0]["id"])
            assert done["status"] == "promoted", done
            time.sleep(2)  # several more scheduler checks: nothing is pending, so nothing more starts
            assert len(http.get("/sloth/updates").json()["data"]) == 1
            for prompt, answer in CORRECTIONS:
                r = greedy(http, prompt)
                assert r["choices"][0]["message"]["content"] == answer
                assert r["sloth"]["adapter_version"] == "v000001"
    finally:
        assert daemon.stop() == 0, daemon.log()
    records = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(r["logger"] == "sloth_daemon.updater" and "promoted v000001" in r["message"] for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's lines are JSON too
    assert not [r for r in records if r["logger"].startswith("apscheduler.executors")]  # dozens of checks ran
