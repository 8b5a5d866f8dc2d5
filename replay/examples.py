"""Training examples: the `Example` model and its content hash.

Contract:
- An example is one unit of training data. Its *kind* fixes the shape of `prompt`:
  ``chat`` -> a list of OpenAI-style messages ``[{"role": ..., "content": ...}]``, ``completion`` -> a string,
  ``document`` -> None (the whole text is in `answer`, for continued pretraining).
- Identity is content: ``content_hash`` is the SHA-256 of the canonical JSON of ``{kind, prompt, answer}``
  (sorted keys, no whitespace, UTF-8), and ``id`` is ``"ex_"`` + its first 16 hex digits. Where an example came
  from (`source`) and when (`created_at`) are not part of the hash, so teaching the same pair twice, or
  correcting two turns to the same answer, yields one example.
- `make_example` validates and normalises input and raises `ValueError` with a readable message on bad input.
  Chat messages are reduced to ``{"role", "content"}`` with string content (a list of OpenAI text parts is joined),
  plus OpenAI's tool-use keys (`tool_calls`, `tool_call_id`, `name`) when present: that is what a chat template
  consumes, and any other key would defeat deduplication.
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


def content_hash(kind: str, prompt: list[dict] | str | None, answer: str) -> str:
    """SHA-256 hex digest identifying an example's content (kind + prompt + answer)."""
    payload = canonical_json({"kind": kind, "prompt": prompt, "answer": answer})
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


class Example(BaseModel):
    """One training example, as stored and as handed to the trainer."""

    id: str
    kind: ExampleKind
    prompt: list[dict] | str | None
    answer: str
    source: ExampleSource
    created_at: str
    content_hash: str

    @model_validator(mode="after")
    def _check_consistent(self) -> "Example":
        shape = {"chat": list, "completion": str, "document": type(None)}[self.kind]
        if not isinstance(self.prompt, shape):
            raise ValueError(f"a {self.kind} example needs prompt of type {shape.__name__}")
        expected = content_hash(self.kind, self.prompt, self.answer)
        if self.content_hash != expected or self.id != example_id(expected):
            raise ValueError("example id/content_hash do not match its content")
        return self


def make_example(
    kind: str, prompt: list[dict] | str | None, answer: str, source: str, created_at: str | None = None
) -> Example:
    """Build a validated `Example`, normalising chat messages and computing its hash and id."""
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"unknown example kind {kind!r}; expected one of {', '.join(EXAMPLE_KINDS)}")
    if source not in EXAMPLE_SOURCES:
        raise ValueError(f"unknown example source {source!r}; expected one of {', '.join(EXAMPLE_SOURCES)}")
    if not isinstance(answer, str) or not answer.strip():
        what = "document text" if kind == "document" else "answer"
        raise ValueError(f"the {what} must be a non-empty string")
    if kind == "chat":
        prompt = normalise_messages(prompt)
    elif kind == "completion":
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("a completion prompt must be a non-empty string")
    elif prompt is not None:
        raise ValueError("a document example has no prompt")
    digest = content_hash(kind, prompt, answer)
    return Example(
        id=example_id(digest),
        kind=kind,  # type: ignore[arg-type]
        prompt=prompt,
        answer=answer,
        source=source,  # type: ignore[arg-type]
        created_at=created_at or utc_now(),
        content_hash=digest,
    )
