"""Training examples: the `Example` model and its content hash.

Contract:
- An example is one unit of training data. Its *kind* fixes the shape of `prompt`:
  ``chat`` -> a list of OpenAI-style messages ``[{"role": ..., "content": ...}]``, ``completion`` -> a string,
  ``document`` -> None (the whole text is in `answer`, for continued pretraining).
- Identity is content: ``content_hash`` is the SHA-256 of the canonical JSON of ``{kind, prompt, answer}``
  (sorted keys, no whitespace, UTF-8), plus ``tools`` and ``tool_calls`` only when the example has them (so every
  example without them keeps the id it always had), and ``id`` is ``"ex_"`` + its first 16 hex digits. Where an example came
  from (`source`) and when (`created_at`) are not part of the hash, so teaching the same pair twice, or
  correcting two turns to the same answer, yields one example.
- `make_example` validates and normalises input and raises `ValueError` with a readable message on bad input.
  Chat messages are reduced to ``{"role", "content"}`` with string content (a list of OpenAI text parts is joined),
  plus OpenAI's tool-use keys (`tool_calls`, `tool_call_id`, `name`) when present: that is what a chat template
  consumes, and any other key would defeat deduplication.
- A chat example may carry the OpenAI `tools` its prompt offered (rendered into the prompt by the chat template,
  as serving does) and an answer that calls tools: `tool_calls` (OpenAI shape, reduced to ``{"type": "function",
  "function": {"name", "arguments"}}``: call ids are random per response and would defeat deduplication; arguments
  a JSON object string, re-serialised compactly in the caller's key order) with `answer` the text before the calls
  (may be ""). `normalise_tool_calls` checks them against the offered tools and raises `ToolCallError` naming the
  field (``tool_calls.0.function.name``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, model_validator

ExampleKind = Literal["chat", "completion", "document"]
ExampleSource = Literal["teach", "correction", "rated_up", "document", "anchor"]

EXAMPLE_KINDS: tuple[str, ...] = ("chat", "completion", "document")
EXAMPLE_SOURCES: tuple[str, ...] = ("teach", "correction", "rated_up", "document", "anchor")


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (microseconds, explicit +00:00 offset)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no insignificant whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_hash(kind: str, prompt: list[dict] | str | None, answer: str, tools: list[dict] | None = None,
                 tool_calls: list[dict] | None = None) -> str:
    """SHA-256 hex digest identifying an example's content (kind + prompt + answer, + tools and tool calls when
    given)."""
    content: dict[str, Any] = {"kind": kind, "prompt": prompt, "answer": answer}
    if tools is not None:
        content["tools"] = tools
    if tool_calls is not None:
        content["tool_calls"] = tool_calls
    payload = canonical_json(content)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def example_id(hash_hex: str) -> str:
    return "ex_" + hash_hex[:16]


# Message keys kept besides role and content: OpenAI tool use (an assistant's `tool_calls`, a tool result's
# `tool_call_id` and the called function's `name`); chat templates that know tools render them. A user's or
# system's `name` (a participant label) is dropped: it does not change what should be learnt, and keeping it would
# defeat deduplication.
_KEPT_KEYS: dict[str, type] = {"tool_calls": list, "tool_call_id": str, "name": str}
_NAME_KEPT_FOR_ROLES = ("tool", "function")


def normalise_messages(messages: Any) -> list[dict]:
    """Validate OpenAI chat messages and reduce each to ``{"role": str, "content": str}`` plus, when present, the
    tool-use keys `tool_calls`, `tool_call_id` and (on a tool result) `name` (an assistant message with tool calls
    may have null content, stored as "").

    Content given as a list of parts keeps only text parts (joined without separator, as OpenAI renders them);
    any other part type (images, audio) cannot become training text and is rejected.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("a chat prompt must be a non-empty list of messages")
    out: list[dict] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} needs a non-empty string 'role'")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"message {i}: only text content parts can be used for training")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and message.get("tool_calls"):
            content = ""  # an assistant message that only calls tools
        if not isinstance(content, str):
            raise ValueError(f"message {i} needs string 'content'")
        reduced: dict = {"role": role, "content": content}
        for key, shape in _KEPT_KEYS.items():  # tool use survives; anything else would defeat deduplication
            if key == "name" and role not in _NAME_KEPT_FOR_ROLES:
                continue
            if message.get(key) is not None:
                if not isinstance(message[key], shape):
                    raise ValueError(f"message {i}: '{key}' must be a {shape.__name__}")
                reduced[key] = message[key]
        out.append(reduced)
    return out


class ToolCallError(ValueError):
    """Tools or tool calls that cannot be trained on; `param` names the field (``tool_calls.1.function.arguments``)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def normalise_tools(tools: Any) -> list[dict]:
    """OpenAI `tools` (``[{"type": "function", "function": {"name", ...}}]``), checked, as given."""
    if not isinstance(tools, list) or not tools:
        raise ToolCallError("tools", "must be a non-empty list of tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolCallError(f"tools.{i}", 'must be {"type": "function", "function": {"name": ..., ...}}')
    return tools


def normalise_tool_calls(calls: Any, tools: list[dict] | None) -> list[dict]:
    """OpenAI tool calls reduced to ``{"type": "function", "function": {"name", "arguments"}}``; each must name one
    of `tools` and give its arguments as a JSON object string. Raises `ToolCallError` naming the field."""
    if not tools:
        raise ToolCallError("tool_calls", "an answer that calls tools needs the tools that were offered ('tools')")
    if not isinstance(calls, list) or not calls:
        raise ToolCallError("tool_calls", "must be a non-empty list of tool calls")
    offered = {t["function"]["name"] for t in tools}
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise ToolCallError(f"tool_calls.{i}.function", 'must be {"name": ..., "arguments": "{...}"}')
        if fn.get("name") not in offered:
            raise ToolCallError(f"tool_calls.{i}.function.name", f"{fn.get('name')!r} is not one of the tools "
                                f"offered ({', '.join(sorted(offered))})")
        args = fn.get("arguments")
        try:
            parsed = json.loads(args) if isinstance(args, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ToolCallError(f"tool_calls.{i}.function.arguments", "must be a JSON object as a string, "
                                'e.g. "{\"city\": \"Paris\"}"')
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": json.dumps(
            parsed, ensure_ascii=False, separators=(", ", ": "), allow_nan=False)}})
    return out


class Example(BaseModel):
    """One training example, as stored and as handed to the trainer."""

    id: str
    kind: ExampleKind
    prompt: list[dict] | str | None
    answer: str
    source: ExampleSource
    created_at: str
    content_hash: str
    tools: list[dict] | None = None       # the OpenAI tools the prompt offered (chat only)
    tool_calls: list[dict] | None = None  # the answer's tool calls; `answer` is then the text before them

    @model_validator(mode="after")
    def _check_consistent(self) -> "Example":
        shape = {"chat": list, "completion": str, "document": type(None)}[self.kind]
        if not isinstance(self.prompt, shape):
            raise ValueError(f"a {self.kind} example needs prompt of type {shape.__name__}")
        if (self.tools is not None or self.tool_calls is not None) and self.kind != "chat":
            raise ValueError("only chat examples carry tools")
        expected = content_hash(self.kind, self.prompt, self.answer, self.tools, self.tool_calls)
        if self.content_hash != expected or self.id != example_id(expected):
            raise ValueError("example id/content_hash do not match its content")
        return self


def make_example(
    kind: str, prompt: list[dict] | str | None, answer: str, source: str, created_at: str | None = None,
    tools: list[dict] | None = None, tool_calls: list[dict] | None = None,
) -> Example:
    """Build a validated `Example`, normalising chat messages (and tools and tool calls) and computing its hash and
    id. Raises `ValueError` (`ToolCallError` for tools and tool calls) with a readable message."""
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"unknown example kind {kind!r}; expected one of {', '.join(EXAMPLE_KINDS)}")
    if source not in EXAMPLE_SOURCES:
        raise ValueError(f"unknown example source {source!r}; expected one of {', '.join(EXAMPLE_SOURCES)}")
    if (tools is not None or tool_calls is not None) and kind != "chat":
        raise ToolCallError("tools" if tools is not None else "tool_calls",
                            "only chat examples can offer or call tools")
    if tools is not None:
        tools = normalise_tools(tools)
    if tool_calls is not None:
        tool_calls = normalise_tool_calls(tool_calls, tools)
        if not isinstance(answer, str):
            raise ValueError("the answer's text must be a string (may be empty when it calls tools)")
    elif not isinstance(answer, str) or not answer.strip():
        what = "document text" if kind == "document" else "answer"
        raise ValueError(f"the {what} must be a non-empty string")
    if kind == "chat":
        prompt = normalise_messages(prompt)
    elif kind == "completion":
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("a completion prompt must be a non-empty string")
    elif prompt is not None:
        raise ValueError("a document example has no prompt")
    digest = content_hash(kind, prompt, answer, tools, tool_calls)
    return Example(
        id=example_id(digest),
        kind=kind,  # type: ignore[arg-type]
        prompt=prompt,
        answer=answer,
        source=source,  # type: ignore[arg-type]
        created_at=created_at or utc_now(),
        content_hash=digest,
        tools=tools,
        tool_calls=tool_calls,
    )
