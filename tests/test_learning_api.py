"""What a user sees of the gate over the real front ends: an example that contradicts an anchor is set aside before
training (the update is refused without training), status names it and why (HTTP, CLI, ZeroMQ), and requeueing
makes it pending again."""

from __future__ import annotations

import pytest

from sloth_daemon.api.zmq_protocol import resolve_addresses
from sloth_daemon.client import SlothClient

from .daemon_proc import DaemonProcess
from .test_cli import cli


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model):
    import shutil

    state = tmp_path_factory.mktemp("learning") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    d = DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false"}).start()
    yield d
    assert d.stop() == 0, d.log()


def test_contradiction_is_set_aside_shown_and_requeued(daemon):
    with daemon.http() as http:
        # "Hello" is a built-in question of sloth-tiny, so its answer is an anchor: this contradicts it.
        taught = http.post("/sloth/teach", json={"examples": [{"prompt": "Hello", "answer": "Go away."}]}).json()
        (example_id,) = taught["example_ids"]
        update = daemon.wait_update(http.post("/sloth/updates").json()["update_id"])
        assert update["status"] == "rejected" and "contradict" in update["reason"], update
        assert update["adapter_version"] is None  # nothing was trained
        assert "an anchor" in update["metrics"]["plan"]["conflicts"][example_id]

        status = http.get("/sloth/status").json()
        assert status["pending_examples"] == 0 and status["set_aside_examples"] == 1
        (row,) = status["set_aside"]
        assert row["example_id"] == example_id and "contradicts an anchor" in row["reason"]
        assert row["example"]["answer"] == "Go away." and "forget" in row["reason"]

        r = cli("status", "--url", daemon.url)
        assert r.returncode == 0, r.stderr
        assert "1 example(s) set aside" in r.stdout and example_id in r.stdout
        r = cli("examples", "set-aside", "--url", daemon.url)
        assert r.returncode == 0 and example_id in r.stdout

        bad = http.post("/sloth/examples/requeue", json={"example_ids": "not-a-list"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "example_ids"

    with SlothClient(resolve_addresses("auto", daemon.state_dir)[0], timeout=60) as z:
        assert z.set_aside()["total"] == 1
        assert z.requeue([example_id]) == {"requeued": 1, "pending_examples": 1}
        assert z.set_aside()["total"] == 0
    r = cli("examples", "requeue", "--url", daemon.url)
    assert r.returncode == 0 and "0 example(s) pending again; 1 pending" in r.stdout


def test_size_limits_name_the_field_and_long_documents_are_split(tmp_path, tiny_model):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    env = {"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_LIMITS_MAX_ANSWER_CHARS": "100",
           "SLOTH_LIMITS_MAX_DOCUMENT_CHARS": "5000", "SLOTH_LIMITS_MAX_REQUEST_BYTES": "8192",
           "SLOTH_TRAIN_MAX_SEQ_LEN": "64"}
    d = DaemonProcess(state, env=env).start()
    try:
        with d.http() as http:
            r = http.post("/sloth/teach", json={"examples": [{"prompt": "q", "answer": "a" * 101}]})
            assert r.status_code == 413 and r.json()["error"]["param"] == "examples.0.answer", r.text
            assert "limits.max_answer_chars" in r.json()["error"]["message"]
            r = http.post("/sloth/teach", json={"documents": ["x" * 5001]})
            assert r.status_code == 413 and r.json()["error"]["param"] == "documents.0"
            r = http.post("/sloth/teach", json={"documents": ["y" * 9000]})
            assert r.status_code == 413 and "limits.max_request_bytes" in r.json()["error"]["message"]
            assert http.get("/sloth/status").json()["pending_examples"] == 0  # nothing of it was stored

            doc = "\n\n".join(f"Paragraph {i} says that sloths sleep {i} hours." for i in range(8))
            r = http.post("/sloth/teach", json={"documents": [doc]}).json()
            assert r["document_chunks"][0] > 1 and r["added"] == len(r["example_ids"]) == r["document_chunks"][0]
            texts = [http_example(state, i) for i in r["example_ids"]]
            assert "".join(texts) == doc and all(len(t.encode()) <= 63 for t in texts)
    finally:
        assert d.stop() == 0, d.log()


def http_example(state, example_id: str) -> str:
    from sloth_replay import ReplayStore

    with ReplayStore.open_readonly(state / "replay.db") as store:
        return store.get_example(example_id).answer
