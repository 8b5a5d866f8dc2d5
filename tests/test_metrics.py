"""`GET /metrics` over real HTTP against the real daemon: Prometheus text format, the API key rule, and series that
move with what the daemon does (requests, tokens, latency and TTFT histograms, pending examples, served version)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    r = httpx.get(url + "/metrics", headers=headers if headers is not None else AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")  # the Prometheus text format
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_key_like_the_rest(shared_daemon):
    r = httpx.get(shared_daemon.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_metrics_follow_requests_tokens_and_state(shared_daemon):
    url = shared_daemon.url
    before = scrape(url)
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        version = c.get("/sloth/status").json()["adapter"] or "base"
        body = {"model": "sloth-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
        r = c.post("/v1/chat/completions", json=body).json()
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: {")]
        import json

        streamed = json.loads(lines[-1][6:])["usage"]
        c.post("/sloth/teach", json={"examples": [{"prompt": "Metrics test?", "answer": "Counted."}]})
        assert c.post("/v1/chat/completions", json={**body, "model": "nope"}).status_code == 404
        status = c.get("/sloth/status").json()
    after = scrape(url)
    route = "/v1/chat/completions"

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sloth_http_requests_total", route=route, status="200", adapter_version=version) == 2
    assert delta("sloth_http_requests_total", route=route, status="404", adapter_version=version) == 1
    assert delta("sloth_http_requests_total", route="/sloth/teach", status="200", adapter_version=version) == 1
    completion = r["usage"]["completion_tokens"] + streamed["completion_tokens"]
    prompt = r["usage"]["prompt_tokens"] + streamed["prompt_tokens"]
    assert delta("sloth_tokens_total", route=route, type="completion", adapter_version=version) == completion
    assert delta("sloth_tokens_total", route=route, type="prompt", adapter_version=version) == prompt
    assert delta("sloth_turn_latency_seconds_count", route=route) == 2
    assert delta("sloth_time_to_first_token_seconds_count", route=route) == 2
    assert delta("sloth_turn_latency_seconds_sum", route=route) >= delta("sloth_time_to_first_token_seconds_sum",
                                                                         route=route)
    assert value(after, "sloth_requests_in_flight") == 0 and value(after, "sloth_requests_queued") == 0
    assert value(after, "sloth_pending_examples") == status["pending_examples"]
    assert value(after, "sloth_served_adapter_info", version=version) == 1
    for outcome in ("promoted", "rejected", "failed"):
        assert ("sloth_updates_total", (("outcome", outcome),)) in after


@pytest.mark.parametrize("path", ["/metrics"])
def test_metrics_names_follow_prometheus_conventions(shared_daemon, path):
    r = httpx.get(shared_daemon.url + path, headers=AUTH, timeout=60)
    for family in text_string_to_metric_families(r.text):
        if family.name.startswith(("python_", "process_")):
            continue
        assert family.name.startswith("sloth_") and family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.startswith(family.name + "_total") or s.name.endswith("_created")
                       for s in family.samples)
        if "seconds" in family.name or "duration" in family.name or "latency" in family.name:
            assert "_seconds" in family.name
