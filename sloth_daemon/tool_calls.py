"""Tool calls: the format the served model writes them in, and its output turned back into OpenAI `tool_calls`.

Contract:
- `detect(tokenizer)` returns the model's `ToolFormat`, or None when its chat template does not render `tools`
  (a request with tools is then a 400: the model would never see them). Formats, in order:
  the tokenizer's own `response_template` (transformers' response parsing, shipped by newer model folders);
  `<tool_call>` in the chat template -> Hermes/Qwen style, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  (any number, after optional text); any other template that renders `tools` -> Llama-3 JSON style, the whole
  answer one `{"name": ..., "parameters": {...}}` object, optionally after `<|python_tag|>`.
- `ToolFormat.parse(text, tools)` returns `(content, calls)`: `content` the text outside calls (None when there is
  none), `calls` OpenAI tool calls `{"id": "call_…", "type": "function", "function": {"name", "arguments": JSON
  string}}`. Parsing is transformers' `parse_response` with the format's response template (arguments cast to the
  tool's parameter types); text that does not parse as a call, or names a tool that was not offered, stays content.
- `ToolFormat.guide(tools)` constrains generation to exactly one call of one of `tools` (pass one tool for a forced
  `tool_choice`), its arguments following the tool's `parameters` JSON schema (structured generation, the same
  `Guide` as JSON mode). Formats known only from a `response_template` cannot be forced (`can_force` is False).
- `check_answer_tools(tokenizer, tools, tool_calls)`: an answer that is taught or given as a correction may offer
  tools and call them only with a chat template that renders tools (`detect`), and only tools that were offered,
  arguments a JSON object string; raises `sloth_replay.ToolCallError` naming the field.
- `to_template_messages(messages)` gives chat templates what they expect: an assistant message's `tool_calls` with
  `arguments` as an object (OpenAI sends a JSON string).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from .engine.base import Guide

HERMES_TEMPLATE = {
    "start_anchor_pattern": r"\A",
    "fields": {
        "content": {"content": "text"},
        "tool_calls": {"open": "<tool_call>", "close": "</tool_call>", "content": "json", "repeats": True,
                       "transform": {"type": "function", "function": "{content}"}},
    },
}
LLAMA3_JSON_TEMPLATE = {
    "start_anchor_pattern": r"\A",
    "fields": {
        "tool_calls": {"open_pattern": r"\A\s*(?:<\|python_tag\|>)?(?=\{)", "content": "json", "repeats": True,
                       "transform": {"type": "function",
                                     "function": {"name": "{content.name}", "arguments": "{content.parameters}"}}},
        "content": {"content": "text"},
    },
}


@dataclass(frozen=True)
class ToolFormat:
    name: str  # "hermes", "llama3_json" or "model" (the tokenizer's response_template)
    response_template: dict
    prefix: str = ""  # literal text around one call, for a forced call's grammar
    suffix: str = ""
    arguments_key: str = "arguments"
    can_force: bool = True

    def guide(self, tools: list[dict]) -> Guide:
        options = []
        for tool in tools:
            fn = tool["function"]
            options.append({"type": "object", "properties": {
                "name": {"const": fn["name"]},
                self.arguments_key: fn.get("parameters") or {"type": "object"}},
                "required": ["name", self.arguments_key], "additionalProperties": False})
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return Guide(schema, prefix=self.prefix, suffix=self.suffix, param="tools")

    def parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
        from transformers.utils.chat_parsing import parse_response

        try:
            message = parse_response(text, self.response_template, prefix="", tools=tools)
        except (ValueError, KeyError):  # a call that is not valid JSON or lacks its keys: the text is content
            return text, []
        offered = {t["function"]["name"] for t in tools}
        calls = []
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or fn.get("name") not in offered:
                return text, []
            args = fn.get("arguments")
            if args is None:
                args = {}
            calls.append({"id": "call_" + secrets.token_hex(12), "type": "function", "function": {
                "name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args,
                                                                                            ensure_ascii=False)}})
        if not calls:
            return text, []
        content = message.get("content")
        return (content.strip() or None) if isinstance(content, str) else None, calls


@dataclass(frozen=True)
class ToolUse:
    """The tools of one chat request: `tools` in the OpenAI shape (passed to the chat template), `choice` "none",
    "auto", "required" or a tool's name (forced), `parallel`: whether more than one call may be returned."""

    format: ToolFormat
    tools: list[dict]
    choice: str = "auto"
    parallel: bool = True

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        content, calls = self.format.parse(text, self.tools)
        return content, calls if self.parallel else calls[:1]


HERMES = ToolFormat("hermes", HERMES_TEMPLATE, prefix="<tool_call>\n", suffix="\n</tool_call>")
LLAMA3_JSON = ToolFormat("llama3_json", LLAMA3_JSON_TEMPLATE, arguments_key="parameters")


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the "tool_use" one renders tools
        template = template.get("tool_use") or template.get("default") or ""
    return template or ""


def detect(tokenizer: Any) -> ToolFormat | None:
    """The served model's tool-call format; see the module docstring."""
    template = _template_text(tokenizer)
    if "tools" not in template:
        return None
    own = getattr(tokenizer, "response_template", None)
    if isinstance(own, dict) and "tool_calls" in (own.get("fields") or {}):
        return ToolFormat("model", own, can_force="<tool_call>" in template,
                          prefix=HERMES.prefix, suffix=HERMES.suffix)
    if "<tool_call>" in template:
        return HERMES
    return LLAMA3_JSON


def check_answer_tools(tokenizer: Any, tools: list[dict] | None, tool_calls: list[dict] | None) -> None:
    """See the module docstring."""
    from sloth_replay.examples import ToolCallError, normalise_tool_calls

    if tools is None and tool_calls is None:
        return
    if detect(tokenizer) is None:
        param = "tools" if tools is not None else "tool_calls"
        raise ToolCallError(param, "the model's chat template does not render tools, so it cannot learn to call "
                                   "them (set a tool-aware chat template for this model)")
    if tool_calls is not None:
        normalise_tool_calls(tool_calls, tools)


def to_template_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_call_for_template(c) for c in calls]}
        out.append(m)
    return out


def _call_for_template(call: dict) -> dict:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            pass  # not JSON: the template gets the string as sent
    return {**call, "function": fn}
