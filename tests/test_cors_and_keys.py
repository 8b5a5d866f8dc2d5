"""CORS and the API key over real HTTP: browser origins from the config (default none) through Starlette's
CORSMiddleware, preflights answered without the key, the `Bearer` scheme in any case, the key compared in constant
time and kept out of the log (also when a client puts it in the query string), and child processes (the trainer,
vLLM) started without it in their environment."""

from __future__ import annotations

import logging
import os
import shutil
from types import SimpleNamespace

import httpx
import pytest
from openai import OpenAI

from sloth_daemon.api.auth import REDACTED, SecretRedactor, bearer_key_matches
from sloth_daemon.config import ConfigError, load_config
from sloth_daemon.engine.vllm_server import VllmServer
from sloth_daemon.trainer.process import trainer_env

from .conftest import API_KEY
from .daemon_proc import DaemonProcess

ORIGIN = "http://app.example:3000"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
CHAT = {"model": "sloth-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def cors_daemon(tmp_path_factory, tiny_model):
    state = tmp_path_factory.mktemp("cors") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    daemon = DaemonProcess(state, env={
        "SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_ZMQ": "off",
        "SLOTH_API_KEY": API_KEY, "SLOTH_CORS_ALLOWED_ORIGINS": f"{ORIGIN}, http://other.example"}).start()
    yield daemon
    daemon.stop()


def test_allowed_origin_preflight_needs_no_key_and_responses_carry_cors_headers(cors_daemon):
    url = cors_daemon.url
    r = httpx.options(url + "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    # The real request from the page: answered, and readable by the page.
    r = httpx.post(url + "/v1/chat/completions", json=CHAT,
                   headers={"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    # A wrong key is still refused, and the page can read why.
    r = httpx.get(url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    assert r.json()["error"]["code"] == "invalid_api_key"
    # Streaming responses carry the header too.
    with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60,
                      headers={"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"}) as s:
        assert s.headers["access-control-allow-origin"] == ORIGIN
        assert [line for line in s.iter_lines() if line][-1] == "data: [DONE]"


def test_other_origins_get_no_cors_headers(cors_daemon, shared_daemon):
    for url, origin in [(cors_daemon.url, "http://evil.example"), (shared_daemon.url, ORIGIN)]:
        r = httpx.options(url + "/v1/chat/completions", headers={**PREFLIGHT, "Origin": origin})
        assert r.status_code == 400  # refused by the CORS layer, not a 401 or 405
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(url + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_bearer_scheme_is_case_insensitive_over_http(shared_daemon):
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.get(shared_daemon.url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
        assert r.status_code == 200, scheme
    for header in (API_KEY, f"Basic {API_KEY}", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}", "Bearer", ""):
        r = httpx.get(shared_daemon.url + "/v1/models", headers={"Authorization": header})
        assert r.status_code == 401, header
    assert OpenAI(base_url=shared_daemon.url + "/v1", api_key=API_KEY).models.list().data


def test_key_is_never_logged_even_from_a_query_string(shared_daemon):
    with shared_daemon.http() as c:
        assert c.get("/sloth/interactions", params={"limit": 1, "api_key": API_KEY}).status_code == 200
        c.get("/v1/models", params={"key": API_KEY, "token": "tok-123", "access_token": "abc"})
    httpx.get(shared_daemon.url + f"/v1/models?{API_KEY}=1")  # the key anywhere in the request line
    log = shared_daemon.log_path.read_text(errors="replace")
    assert "GET /sloth/interactions?limit=1&api_key=REDACTED" in log  # the access log still shows the request
    assert API_KEY not in log and "tok-123" not in log


def test_bearer_key_matches_unit():
    assert bearer_key_matches("Bearer s3cret", "s3cret")
    assert bearer_key_matches("bEaReR   s3cret ", "s3cret")
    assert not bearer_key_matches("Bearer s3cre", "s3cret")
    assert not bearer_key_matches("Token s3cret", "s3cret")
    assert not bearer_key_matches(None, "s3cret")
    # A non-ASCII key: the header carries its UTF-8 bytes, which Starlette hands over decoded as latin-1.
    assert bearer_key_matches("Bearer " + "schlüssel".encode().decode("latin-1"), "schlüssel")


def test_redactor_keeps_the_access_record_in_shape():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/models?limit=3&API_KEY=abc&x=my-key-1", "1.1", 200), None)
    SecretRedactor(lambda: "my-key-1").filter(record)
    assert record.getMessage() == f'127.0.0.1:5 - "GET /v1/models?limit=3&API_KEY={REDACTED}&x={REDACTED} HTTP/1.1" 200'


def test_children_do_not_inherit_the_key(monkeypatch):
    monkeypatch.setenv("SLOTH_API_KEY", "s3cret")
    monkeypatch.setenv("SLOTH_TESTHOOK_DIR", "/x")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    child = trainer_env(os.environ)
    assert "SLOTH_API_KEY" not in child and child["SLOTH_TESTHOOK_DIR"] == "/x"
    server = VllmServer.__new__(VllmServer)  # only its environment() is under test here
    server.cfg = SimpleNamespace(sleep_during_updates=False, tensor_parallel_size=2)
    server.device = "cuda:1"
    env = server.environment()
    assert "SLOTH_API_KEY" not in env and env["SLOTH_TESTHOOK_DIR"] == "/x"
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2"  # placement still applies once the key is dropped


def test_cors_config_parses_and_validates(tmp_path):
    cfg = load_config(env={"SLOTH_CORS_ALLOWED_ORIGINS": "http://a:1, https://b.example"})
    assert cfg.cors_allowed_origins == ["http://a:1", "https://b.example"]
    assert load_config(env={}).cors_allowed_origins == []
    assert load_config(env={"SLOTH_CORS_ALLOWED_ORIGINS": '["*"]'}).cors_allowed_origins == ["*"]
    with pytest.raises(ConfigError, match="cors_allowed_origins"):
        load_config(env={"SLOTH_CORS_ALLOWED_ORIGINS": "http://a:1/path"})
