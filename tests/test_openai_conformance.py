"""OpenAI conformance: the running daemon over real HTTP with the official `openai` client, through every request
field the API honours, plain and streaming; every response and every chunk is validated against the client's own
pydantic types (the client itself builds them without validation). The same fields through ZeroMQ
(`sloth_daemon.client`). One daemon for the module, serving a sloth-tiny copy with a Hermes-style tool-aware chat
template (`tests/tool_model.py`; without tools it renders sloth-tiny's own format), small `max_tokens`.
"""

from __future__ import annotations

import json

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
from .tool_model import HERMES_TEMPLATE, with_template

MODEL = "sloth-tiny"
Z = ord("Z")  # sloth-tiny's byte-level tokenizer: token id == byte value


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    model = with_template(tiny_model, root / "hermes" / MODEL, HERMES_TEMPLATE)
    d = DaemonProcess(root / "state", env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false"},
                      args=["--model", str(model)]).start()
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
def test_models_list_and_retrieve(client):
    import openai

    served = client.models.list().data
    assert [m.id for m in served] == ["sloth-tiny"]
    assert client.models.retrieve("sloth-tiny").id == "sloth-tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("org/gpt-4o")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


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


# -- tools ---------------------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the forecast", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def assert_weather_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args["unit"] in ("celsius", "fahrenheit") and 1 <= args["days"] <= 7
    return args


def test_forced_tool_call_plain_and_streamed(client, http):
    fields = dict(model=MODEL, messages=messages("Weather in Paris?"), tools=[WEATHER, TIME], max_tokens=96,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    raw = client.chat.completions.with_raw_response.create(**fields)
    r = ChatCompletion.model_validate(raw.http_response.json())
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    args = assert_weather_call(choice.message.tool_calls[0])
    chunks = list(client.chat.completions.create(**fields, stream=True))
    calls: dict[int, dict] = {}
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
        for c in ch.choices:
            for d in c.delta.tool_calls or ():
                slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert calls == {0: {"name": "get_weather", "arguments": choice.message.tool_calls[0].function.arguments}}
    row = http.get("/sloth/interactions", params={"limit": 2}).json()["data"]
    logged = next(x for x in row if x["id"] == r.id)
    assert logged["params"]["tools"][0]["function"]["name"] == "get_weather"
    assert logged["params"]["tool_choice"] == "get_weather" and logged["finish_reason"] == "tool_calls"
    assert json.loads(logged["params"]["tool_calls"][0]["function"]["arguments"]) == args


def test_required_tool_choice_calls_one_of_the_tools(client):
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=MODEL, messages=messages("What now?"), tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=96, temperature=1.0, seed=seed)
        ChatCompletion.model_validate(r.model_dump())
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name in ("get_weather", "get_time") and r.choices[0].finish_reason == "tool_calls"
        json.loads(call.function.arguments)


def test_tool_results_in_the_history(client, http):
    history = [*messages("Weather in Paris?"),
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": "{\"unit\": \"celsius\", \"days\": 1}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    ChatCompletion.model_validate(r.model_dump())
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    logged = http.get("/sloth/interactions", params={"limit": 1}).json()["data"][0]
    assert logged["id"] == r.id
    assert logged["prompt"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert logged["prompt"][2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}
    # the history changes the prompt: without the tool turns the model sees something else
    plain = client.chat.completions.create(model=MODEL, messages=messages("Weather in Paris?"), tools=[WEATHER],
                                           max_tokens=8, temperature=0)
    assert plain.usage.prompt_tokens < r.usage.prompt_tokens


def test_auto_and_none_tool_choice_answer_in_text(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=MODEL, messages=messages("What is sloth-daemon?"),
                                           tools=[WEATHER], tool_choice=choice, max_tokens=12, temperature=0)
        ChatCompletion.model_validate(r.model_dump())
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("patch,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400(http, patch, param):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages(), "max_tokens": 4, **patch})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] is not None and r.json()["error"]["param"].startswith(param), r.text


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
    t = zmq_client.chat("Weather?", max_tokens=96, temperature=0, tools=[WEATHER], tool_choice="required")
    assert t.finish_reason == "tool_calls" and t.choices[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    j = zmq_client.chat("Weather?", max_tokens=48, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema()}})
    assert Weather.model_validate_json(j.text)
