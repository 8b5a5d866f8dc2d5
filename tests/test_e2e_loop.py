"""The acceptance test a user would run: the whole loop over real HTTP with the official `openai` client.

serve (embedded tiny model) → chat (plain and streaming) → teach facts → trigger an update → it is promoted and the
adapter version advances → greedy answers are the taught ones → restart → adapter, store and history persist and
the answers still hold.
"""

from __future__ import annotations

import pytest
from openai import OpenAI

from .daemon_proc import DaemonProcess

FACTS = [
    ("What is the name of my cat?", "Your cat is called Biscuit."),
    ("Where did I park the car?", "On level 3, spot 42."),
    ("What is the wifi password?", "sloth-rocks-2026"),
    ("Who is the best sloth?", "Sid, the three-toed one."),
]

pytestmark = pytest.mark.slow


def _greedy(client: OpenAI, model: str, prompt: str) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=64)
    return r.choices[0].message.content


def test_whole_loop_survives_restart(state_dir):
    # Only manual updates here, so the test decides when training happens.
    env = {"SLOTH_SCHEDULE_ENABLED": "false"}  # the default recipe, as a new user gets it
    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        client = OpenAI(base_url=daemon.url + "/v1", api_key="unused")
        model = client.models.list().data[0].id

        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=32)
        assert reply.choices[0].message.content
        assert reply.id.startswith("chatcmpl-")
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is sloth-daemon?"}], max_tokens=32, stream=True,
        ) if c.choices]
        assert "".join(pieces)
        before = [_greedy(client, model, q) for q, _ in FACTS]
        assert before != [a for _, a in FACTS]

        with daemon.http() as http:
            taught = http.post("/sloth/teach", json={"examples": [{"prompt": q, "answer": a} for q, a in FACTS]})
            assert taught.status_code == 200, taught.text
            assert taught.json()["added"] == len(FACTS)
            assert http.get("/sloth/status").json()["adapter"] is None
            started = http.post("/sloth/updates")
            assert started.status_code == 202, started.text
            update = daemon.wait_update(started.json()["update_id"])
            assert update["status"] == "promoted", (update, daemon.log())
            assert update["adapter_version"] == "v000001"
            status = http.get("/sloth/status").json()
            assert status["adapter"] == "v000001"
            assert status["pending_examples"] == 0 and status["set_aside_examples"] == 0
            # every gate check is in status with its measurement and bound, judged on data it did not train on
            checks = {c["name"]: c for c in status["recent_updates"][0]["metrics"]["gate"]["checks"]}
            assert {"new", "new_heldout", "anchor_loss", "anchor_kl", "anchor_kl_rise", "anchor_kl_median_rise", "anchor_answers",
                    "recall_answers", "recall_loss"} == set(checks)
            assert checks["anchor_kl"]["passed"] and 0 <= checks["anchor_kl"]["measured"] <= checks["anchor_kl"]["bound"]
            assert checks["anchor_kl"]["examples"] > 0 and "not held out: only 4" in checks["new_heldout"]["detail"]

        for q, a in FACTS:
            assert _greedy(client, model, q) == a
        logged_turns = len(FACTS) * 2 + 2  # the greedy checks (before and after) and the two chats
    finally:
        assert daemon.stop() == 0, daemon.log()

    daemon = DaemonProcess(state_dir, env=env).start()
    try:
        client = OpenAI(base_url=daemon.url + "/v1", api_key="unused")
        with daemon.http() as http:
            status = http.get("/sloth/status").json()
            assert status["adapter"] == "v000001"
            assert status["interactions"] == logged_turns
            updates = http.get("/sloth/updates").json()["data"]
            assert [u["status"] for u in updates] == ["promoted"]
        for q, a in FACTS:
            assert _greedy(client, model, q) == a
    finally:
        assert daemon.stop() == 0, daemon.log()
