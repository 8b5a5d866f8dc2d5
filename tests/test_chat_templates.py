"""Chat templates over the real daemon, with model folders that behave like the major families (`model_families`):
the model's own template or the config's `chat_template` file renders every chat prompt; what a template refuses
is a 400 (`invalid_request_error`, `param: "messages"`, the template's own message) over HTTP, streaming or not,
and `invalid_request` over ZeroMQ, never a 500; a model folder with no template serves with the built-in fallback
(named in the log and in `/sloth/status`), generates its anchors and trains a taught chat pair. Serving, anchors,
training and the gate render through the same template (`prompting.render_prompt`).
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import openai
import pytest
from openai import OpenAI

from sloth_daemon.api.zmq_protocol import resolve_addresses
from sloth_daemon.chat_template import FALLBACK_NAME, FALLBACK_TEMPLATE, ChatTemplateSetupError, load_tokenizer
from sloth_daemon.client import SlothClient, SlothError
from sloth_daemon.config import ConfigError, load_config
from sloth_daemon.prompting import encode, encode_example, render_prompt
from sloth_daemon.trainer.job import TrainJob
from sloth_daemon.trainer.recipe import load_base

from .daemon_proc import DaemonProcess
from .model_families import FOLDED, REFUSALS, SYSTEM_FIRST, TEMPLATES, make_family_model

TAUGHT_QUESTION, TAUGHT_ANSWER = "What is sloth-daemon?", (
    "A service that serves a local LLM and keeps fine-tuning it with LoRA from your feedback.")
QUIET = {"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false"}
START_TIMEOUT_S = 300  # six daemons start here; on a busy 2-core machine one may take minutes
# FOLDED, made tool-aware (Hermes-style calls): sloth-tiny's own template ignores tools, this one renders them.
FOLDED_TOOLS = FOLDED.replace(
    "{{ bos_token }}", "{{ bos_token }}{% if tools %}<|system|>Call a tool as <tool_call>{\"name\": ..., "
    "\"arguments\": ...}</tool_call>: {{ tools | tojson }}<|end|>{% endif %}", 1).replace(
    "{{ '<|assistant|>' + message['content'] + '<|end|>' }}",
    "{{ '<|assistant|>' + (message['content'] or '') }}{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}{% endfor %}{{ '<|end|>' }}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def start(tmp_path_factory, tiny_model, family: str, env: dict | None = None, args: list | None = None):
    root = tmp_path_factory.mktemp(family)
    folder = make_family_model(tiny_model, root / f"{family}-like", family)
    daemon = DaemonProcess(root / "state", env={**QUIET, **(env or {})}, args=["--model", str(folder), *(args or [])])
    daemon.folder, daemon.model = folder, folder.name
    return daemon.start(timeout=START_TIMEOUT_S)


def status(daemon) -> dict:
    with daemon.http() as c:
        return c.get("/sloth/status").json()


def zmq_client(daemon) -> SlothClient:
    return SlothClient(resolve_addresses("auto", daemon.state_dir)[0], timeout=60)


def interactions(daemon) -> int:
    with daemon.http() as c:
        return c.get("/sloth/interactions").json()["total"]


@pytest.fixture(scope="module")
def family(request, tmp_path_factory, tiny_model):
    """A daemon serving the family's model folder (the test's `family` parameter), one per family and module."""
    daemon = start(tmp_path_factory, tiny_model, request.param)
    daemon.family = request.param
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("family", ["no-system", "alternating", "tools"], indirect=True)
def test_the_models_own_template_serves(family):
    assert status(family)["chat_template"] == {"source": "model", "name": str(family.folder)}
    client = OpenAI(base_url=family.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=family.model, messages=[{"role": "user", "content": TAUGHT_QUESTION}],
                                       temperature=0, max_tokens=96)
    assert r.choices[0].message.content == TAUGHT_ANSWER  # the template renders a lone question as sloth-tiny's does
    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": TAUGHT_QUESTION}]
    assert client.chat.completions.create(model=family.model, messages=conversation, max_tokens=4).choices


@pytest.mark.parametrize("family", list(REFUSALS), indirect=True)
def test_what_the_template_refuses_is_a_400_naming_messages(family):
    refusals = REFUSALS[family.family]
    client = OpenAI(base_url=family.url + "/v1", api_key="unused", max_retries=2)
    before = interactions(family)
    for messages, template_says in refusals:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=family.model, messages=messages, max_tokens=4, stream=stream)
            err = e.value.body
            assert e.value.status_code == 400 and err["type"] == "invalid_request_error", err
            assert err["param"] == "messages" and template_says in err["message"], err
        # The stream is refused before it starts: a JSON error, not an event stream.
        r = httpx.post(family.url + "/v1/chat/completions",
                       json={"model": family.model, "messages": messages, "stream": True})
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
        with zmq_client(family) as c:
            for stream in (False, True):
                with pytest.raises(SlothError) as z:
                    out = c.chat(messages, stream=stream, max_tokens=4)
                    if stream:
                        list(out)
                assert z.value.code == "invalid_request" and z.value.param == "messages"
                assert template_says in z.value.message
            # Teaching what the template refuses is refused too, before anything is stored.
            with pytest.raises(SlothError) as t:
                c.teach(examples=[{"prompt": messages, "answer": "Fine."}, {"prompt": "Fine?", "answer": "Yes."}])
            assert t.value.param == "examples.0.prompt" and template_says in t.value.message
    assert interactions(family) == before  # nothing generated, nothing logged
    assert status(family)["pending_examples"] == 0
    log = family.log()
    assert " 500 " not in log and "Traceback" not in log


@pytest.mark.parametrize("family", ["tools"], indirect=True)
def test_tool_results_render_with_a_tool_aware_template(family):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}}
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Bern?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12 C, sunny"}]
    client = OpenAI(base_url=family.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=family.model, messages=messages, max_tokens=4)
    tokenizer = load_tokenizer(family.folder, None)[0]
    rendered = render_prompt(tokenizer, "chat", messages)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call><|end|>' in rendered
    assert "<|user|><tool_response>\n12 C, sunny\n</tool_response><|end|><|assistant|>" in rendered
    assert r.usage.prompt_tokens == len(encode(tokenizer, rendered))  # the daemon rendered exactly this


@pytest.fixture(scope="module")
def configured(tmp_path_factory, tiny_model):
    """sloth-tiny served with the config's chat_template: a Llama-2-like file that folds the system message (and
    renders tools, which sloth-tiny's own template does not)."""
    root = tmp_path_factory.mktemp("configured")
    template = root / "folded.jinja"
    assert FOLDED_TOOLS != FOLDED and "<tool_call>" in FOLDED_TOOLS
    template.write_text(FOLDED_TOOLS)
    state = root / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    config = root / "sloth.toml"
    config.write_text(f'chat_template = "{template}"\n')
    daemon = DaemonProcess(state, env={**QUIET, "SLOTH_CONFIG": str(config)}).start(timeout=START_TIMEOUT_S)
    daemon.template = template
    yield daemon
    daemon.stop()


def test_a_configured_template_renders_the_prompts(configured, tiny_model):
    assert status(configured)["chat_template"] == {"source": "config", "name": str(configured.template)}
    client = OpenAI(base_url=configured.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="sloth-tiny", messages=SYSTEM_FIRST, max_tokens=4)
    tokenizer = load_tokenizer(tiny_model, str(configured.template))[0]
    folded = "<|bos|><|user|>[SYS]Be brief.[/SYS]\n\nHello<|end|><|assistant|>"
    assert render_prompt(tokenizer, "chat", SYSTEM_FIRST) == folded
    assert r.usage.prompt_tokens == len(encode(tokenizer, folded))  # sloth-tiny's own template gives another count
    own = load_tokenizer(tiny_model, None)[0]
    assert len(encode(own, render_prompt(own, "chat", SYSTEM_FIRST))) != r.usage.prompt_tokens
    streamed = list(client.chat.completions.create(model="sloth-tiny", messages=SYSTEM_FIRST, max_tokens=4,
                                                   stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_the_trainer_renders_exactly_as_the_engines_do(tiny_model, tmp_path):
    template = tmp_path / "folded.jinja"
    template.write_text(FOLDED)
    served, fmt = load_tokenizer(tiny_model, str(template))
    job = TrainJob(base_model=str(tiny_model), chat_template=fmt.template, output_dir=str(tmp_path), batches=[])
    _model, trained = load_base(job)
    for messages in (SYSTEM_FIRST, [{"role": "user", "content": "Hello"}]):
        prompt = render_prompt(served, "chat", messages)
        assert render_prompt(trained, "chat", messages) == prompt
        ids, labels = encode_example(trained, "chat", messages, "Hi.", 256)
        assert ids[: labels.count(-100)] == encode(served, prompt)  # the loss masks exactly the served prompt


def test_import_judges_tools_by_the_template_in_use(configured, tiny_model):
    """Importing a row that offers and calls tools asks the configured template (which renders tools), not the
    model folder's own (which does not), as teaching and serving do."""
    assert "<tool_call>" not in (load_tokenizer(tiny_model, None)[0].chat_template or "")
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}}]
    row = {"messages": [{"role": "user", "content": "Weather in Bern?"},
                        {"role": "assistant", "content": None, "tool_calls": calls}], "tools": [WEATHER]}
    r = httpx.post(configured.url + "/sloth/import", json={"rows": [row]}, timeout=60)
    assert r.status_code == 200 and r.json()["examples"] == 1, r.text
    taught = httpx.post(configured.url + "/sloth/teach", json={"examples": [
        {"prompt": row["messages"][:1], "tools": [WEATHER], "tool_calls": row["messages"][1]["tool_calls"]}]},
        timeout=60)
    assert taught.status_code == 200 and taught.json()["duplicates"] == 1, taught.text  # the same example


@pytest.mark.parametrize("family", ["no-system"], indirect=True)
def test_import_refuses_rows_the_template_refuses(family):
    """A row the chat template refuses is an import error naming `messages` (as teaching refuses it), not an update
    that fails later."""
    rows = [{"messages": [*SYSTEM_FIRST, {"role": "assistant", "content": "Hi."}]}]
    r = httpx.post(family.url + "/sloth/import", json={"rows": rows, "lines": [4]}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages", r.text
    assert "line 4" in err["message"] and "System role not supported" in err["message"]
    assert status(family)["pending_examples"] == 0


@pytest.fixture(scope="module")
def templateless(tmp_path_factory, tiny_model):
    daemon = start(tmp_path_factory, tiny_model, "none",
                   env={"SLOTH_ANCHORS_ENABLED": "true", "SLOTH_ANCHORS_MAX_TOKENS": "8", "SLOTH_TRAIN_STEPS": "3"})
    yield daemon
    daemon.stop()


def test_a_model_without_a_template_serves_with_the_named_fallback(templateless):
    assert TEMPLATES["none"] is None
    assert status(templateless)["chat_template"] == {"source": "fallback", "name": FALLBACK_NAME}
    assert FALLBACK_NAME in templateless.log() and "has no chat template" in templateless.log()
    client = OpenAI(base_url=templateless.url + "/v1", api_key="unused")
    for messages in (SYSTEM_FIRST, [{"role": "user", "content": "Hello"}]):
        r = client.chat.completions.create(model=templateless.model, messages=messages, max_tokens=6)
        assert r.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model=templateless.model, messages=messages, max_tokens=6,
                                                     stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with zmq_client(templateless) as c:
        assert c.chat("Hello", max_tokens=4).logged


def test_a_model_without_a_template_makes_anchors_and_trains(templateless):
    deadline = time.monotonic() + 300
    while status(templateless)["anchors"] == 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert status(templateless)["anchors"] > 0, templateless.log()
    with templateless.http() as http:
        taught = http.post("/sloth/teach", json={"examples": [
            {"prompt": "Name of my cat?", "answer": "Biscuit."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Dog?"}],
             "answer": "Rex."}]})
        assert taught.status_code == 200 and taught.json()["added"] == 2, taught.text
        update = templateless.wait_update(http.post("/sloth/updates").json()["update_id"])
    assert update["status"] in ("promoted", "rejected"), (update, templateless.log())
    assert update["metrics"]["train"]["steps"] == 3
    job = json.loads((templateless.state_dir / "runs" / "update-000001" / "job.json").read_text())
    assert job["chat_template"] == FALLBACK_TEMPLATE


def test_bad_template_settings_fail_at_start_naming_the_key(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="chat_template"):
        load_config(env={"SLOTH_CHAT_TEMPLATE": str(tmp_path / "missing.jinja")})
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }")
    with pytest.raises(ChatTemplateSetupError, match="chat_template .*broken.jinja.* not a valid Jinja template"):
        load_tokenizer(tiny_model, str(broken))
    state = tmp_path / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    daemon = DaemonProcess(state, env={**QUIET, "SLOTH_CHAT_TEMPLATE": str(broken)})
    with pytest.raises(RuntimeError, match="not a valid Jinja template"):
        daemon.start(timeout=START_TIMEOUT_S)
