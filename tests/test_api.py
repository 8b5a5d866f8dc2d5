"""The HTTP API over real HTTP against a real daemon: OpenAI-compatible serving, errors, store=false, feedback,
teaching, updates and adapters endpoints, API key."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def http(shared_daemon):
    with httpx.Client(base_url=shared_daemon.url, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(http):
    return http.get("/v1/models").json()["data"][0]["id"]


def chat_body(model, content="Hello", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 16, **kw}


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_api_key_is_required_except_for_health(shared_daemon):
    assert httpx.get(shared_daemon.url + "/health").status_code == 200
    assert_error(httpx.get(shared_daemon.url + "/v1/models"), 401, code="invalid_api_key")
    r = httpx.get(shared_daemon.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401)


def test_trigger_with_nothing_pending_is_a_conflict(http):
    # Runs before anything is taught in this module's daemon.
    if http.get("/sloth/status").json()["pending_examples"] == 0:
        assert_error(http.post("/sloth/updates"), 409, code="nothing_to_train")


def test_models_and_unknown_model(http, model):
    assert model == "sloth-tiny"
    assert_error(http.post("/v1/chat/completions", json=chat_body("gpt-5")), 404, param="model", code="model_not_found")


@pytest.mark.parametrize("patch,param", [
    ({"messages": []}, "messages"),
    ({"temperature": 5}, "temperature"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
])
def test_bad_chat_requests_are_400_with_openai_error_bodies(http, model, patch, param):
    assert_error(http.post("/v1/chat/completions", json={**chat_body(model), **patch}), 400, param=param)


def test_malformed_json_and_too_long_prompt(http, model):
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)
    long = chat_body(model, content="x" * 5000, max_tokens=100)
    assert_error(http.post("/v1/chat/completions", json=long), 400, code="context_length_exceeded")
    assert_error(http.post("/v1/completions", json={"model": model, "prompt": ["a", "b"]}), 400)


def test_openai_client_chat_stream_and_completions(shared_daemon, http, model):
    client = OpenAI(base_url=shared_daemon.url + "/v1", api_key=API_KEY)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # greedy: streaming and not agree
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    c = client.completions.create(model=model, prompt="Once upon", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and c.id.startswith("cmpl-")
    streamed = "".join(x.choices[0].text for x in client.completions.create(
        model=model, prompt="Once upon", max_tokens=5, temperature=0, stream=True))
    assert streamed == c.choices[0].text


def test_sse_wire_format(http, model):
    with http.stream("POST", "/v1/chat/completions", json=chat_body(model, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_store_false_is_served_but_never_logged(http, model):
    before = http.get("/sloth/interactions").json()["total"]
    r = http.post("/v1/chat/completions", json=chat_body(model, store=False)).json()
    assert r["choices"][0]["message"]["content"] is not None and r["sloth"]["logged"] is False
    with http.stream("POST", "/v1/chat/completions", json=chat_body(model, store=False, stream=True)) as s:
        list(s.iter_lines())
    assert http.get("/sloth/interactions").json()["total"] == before
    assert_error(http.post("/sloth/feedback", json={"interaction_id": r["id"], "rating": "up"}), 404)
    logged = http.post("/v1/chat/completions", json=chat_body(model)).json()
    assert logged["sloth"]["logged"] is True
    rows = http.get("/sloth/interactions", params={"limit": 1}).json()["data"]
    assert rows[0]["id"] == logged["id"] and rows[0]["response"] == logged["choices"][0]["message"]["content"]
    assert rows[0]["completion_tokens"] == logged["usage"]["completion_tokens"]


def test_feedback_rules(http, model):
    turn = http.post("/v1/chat/completions", json=chat_body(model, content="Say something")).json()
    pending = http.get("/sloth/status").json()["pending_examples"]
    down = http.post("/sloth/feedback", json={"interaction_id": turn["id"], "rating": "down"}).json()
    assert down["example_id"] is None and down["pending_examples"] == pending  # a thumbs-down alone teaches nothing
    fixed = http.post("/sloth/feedback", json={"interaction_id": turn["id"], "correction": "Something!"}).json()
    assert fixed["example_id"] and fixed["pending_examples"] == pending + 1
    # the latest feedback wins: an "up" after the fix endorses the fix, it does not add the answer that was fixed
    up = http.post("/sloth/feedback", json={"interaction_id": turn["id"], "rating": "up"}).json()
    assert up["example_id"] == fixed["example_id"] and up["pending_examples"] == pending + 1
    assert_error(http.post("/sloth/feedback", json={"interaction_id": turn["id"]}), 400)
    assert_error(http.post("/sloth/feedback", json={"interaction_id": "chatcmpl-nope", "rating": "up"}), 404,
                 param="interaction_id")
    assert_error(http.post("/sloth/feedback", json={"interaction_id": turn["id"], "rating": "meh"}), 400)


def test_teach_pairs_documents_and_duplicates(http):
    body = {"examples": [{"prompt": "Capital of Sloth Island?", "answer": "Leafton."},
                         {"prompt": "Complete: roses are", "answer": " red", "kind": "completion"}],
            "documents": ["Sloths move slowly to save energy."]}
    first = http.post("/sloth/teach", json=body).json()
    assert first["added"] == 3 and first["duplicates"] == 0
    again = http.post("/sloth/teach", json=body).json()
    assert again["added"] == 0 and again["duplicates"] == 3 and again["example_ids"] == first["example_ids"]
    assert_error(http.post("/sloth/teach", json={}), 400)
    assert_error(http.post("/sloth/teach", json={"examples": [{"prompt": "", "answer": "x"}]}), 400)
    assert_error(http.post("/sloth/teach", json={"documents": ["   "]}), 400)


def test_update_adapters_and_rollback(shared_daemon, http, model):
    http.post("/sloth/teach", json={"examples": [{"prompt": "Secret word?", "answer": "Pineapple."}]})
    started = http.post("/sloth/updates")
    assert started.status_code == 202
    assert_error(http.post("/sloth/updates"), 409, code="update_running")
    update = shared_daemon.wait_update(started.json()["update_id"])
    assert update["status"] in ("promoted", "rejected"), update
    assert update["metrics"]["gate"]["checks"] and update["metrics"]["train"]["steps"] == 20
    adapters = http.get("/sloth/adapters").json()
    assert [a["version"] for a in adapters["data"]] == ["v000001"]
    if update["status"] == "promoted":
        assert adapters["current"] == "v000001"
        assert http.post("/v1/chat/completions", json=chat_body(model)).json()["sloth"]["adapter_version"] == "v000001"
    assert http.post("/sloth/adapters/rollback", json={"version": "base"}).json()["current"] is None
    assert http.post("/v1/chat/completions", json=chat_body(model)).json()["sloth"]["adapter_version"] is None
    assert_error(http.post("/sloth/adapters/rollback", json={"version": "v000042"}), 404, param="version")
    if update["status"] == "promoted":
        assert http.post("/sloth/adapters/rollback", json={"version": "v000001"}).json()["current"] == "v000001"
    assert_error(http.get("/sloth/updates/999"), 404)
