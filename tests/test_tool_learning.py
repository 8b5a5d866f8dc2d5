"""Learning tool calls: an answer that calls tools can be taught (HTTP and ZeroMQ), given as a correction of a turn
that offered tools (its logged tools are reused), imported from OpenAI chat rows with `tools`, and exported back
losslessly; the replay store keeps the tools and calls (schema v5, ids of examples without them unchanged); a real
update on the Hermes-style tool model (`tests/tool_model.py`) makes the served model produce the taught calls,
parsed back into `tool_calls` with finish_reason "tool_calls" by the official `openai` client; bad tools and calls
are 400s naming the field."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from sloth_daemon.api.zmq_protocol import resolve_addresses
from sloth_daemon.client import SlothClient
from sloth_daemon.dataio.exporter import example_row
from sloth_daemon.dataio.importer import ImportRequest, plan_import
from sloth_daemon.prompting import encode_example, render_prompt
from sloth_daemon.tool_calls import ToolUse, check_answer_tools, detect
from sloth_replay import ReplayStore, ToolCallError, content_hash, make_example
from sloth_replay.schema import SCHEMA_VERSION, migrate

from .daemon_proc import DaemonProcess
from .tool_model import HERMES_TEMPLATE, LLAMA3_JSON_TEMPLATE, with_template

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]


def call(name: str, args: dict | str, id: str = "call_x") -> dict:
    return {"id": id, "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


# -- without a daemon ---------------------------------------------------------------------------------------------

def test_example_ids_unchanged_without_tools_and_distinct_with_them():
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    plain = make_example("chat", prompt, "Sunny.", "teach")
    legacy = __import__("hashlib").sha256(json.dumps({"answer": "Sunny.", "kind": "chat", "prompt": prompt},
                                                     sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert plain.content_hash == legacy and plain.tools is None and plain.tool_calls is None
    offered = make_example("chat", prompt, "Sunny.", "teach", tools=TOOLS)
    calling = make_example("chat", prompt, "", "teach", tools=TOOLS,
                           tool_calls=[call("get_weather", {"city": "Paris"})])
    assert len({plain.id, offered.id, calling.id}) == 3
    # call ids are random per response: two calls that differ only in id are one example
    again = make_example("chat", prompt, "", "teach", tools=TOOLS,
                         tool_calls=[call("get_weather", '{"city":"Paris"}', id="call_other")])
    assert again.id == calling.id and calling.tool_calls == [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert calling.content_hash == content_hash("chat", prompt, "", TOOLS, calling.tool_calls)


@pytest.mark.parametrize("tools, calls, param", [
    (TOOLS, [call("rm_rf", {})], "tool_calls.0.function.name"),
    (TOOLS, [call("get_weather", "not json")], "tool_calls.0.function.arguments"),
    (TOOLS, [call("get_time", {}), call("get_weather", "[1, 2]")], "tool_calls.1.function.arguments"),
    (None, [call("get_weather", {"city": "Oslo"})], "tool_calls"),
    ([{"type": "function"}], None, "tools.0"),
])
def test_bad_tools_and_calls_name_the_field(tools, calls, param):
    with pytest.raises(ToolCallError) as e:
        make_example("chat", [{"role": "user", "content": "q"}], "", "teach", tools=tools, tool_calls=calls)
    assert e.value.param == param and str(e.value).startswith(param + ": ")


def test_training_text_is_what_the_parser_reads_back(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    with pytest.raises(ToolCallError) as e:  # sloth-tiny's own template ignores tools: it could never learn them
        check_answer_tools(tok, TOOLS, [call("get_weather", {"city": "Paris"})])
    assert e.value.param == "tools"
    for template in (HERMES_TEMPLATE, LLAMA3_JSON_TEMPLATE):
        tok.chat_template = template
        ex = make_example("chat", prompt, "", "teach", tools=TOOLS,
                          tool_calls=[call("get_weather", {"city": "Paris"})])
        ids, labels = encode_example(tok, "chat", ex.prompt, ex.answer, 4096, ex.tools, ex.tool_calls)
        served_prompt = render_prompt(tok, "chat", prompt, TOOLS)
        assert tok.decode(ids[:labels.count(-100)]) == served_prompt  # the prompt as serving renders it, tools in
        answer = tok.decode([t for t in labels if t != -100])
        assert answer.endswith("<|end|>")
        content, calls = ToolUse(detect(tok), TOOLS).parse(answer[:-len("<|end|>")])
        assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
            == [("get_weather", {"city": "Paris"})]


def test_store_keeps_tools_migrates_and_exports_losslessly(tmp_path, tiny_model):
    import sqlite3

    from sqlite_utils import Database

    db = tmp_path / "replay.db"
    conn = sqlite3.connect(db, isolation_level=None)  # a store as the previous version left it (schema v4)
    migrate(Database(conn), target=4)
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    plain = make_example("chat", prompt, "Sunny.", "teach")
    conn.execute("INSERT INTO examples (id, content_hash, kind, prompt, answer, source, created_at) VALUES "
                 "(?, ?, 'chat', ?, 'Sunny.', 'teach', ?)", [plain.id, plain.content_hash, json.dumps(prompt),
                                                             plain.created_at])
    conn.close()
    store = ReplayStore(db)
    assert store.schema_version == SCHEMA_VERSION and store.get_example(plain.id) == plain
    assert store.add_taught(prompt, "Sunny.") == (plain, False)  # the same id as before the migration
    history = [*prompt, {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"},
                                                                                   id="call_1")]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}, {"role": "user", "content": "And now?"}]
    ex, created = store.add_taught(history, "Let me look again.", tools=TOOLS,
                                   tool_calls=[call("get_weather", {"city": "Paris"}), call("get_time", {})])
    assert created and store.get_example(ex.id) == ex and ex.tool_calls[1]["function"]["name"] == "get_time"
    assert {e.id for e in store.pending_examples()} == {plain.id, ex.id}

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = HERMES_TEMPLATE
    rows = [json.loads(json.dumps(example_row(e))) for e in (plain, ex)]
    assert rows[1]["tools"] == TOOLS and rows[1]["messages"][-1]["tool_calls"][0]["function"]["name"] == "get_weather"
    plan = plan_import(ImportRequest(rows=rows), tok, 512)
    assert not plan.errors
    back = [make_example(kind, p, a, "teach", **(extra[0] if extra else {})) for _, kind, p, a, *extra in plan.examples]
    assert [b.id for b in back] == [plain.id, ex.id]
    assert store.add_examples(plan.examples)[1][0].id == ex.id

    bad = {"messages": [*prompt, {"role": "assistant", "content": None, "tool_calls": [call("rm_rf", {})]}],
           "tools": TOOLS}
    no_tools = {"messages": bad["messages"][:1] + [{"role": "assistant", "tool_calls": [call("get_time", {})]}]}
    errors = plan_import(ImportRequest(rows=[bad, no_tools]), tok, 512).errors
    assert [(e.field, e.line) for e in errors] == [("messages.1.tool_calls.0.function.name", 1),
                                                  ("messages.1.tool_calls", 2)], errors
    store.close()


# -- a real daemon, a real update ---------------------------------------------------------------------------------

# Few steps at a high rate: enough for the tiny model to give two taught calls exactly; short tool definitions keep
# the prompts (the template writes the tools into them) short.
ENV = {"SLOTH_SCHEDULE_ENABLED": "false", "SLOTH_ANCHORS_ENABLED": "false", "SLOTH_TRAIN_STEPS": "60",
       "SLOTH_TRAIN_BATCH_SIZE": "2", "SLOTH_TRAIN_LEARNING_RATE": "3e-3", "SLOTH_TRAIN_WARM": "false"}
PARIS = [{"role": "user", "content": "Weather in Paris?"}]
TOKYO = [{"role": "user", "content": "Time in Tokyo?"}]
SHORT = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


def test_a_corrected_tool_call_is_learnt(tiny_model, tmp_path):
    model = with_template(tiny_model, tmp_path / "hermes" / "sloth-tiny", HERMES_TEMPLATE)
    daemon = DaemonProcess(tmp_path / "state", env=ENV, args=["--model", str(model)]).start()
    try:
        client = OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
        first = client.chat.completions.create(model="sloth-tiny", messages=PARIS, tools=SHORT, temperature=0,
                                               max_tokens=24)
        assert first.choices[0].finish_reason != "tool_calls"  # not learnt yet
        plain = client.chat.completions.create(model="sloth-tiny", messages=PARIS, temperature=0, max_tokens=4)
        fix = [call("get_weather", {"city": "Paris"})]
        with daemon.http() as http:
            def bad(path: str, body: dict, param: str) -> None:
                r = http.post(path, json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
                assert param in r.json()["error"]["message"]

            bad("/sloth/feedback", {"interaction_id": first.id, "tool_calls": [call("rm_rf", {})]},
                "tool_calls.0.function.name")
            bad("/sloth/feedback", {"interaction_id": first.id, "tool_calls": [call("get_weather", "Paris")]},
                "tool_calls.0.function.arguments")
            bad("/sloth/feedback", {"interaction_id": plain.id, "tool_calls": fix}, "tool_calls")  # offered none
            bad("/sloth/teach", {"examples": [{"prompt": PARIS, "tool_calls": fix}]}, "examples.0.tool_calls")
            bad("/sloth/teach", {"examples": [{"prompt": PARIS, "tools": SHORT, "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]},
                "examples.0.tool_calls.0.function.arguments")
            bad("/sloth/teach", {"examples": [{"prompt": PARIS, "tools": SHORT, "tool_calls": [
                call("get_time", "[]")]}]}, "examples.0.tool_calls.0.function.arguments")
            assert http.get("/sloth/status").json()["pending_examples"] == 0  # nothing of it was stored

            fb = http.post("/sloth/feedback", json={"interaction_id": first.id, "tool_calls": fix})
            assert fb.status_code == 200, fb.text
            (turn,) = [t for t in http.get("/sloth/interactions").json()["data"] if t["id"] == first.id]
            assert turn["params"]["tools"] == SHORT  # what learning needs was logged
            assert turn["feedback"][0]["tool_calls"][0]["function"]["name"] == "get_weather"
        with ReplayStore.open_readonly(daemon.state_dir / "replay.db") as store:
            ex = store.get_example(fb.json()["example_id"])
        assert ex.source == "correction" and ex.tools == SHORT and ex.answer == ""
        assert ex.tool_calls == [{"type": "function", "function": {"name": "get_weather",
                                                                   "arguments": '{"city": "Paris"}'}}]

        with SlothClient(resolve_addresses("auto", daemon.state_dir)[0], timeout=120) as z:
            taught = z.teach([{"prompt": TOKYO, "tools": SHORT, "tool_calls": [call("get_time", {"zone": "Tokyo"})]}])
            assert taught["added"] == 1
            update = daemon.wait_update(z.trigger_update()["update_id"])
        assert update["status"] == "promoted", (update, daemon.log())

        for prompt, name, args in ((PARIS, "get_weather", {"city": "Paris"}), (TOKYO, "get_time", {"zone": "Tokyo"})):
            r = client.chat.completions.create(model="sloth-tiny", messages=prompt, tools=SHORT, temperature=0,
                                               max_tokens=120)  # byte-level tokens: the call is ~70
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", (choice, update["metrics"].get("train"))
            assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
                [(name, args)]
    finally:
        assert daemon.stop() == 0, daemon.log()
