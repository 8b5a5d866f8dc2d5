"""Tool-call formats: detection from the chat template, parsing model output into OpenAI tool calls (transformers'
response parsing), and the forced-call guide's schema."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from sloth_daemon.default_model import CHAT_TEMPLATE
from sloth_daemon.tool_calls import HERMES, LLAMA3_JSON, ToolUse, detect, to_template_messages

from .tool_model import HERMES_TEMPLATE, LLAMA3_JSON_TEMPLATE

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def test_detect_from_the_chat_template(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert detect(tok) is None  # sloth-tiny's own template ignores tools
    tok.chat_template = HERMES_TEMPLATE
    assert detect(tok) is HERMES
    tok.chat_template = LLAMA3_JSON_TEMPLATE
    assert detect(tok) is LLAMA3_JSON
    tok.chat_template = CHAT_TEMPLATE
    assert detect(tok) is None


def test_hermes_calls_parallel_and_content():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": "3"}}\n'
            '</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = ToolUse(HERMES, [WEATHER, TIME]).parse(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}  # cast to the schema
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    _, one = ToolUse(HERMES, [WEATHER, TIME], parallel=False).parse(text)
    assert [c["function"]["name"] for c in one] == ["get_weather"]


def test_llama3_json_calls():
    for text in ('{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}'):
        content, calls = ToolUse(LLAMA3_JSON, [WEATHER]).parse(text)
        assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}


def test_text_that_is_no_valid_call_stays_content():
    cases = [(HERMES, "Just an answer."), (HERMES, '<tool_call>{"name": broken</tool_call>'),
             (HERMES, '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),
             (LLAMA3_JSON, "Hello {there}"), (LLAMA3_JSON, '{"name": "get_weather", "arguments": {}}')]
    for fmt, text in cases:
        assert ToolUse(fmt, [WEATHER]).parse(text) == (text, []), (fmt.name, text)


def test_forced_guide_schema():
    g = HERMES.guide([WEATHER])
    assert (g.prefix, g.suffix, g.param) == ("<tool_call>\n", "\n</tool_call>", "tools")
    assert g.json_schema["properties"]["name"] == {"const": "get_weather"}
    assert g.json_schema["properties"]["arguments"] == WEATHER["function"]["parameters"]
    both = LLAMA3_JSON.guide([WEATHER, TIME])
    assert [o["properties"]["name"]["const"] for o in both.json_schema["anyOf"]] == ["get_weather", "get_time"]
    assert "parameters" in both.json_schema["anyOf"][1]["required"] and both.prefix == ""


def test_templates_get_object_arguments():
    msgs = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}]
    assert to_template_messages(msgs)[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == "{\"a\": 1}"  # the caller's copy is untouched
