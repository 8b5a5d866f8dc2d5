"""Dataset rows in the formats people fine-tune with, turned into training examples, validated row by row.

Formats (one JSON object per line, JSONL; `detect` picks one from the row's keys, or the caller names it):
- `openai`: OpenAI chat fine-tuning rows, `{"messages": [{"role", "content", ...}, ...]}` (platform.openai.com/docs/
  guides/fine-tuning). The last message must be the assistant's answer: text, or `tool_calls` (content may then be
  null or text before the calls) of the row's `tools` (OpenAI shape), which the prompt offers (rendered by the chat
  template as serving does); everything before it is the prompt, tool calls included: an assistant message may
  carry `tool_calls` and a `tool` message its `tool_call_id`. Other row keys (`weight`, `parallel_tool_calls`) are
  ignored.
- `sharegpt`: `{"conversations": [{"from": "system"|"human"|"gpt"|..., "value": str}]}` (the ShareGPT/Vicuna
  layout Unsloth and axolotl read): `human`/`user` -> user, `gpt`/`assistant` -> assistant, `system`, and
  `tool`/`observation` -> tool; the last turn must be `gpt`.
- `alpaca`: `{"instruction": str, "input": str (optional), "output": str}` (tatsu-lab/stanford_alpaca): one user
  message, the instruction then a blank line and the input when there is one; the output is the answer.
- `completion`: `{"prompt": str, "completion": str}` (OpenAI's legacy completion fine-tuning rows): a raw-text
  prompt and its continuation, trained without a chat template.
- `text`: `{"text": str}` rows, or a whole plain-text file: documents for continued pretraining (split into chunks
  that fit `train.max_seq_len` by `chunking.split_document`, never cut).

`parse_row(obj, fmt, line)` returns a `Row` (`kind` chat/completion/document, `prompt`, `answer`, and for OpenAI
rows with tools `tools` and the answer's `tool_calls`) or raises `RowError` whose
`line` and `field` (dotted, e.g. `messages.2.role`) say where; its message names both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Literal

FORMATS = ("openai", "sharegpt", "alpaca", "completion", "text")
Format = Literal["auto", "openai", "sharegpt", "alpaca", "completion", "text"]

ROLES = ("system", "user", "assistant", "tool", "developer")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_response": "tool"}


class RowError(ValueError):
    """A row that cannot become a training example; `line` (1-based) and `field` say where."""

    def __init__(self, line: int, field: str | None, message: str):
        self.line, self.field, self.reason = line, field, message
        where = f"line {line}" + (f", field {field}" if field else "")
        super().__init__(f"{where}: {message}")

    def to_json(self) -> dict:
        return {"line": self.line, "field": self.field, "message": self.reason}


@dataclass(frozen=True)
class Row:
    """One training example read from a dataset row: kind `chat` (prompt = messages), `completion` (prompt = text)
    or `document` (no prompt)."""

    line: int
    kind: Literal["chat", "completion", "document"]
    prompt: list[dict] | str | None
    answer: str
    tools: list[dict] | None = None       # OpenAI tools the prompt offers (openai rows with `tools`)
    tool_calls: list[dict] | None = None  # the answer's tool calls (`answer` is then the text before them)


def detect(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "openai"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "completion" in obj:
        return "completion"
    if "text" in obj:
        return "text"
    return None


def _text(value: Any, line: int, field: str, *, allow_empty: bool = False) -> str:
    if value is None:
        raise RowError(line, field, "is missing")
    if not isinstance(value, str):
        raise RowError(line, field, f"must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(line, field, "must not be empty")
    return value


def _content(value: Any, line: int, field: str) -> str:
    """OpenAI message content: a string, or a list of text parts (joined, as OpenAI renders them)."""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RowError(line, f"{field}.{j}", "only text content parts can be trained on")
            texts.append(part["text"])
        return "".join(texts)
    return _text(value, line, field, allow_empty=True)


def _objects(value: Any, line: int, field: str, what: str) -> Iterator[tuple[int, str, dict]]:
    """(index, dotted field, object) for each item of a non-empty list of JSON objects."""
    if not isinstance(value, list) or not value:
        raise RowError(line, field, f"must be a non-empty list of {what}")
    for j, item in enumerate(value):
        if not isinstance(item, dict):
            raise RowError(line, f"{field}.{j}", f"must be an object ({what})")
        yield j, f"{field}.{j}", item


def _tool_calls(value: Any, line: int, field: str) -> list[dict]:
    calls = []
    for j, f, call in _objects(value, line, field, "tool calls"):
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(line, f"{f}.function.name", "must be a non-empty string")
        args = fn.get("arguments", "")
        if not isinstance(args, str):  # OpenAI sends the arguments as a JSON string
            args = json.dumps(args, ensure_ascii=False)
        calls.append({"id": _text(call.get("id", f"call_{j}"), line, f"{f}.id"), "type": "function",
                      "function": {"name": fn["name"], "arguments": args}})
    return calls


def _openai_messages(messages: Any, line: int, field: str = "messages") -> list[dict]:
    out = []
    for _i, f, m in _objects(messages, line, field, "messages with 'role' and 'content'"):
        role = m.get("role")
        if role not in ROLES:
            raise RowError(line, f"{f}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        msg: dict[str, Any] = {"role": role}
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["content"] = "" if m.get("content") is None else _content(m["content"], line, f"{f}.content")
            msg["tool_calls"] = _tool_calls(m["tool_calls"], line, f"{f}.tool_calls")
        else:
            if "content" not in m:
                raise RowError(line, f"{f}.content", "is missing")
            msg["content"] = _content(m["content"], line, f"{f}.content")
        if role == "tool":
            msg["tool_call_id"] = _text(m.get("tool_call_id"), line, f"{f}.tool_call_id")
        if isinstance(m.get("name"), str) and m["name"]:
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _tools(value: Any, line: int) -> list[dict] | None:
    if value is None:
        return None
    for _j, f, tool in _objects(value, line, "tools", "tools"):
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(line, f"{f}.function.name", "must be a non-empty string")
    return value


def _chat_row(messages: list[dict], line: int, field: str, tools: list[dict] | None = None) -> Row:
    last = messages[-1]
    where = f"{field}.{len(messages) - 1}"
    if last["role"] != "assistant":
        raise RowError(line, f"{where}.role", "the last message must be the assistant's answer")
    if last.get("tool_calls") and not tools:
        raise RowError(line, f"{where}.tool_calls", "an answer that calls tools needs the row's 'tools'")
    if not last.get("tool_calls") and not last["content"].strip():
        raise RowError(line, f"{where}.content", "the answer must not be empty")
    if len(messages) < 2:
        raise RowError(line, field, "needs at least one message before the assistant's answer")
    return Row(line, "chat", messages[:-1], last["content"], tools, last.get("tool_calls"))


def parse_row(obj: Any, fmt: str, line: int) -> Row:
    """One dataset row as a training example (see the module docstring); `fmt` "auto" detects it per row."""
    if not isinstance(obj, dict):
        raise RowError(line, None, f"must be a JSON object, not {type(obj).__name__}")
    if fmt == "auto":
        fmt = detect(obj) or ""
        if not fmt:
            raise RowError(line, None, "unknown row format: expected 'messages' (OpenAI chat), 'conversations' "
                           "(ShareGPT), 'instruction'/'output' (Alpaca), 'prompt'/'completion' or 'text'")
    if fmt == "openai":
        return _chat_row(_openai_messages(obj.get("messages"), line), line, "messages", _tools(obj.get("tools"), line))
    if fmt == "sharegpt":
        messages = []
        for _i, f, t in _objects(obj.get("conversations"), line, "conversations", "turns with 'from' and 'value'"):
            role = SHAREGPT_ROLES.get(t.get("from"))
            if role is None:
                raise RowError(line, f"{f}.from", f"must be one of {', '.join(SHAREGPT_ROLES)}, not {t.get('from')!r}")
            messages.append({"role": role, "content": _text(t.get("value"), line, f"{f}.value", allow_empty=True)})
        return _chat_row(messages, line, "conversations")
    if fmt == "alpaca":
        instruction = _text(obj.get("instruction"), line, "instruction")
        extra = obj.get("input") or ""
        extra = _text(extra, line, "input", allow_empty=True)
        output = _text(obj.get("output"), line, "output")
        prompt = instruction + ("\n\n" + extra if extra.strip() else "")
        return Row(line, "chat", [{"role": "user", "content": prompt}], output)
    if fmt == "completion":
        return Row(line, "completion", _text(obj.get("prompt"), line, "prompt"),
                   _text(obj.get("completion"), line, "completion"))
    if fmt == "text":
        return Row(line, "document", None, _text(obj.get("text"), line, "text"))
    raise RowError(line, None, f"unknown format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")


def read_jsonl(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; a line that is not JSON gives a `RowError`-carrying
    tuple `(line, RowError)` so the caller can collect every error in one pass."""
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw)
        except json.JSONDecodeError as e:
            yield n, RowError(n, None, f"not valid JSON ({e.msg} at column {e.colno})")
