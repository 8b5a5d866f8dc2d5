"""Forgetting on request, end to end over a real daemon: two facts are taught and learnt (greedy answers over the
official `openai` client); one is forgotten over HTTP; the adapter that learnt it is tainted; the daemon is killed
mid-rebuild and a restart rebuilds again; the rebuild is trained without it and promoted only because its gate finds the forgotten answer gone; the model then no longer gives the
forgotten answer and still gives the other; the tainted version cannot be served again and can be removed (CLI);
ZeroMQ and the CLI forget turns; bad requests are 4xx/exit 1 and delete nothing."""

from __future__ import annotations

import json
import signal
import time

import pytest
from openai import OpenAI

from sloth_daemon.api.zmq_protocol import resolve_addresses
from sloth_daemon.client import SlothClient

from .daemon_proc import DaemonProcess
from .test_cli import cli

pytestmark = pytest.mark.slow

FACTS = [("What is the name of my cat?", "Your cat is called Biscuit."), ("Where did I park?", "On level 3.")]
# Few steps at a high rate: enough for two facts to be recalled exactly by the tiny model, in seconds.
ENV = {"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_TRAIN_STEPS": "24",
       "SLOTH_TRAIN_LEARNING_RATE": "3e-3", "SLOTH_TRAIN_WARM": "false"}


def _greedy(client: OpenAI, model: str, prompt: str) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
                                       max_tokens=32)
    return r.choices[0].message.content, r.id


def test_forget_rebuilds_without_the_fact(state_dir):
    daemon = DaemonProcess(state_dir, env=ENV).start()
    try:
        client = OpenAI(base_url=daemon.url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        with daemon.http() as http:
            taught = http.post("/sloth/teach", json={"examples": [{"prompt": q, "answer": a} for q, a in FACTS]})
            cat_id, park_id = taught.json()["example_ids"]
            first = daemon.wait_update(http.post("/sloth/updates").json()["update_id"])
            assert first["status"] == "promoted", (first, daemon.log())
            assert [_greedy(client, model, q)[0] for q, _ in FACTS] == [a for _, a in FACTS]

            r = http.post("/sloth/forget", json={"example_ids": ["ex_0000000000000000"]})
            assert r.status_code == 404 and "no example" in r.json()["error"]["message"], r.text
            r = http.post("/sloth/forget", json={})
            assert r.status_code == 400 and "say what to forget" in r.json()["error"]["message"], r.text

            out = http.post("/sloth/forget", json={"example_ids": [cat_id]}).json()
            assert out["examples"] == 1 and out["tainted"] == ["v000001"], out
            assert out["rebuild"] == {"update_id": 2, "status": "running"}, out
            status = http.get("/sloth/status").json()
            assert status["adapter"] == "v000001" and "forgotten" in status["adapter_tainted"]  # until the rebuild

        # A crash mid-rebuild, and (as if it came right after the store's transaction) before the registry was
        # marked: start-up repairs both from the store's record.
        daemon.stop(signal.SIGKILL)
        meta = state_dir / "adapters" / "v000001" / "sloth_adapter.json"
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "tainted"}))
        daemon = DaemonProcess(state_dir, env=ENV).start()
        client = OpenAI(base_url=daemon.url + "/v1", api_key="unused")
        assert "forgotten" in json.loads(meta.read_text())["tainted"]
        with daemon.http() as http:
            assert http.get("/sloth/updates/2").json()["status"] == "failed"
            deadline = time.monotonic() + 60
            while http.get("/sloth/updates/3").status_code == 404 and time.monotonic() < deadline:
                time.sleep(0.2)  # the restart's rebuild starts in the background
            rebuild = daemon.wait_update(3)
            assert rebuild["trigger"] == "rebuild"
            assert rebuild["status"] == "promoted", (rebuild, daemon.log())
            assert rebuild["base_adapter"] is None and rebuild["metrics"]["plan"]["rebuild"]
            checks = {c["name"]: c for c in rebuild["metrics"]["gate"]["checks"]}
            assert checks["forgotten"]["passed"] and checks["forgotten"]["examples"] == 1, checks["forgotten"]
            assert rebuild["example_ids"] == [park_id]

            cat, _ = _greedy(client, model, FACTS[0][0])
            assert cat != FACTS[0][1] and "Biscuit" not in cat
            park, park_turn = _greedy(client, model, FACTS[1][0])
            assert park == FACTS[1][1]
            status = http.get("/sloth/status").json()
            assert status["adapter"] == "v000002" and status["adapter_tainted"] is None
            assert list(status["tainted_adapters"]) == ["v000001"]

            r = http.post("/sloth/adapters/rollback", json={"version": "v000001"})
            assert r.status_code == 400 and "forgotten data" in r.json()["error"]["message"], r.text
            r = http.delete("/sloth/adapters/v000002")
            assert r.status_code == 409 and "served" in r.json()["error"]["message"], r.text

        r = cli("adapters", "remove", "v000001", "--url", daemon.url)
        assert r.returncode == 0 and "removed v000001" in r.stdout, r.stderr
        with SlothClient(resolve_addresses("auto", daemon.state_dir)[0], timeout=120) as z:
            out = z.forget(interaction_ids=[park_turn])
            assert (out["interactions"], out["tainted"], out["rebuild"]) == (1, [], None), out
            assert [a["version"] for a in z.adapters()["data"]] == ["v000002"]
        before = http_total(daemon)
        r = cli("forget", "--since", "2000-01-01T00:00:00Z", "--url", daemon.url)
        assert r.returncode == 0, r.stderr
        # v000002 learnt the parking fact: tainted, and with nothing left to learn the base model is served
        assert "v000002" in r.stdout and "serving the base model" in r.stdout, r.stdout
        assert http_total(daemon) == 0 < before
        with daemon.http() as http:
            assert http.get("/sloth/status").json()["adapter"] is None
        r = cli("forget", "--turn", "chatcmpl-nope", "--url", daemon.url)
        assert r.returncode == 1 and "no logged turn" in r.stderr
    finally:
        assert daemon.stop() == 0, daemon.log()


def http_total(daemon: DaemonProcess) -> int:
    with daemon.http() as http:
        return http.get("/sloth/interactions").json()["total"]
