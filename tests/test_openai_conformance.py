"""OpenAI conformance: the running daemon over real HTTP with the official `openai` client, through every request
field the API honours, plain and streaming; every response and every chunk is validated against the client's own
pydantic types (the client itself builds them without validation). The same fields through ZeroMQ
(`sloth_daemon.client`). One daemon for the module, small `max_tokens`.
"""

from __future__ import annotations

import json
import shutil

from typing import Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sloth_daemon.api.zmq_protocol import resolve_addresses
from sloth_daemon.client import SlothClient, SlothError

from .daemon_proc import DaemonProcess

MODEL = "sloth-tiny"
Z = ord("Z")  # sloth-tiny's byte-level tokenizer: token id == byte value


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    state = tmp_path_factory.mktemp("conformance") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    d = DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false"}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def http(daemon):
    with httpx.Client(base_url=daemon.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(daemon):
    return OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def zmq_client(daemon):
    with SlothClient(resolve_addresses("auto", daemon.state_dir)[0], timeout=120) as c:
        yield c


def messages(text: str = "Hello") -> list[dict]:
    return [{"role": "user", "content": text}]


def chat(http: httpx.Client, **body) -> ChatCompletion:
    body = {"model": MODEL, "messages": messages(), "max_tokens": 8, **body}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return ChatCompletion.model_validate(r.json())


def complete(http: httpx.Client, **body) -> Completion:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon", "max_tokens": 8, **body})
    assert r.status_code == 200, r.text
    return Completion.model_validate(r.json())


def stream(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """The SSE events of one streamed request, each validated by the client's chunk type; ends with [DONE]."""
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    for ev in events:
        assert "error" not in ev, ev
        if path.endswith("chat/completions"):
            ChatCompletionChunk.model_validate(ev)
        else:
            # The client has no streaming completion type: its `Completion` allows no null finish_reason, which
            # every chunk but the last carries (as OpenAI's own stream does); validated without that one field.
            Completion.model_validate({**ev, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                                                         for c in ev["choices"]]})
    return events


def texts_by_index(events: list[dict], chat_shape: bool) -> dict[int, str]:
    out: dict[int, str] = {}
    for ev in events:
        for c in ev["choices"]:
            piece = (c["delta"].get("content") or "") if chat_shape else c["text"]
            out[c["index"]] = out.get(c["index"], "") + piece
    return out


def assert_400(r: httpx.Response, param: str | None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err
    return err


# -- sampling fields ----------------------------------------------------------------------------------------------
def test_every_sampling_field_through_the_openai_client(client):
    fields = dict(model=MODEL, messages=messages("Tell me about dogs"), max_tokens=8, temperature=0.9, top_p=0.95,
                  n=2, seed=11, stop=["\n\n"], presence_penalty=0.5, frequency_penalty=0.5,
                  logit_bias={str(Z): 1.5}, logprobs=True, top_logprobs=2, user="u1", metadata={"app": "test"},
                  service_tier="auto", store=True)
    raw = client.chat.completions.with_raw_response.create(**fields)
    r = ChatCompletion.model_validate(raw.http_response.json())
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason in ("stop", "length") and c.logprobs is not None
        tokens = c.logprobs.content
        assert "".join(t.token for t in tokens) == c.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    again = client.chat.completions.create(**fields)  # the same seed: the same choices
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    # streaming: the same choices, chunk by chunk, with their logprobs
    chunks = list(client.chat.completions.create(**fields, stream=True, stream_options={"include_usage": True}))
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
    streamed: dict[int, str] = {}
    streamed_tokens: dict[int, list[str]] = {}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            if c.logprobs and c.logprobs.content:
                streamed_tokens.setdefault(c.index, []).extend(t.token for t in c.logprobs.content)
    assert streamed == {c.index: c.message.content for c in r.choices}
    assert streamed_tokens == {c.index: [t.token for t in c.logprobs.content] for c in r.choices if c.logprobs.content}
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_logit_bias_and_penalties_change_the_output(http):
    forced = chat(http, temperature=0, logit_bias={str(Z): 100})
    assert forced.choices[0].message.content == "Z" * 8
    plain = chat(http, temperature=0, max_tokens=12, logit_bias={str(Z): 25})
    penalised = chat(http, temperature=0, max_tokens=12, logit_bias={str(Z): 25}, frequency_penalty=2)
    assert plain.choices[0].message.content.count("Z") > penalised.choices[0].message.content.count("Z")


def test_completions_logprobs_n_and_stream(http):
    c = complete(http, temperature=0, logprobs=3, n=2)
    assert [x.index for x in c.choices] == [0, 1]
    for x in c.choices:
        lp = x.logprobs
        assert "".join(lp.tokens) == x.text and len(lp.token_logprobs) == len(lp.tokens)
        assert all(len(top) == 3 for top in lp.top_logprobs)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert c.choices[0].text == c.choices[1].text  # greedy: both choices agree
    events = stream(http, "/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 8,
                                              "temperature": 0, "logprobs": 3, "n": 2})
    assert texts_by_index(events, chat_shape=False) == {0: c.choices[0].text, 1: c.choices[1].text}
    streamed_tokens = [t for ev in events for ch in ev["choices"] if ch["index"] == 0 and ch["logprobs"]
                       for t in ch["logprobs"]["tokens"]]
    assert streamed_tokens == c.choices[0].logprobs.tokens


def test_streamed_chat_chunks_validate_and_end_with_every_finish(http):
    body = {"model": MODEL, "messages": messages(), "max_tokens": 6, "temperature": 0, "n": 3}
    events = stream(http, "/v1/chat/completions", body)
    finishes = {c["index"]: c["finish_reason"] for ev in events for c in ev["choices"] if c["finish_reason"]}
    assert sorted(finishes) == [0, 1, 2]
    plain = chat(http, **{k: v for k, v in body.items() if k != "model"})
    assert texts_by_index(events, chat_shape=True) == {c.index: c.message.content for c in plain.choices}


# -- response_format (structured generation) ------------------------------------------------------------------------
class Weather(BaseModel):
    unit: Literal["celsius", "fahrenheit"]
    windy: bool


def test_parse_with_a_pydantic_model(client):
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        r = client.chat.completions.parse(model=MODEL, messages=messages("Weather?"), response_format=Weather,
                                          max_tokens=48, temperature=temperature, seed=seed)
        ChatCompletion.model_validate(r.model_dump(exclude={"choices": {0: {"message": {"parsed"}}}}))
        assert isinstance(r.choices[0].message.parsed, Weather), r.choices[0].message.content


def test_json_object_plain_and_streamed(http):
    body = {"model": MODEL, "messages": messages("What is sloth-daemon?"), "max_tokens": 48, "temperature": 0,
            "response_format": {"type": "json_object"}}
    r = chat(http, **{k: v for k, v in body.items() if k != "model"})
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"
    events = stream(http, "/v1/chat/completions", body)
    assert texts_by_index(events, chat_shape=True) == {0: r.choices[0].message.content}
    text = chat(http, response_format={"type": "text"}, temperature=0).choices[0].message.content
    assert text == chat(http, temperature=0).choices[0].message.content


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                    "properties": {"a": {"type": "nonsense"}}}}},
    {"type": "json_schema"},
    {"type": "xml"},
    {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
])
def test_bad_response_formats_are_400(http, fmt):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages(), "response_format": fmt})
    assert r.json()["error"]["param"].startswith("response_format"), r.text
    assert_400(r, r.json()["error"]["param"])


# -- null, strict types and ranges --------------------------------------------------------------------------------
def test_null_means_the_default(http):
    nulls = {k: None for k in ("n", "stream", "store", "temperature", "top_p", "seed", "stop", "presence_penalty",
                               "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "stream_options",
                               "user", "metadata", "tools", "tool_choice", "response_format",
                               "max_completion_tokens")}
    r = chat(http, **nulls)
    assert len(r.choices) == 1 and r.choices[0].logprobs is None
    c = complete(http, n=None, stream=None, store=None, logprobs=None, echo=None, suffix=None, best_of=None)
    assert len(c.choices) == 1


@pytest.mark.parametrize("patch,param", [
    ({"temperature": True}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"n": 1.0}, "n"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"store": 1}, "store"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_p": 0}, "top_p"),
    ({"temperature": 2.5}, "temperature"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logit_bias": {"90": 101}}, "logit_bias.90"),
    ({"logit_bias": {"Z": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"max_tokens": True}, "max_tokens"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"top_k": 5}, "top_k"),
])
def test_bad_fields_are_400_naming_the_field(http, patch, param):
    body = {"model": MODEL, "messages": messages(), "max_tokens": 4, **patch}
    assert_400(http.post("/v1/chat/completions", json=body), param)


def test_tiny_temperature_and_top_p_do_not_crash(http):
    greedy = chat(http, temperature=0).choices[0].message.content
    assert chat(http, temperature=1e-45).choices[0].message.content == greedy
    assert chat(http, temperature=1.0, top_p=1e-320, seed=2**63 - 1).choices[0].message.content == greedy
    assert chat(http, seed=-(2**63)).choices[0].finish_reason in ("stop", "length")


def test_completion_only_fields(http):
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4}
    assert_400(http.post("/v1/completions", json={**body, "logprobs": 21}), "logprobs")
    assert_400(http.post("/v1/completions", json={**body, "best_of": 2}), "best_of")
    assert_400(http.post("/v1/completions", json={**body, "logprobs": True}), "logprobs")


# -- ZeroMQ -------------------------------------------------------------------------------------------------------
def test_the_same_fields_over_zeromq(zmq_client, http):
    z = zmq_client.chat("Hello", max_tokens=8, temperature=0, n=2, logprobs=True, top_logprobs=2,
                        logit_bias={str(Z): 100}, presence_penalty=0.1, frequency_penalty=0.1)
    assert z.text == "Z" * 8 and [c["index"] for c in z.choices] == [0, 1]
    assert [t["token"] for t in z.choices[0]["logprobs"]["content"]] == ["Z"] * 8
    assert z.usage["completion_tokens"] == 16
    streamed = zmq_client.chat("Hello", stream=True, max_tokens=8, temperature=0, logit_bias={str(Z): 100})
    assert "".join(streamed) == "Z" * 8 and streamed.final.finish_reason == "length"
    c = zmq_client.complete("Once upon", max_tokens=5, temperature=0, logprobs=1)
    assert "".join(c.choices[0]["logprobs"]["tokens"]) == c.text
    with pytest.raises(SlothError) as e:
        zmq_client.chat("Hello", seed=2**63)
    assert e.value.code == "invalid_request" and e.value.param == "seed"
    with pytest.raises(SlothError) as e:
        zmq_client.chat("Hello", temperature=True)
    assert e.value.param == "temperature"
    j = zmq_client.chat("Weather?", max_tokens=48, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema()}})
    assert Weather.model_validate_json(j.text)
