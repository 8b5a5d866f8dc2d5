"""Stop strings are cut where they begin whatever bytes they hold, streaming or not, over HTTP and ZeroMQ, and what is
logged is exactly what the client received.

With sloth-tiny's byte-level tokenizer "ü" is two tokens, so after "Z" and the first byte of "ü" the decoded text
ends "Z\\ufffd": the stop string "Zü" must hold back both (it once sent the "Z"). The end-to-end tests serve an
adapter the real trainer taught "You live in Zürich." (`tests/taught_adapter.py`).
"""

from __future__ import annotations

import shutil

import pytest
from openai import OpenAI

from sloth_daemon.api.zmq_protocol import resolve_addresses
from sloth_daemon.client import SlothClient
from sloth_daemon.engine.stop_strings import StopStrings

from .daemon_proc import DaemonProcess
from .taught_adapter import ANSWER, QUESTION, STOP_CUTS, serve_adapter

CUTS = STOP_CUTS


def stream_through(tokenizer, text: str, stops: list[str]) -> tuple[list[str], bool]:
    """Decode `text` token by token as the embedded engine does; the deltas sent and whether a stop string hit."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cutter, deltas = StopStrings(stops), []
    for n in range(1, len(ids) + 1):
        delta, stopped = cutter.feed(tokenizer.decode(ids[:n], skip_special_tokens=True))
        if delta:
            deltas.append(delta)
        if stopped:
            return deltas, True
    if rest := cutter.flush(tokenizer.decode(ids, skip_special_tokens=True)):
        deltas.append(rest)
    assert "".join(deltas) == cutter.sent
    return deltas, False


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("stops,expected", CUTS)
def test_byte_level_decoding_never_leaks_a_stop_prefix(tokenizer, stops, expected):
    deltas, stopped = stream_through(tokenizer, ANSWER, stops)
    assert "".join(deltas) == expected
    assert stopped == (expected != ANSWER)
    assert all("\ufffd" not in d for d in deltas)  # half characters are never sent


def test_stop_strings_with_emoji_and_cjk(tokenizer):
    text = "答えは🦥です。Done"
    assert "".join(stream_through(tokenizer, text, ["🦥で"])[0]) == "答えは"
    assert "".join(stream_through(tokenizer, text, ["す。D"])[0]) == "答えは🦥で"
    assert "".join(stream_through(tokenizer, text, [""])[0]) == text  # an empty stop string matches nothing


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model, taught_adapter):
    state = tmp_path_factory.mktemp("stops") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    serve_adapter(state, taught_adapter)
    d = DaemonProcess(state, env={"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false"}).start()
    yield d
    d.stop()


def logged(daemon, turn_id: str) -> str:
    with daemon.http() as http:
        rows = http.get("/sloth/interactions", params={"limit": 20}).json()["data"]
    return next(r["response"] for r in rows if r["id"] == turn_id)


def test_http_chat_and_completions_cut_stops_streaming_or_not(daemon):
    client = OpenAI(base_url=daemon.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    prompt = f"<|bos|><|user|>{QUESTION}<|end|><|assistant|>"  # the chat template's rendering, sent raw
    for stops, expected in CUTS:
        r = client.chat.completions.create(model="sloth-tiny", messages=messages, temperature=0, max_tokens=32,
                                           stop=stops or None)
        assert r.choices[0].message.content == expected, stops
        assert r.choices[0].finish_reason == "stop"
        assert logged(daemon, r.id) == expected
        chunks = list(client.chat.completions.create(model="sloth-tiny", messages=messages, temperature=0,
                                                     max_tokens=32, stop=stops or None, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected, stops
        assert logged(daemon, chunks[0].id) == expected
        c = client.completions.create(model="sloth-tiny", prompt=prompt, temperature=0, max_tokens=32,
                                      stop=stops or None)
        assert c.choices[0].text == expected and logged(daemon, c.id) == expected
        streamed = list(client.completions.create(model="sloth-tiny", prompt=prompt, temperature=0, max_tokens=32,
                                                  stop=stops or None, stream=True))
        assert "".join(x.choices[0].text for x in streamed) == expected
        assert logged(daemon, streamed[0].id) == expected


def test_zmq_cuts_stops_streaming_or_not(daemon):
    with SlothClient(resolve_addresses("auto", daemon.state_dir)[0], timeout=60) as c:
        for stops, expected in CUTS[:3]:
            r = c.chat(QUESTION, temperature=0, max_tokens=32, stop=stops)
            assert r.text == expected and logged(daemon, r.interaction_id) == expected
            stream = c.chat(QUESTION, temperature=0, max_tokens=32, stop=stops, stream=True)
            assert "".join(stream) == expected
            assert stream.final.text == expected and logged(daemon, stream.final.interaction_id) == expected
