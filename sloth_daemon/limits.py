"""Size limits on what is taught.

Contract:
- `check_teach(body, limits)` / `check_feedback(body, limits)` raise `TooLarge` (the operations answer it with
  HTTP 413) naming the field (`examples.2.answer`, `documents.0`, `correction`) when a taught prompt, answer,
  correction or document is longer than `limits.max_prompt_chars` / `max_answer_chars` / `max_document_chars`
  (characters). Nothing is stored then.
A document within its limit but longer than one training row is split, never cut: `dataio.chunking.split_document`
(teach and import share it).
"""

from __future__ import annotations

from typing import Any

from .api.schemas import FeedbackRequest, TeachRequest
from .config import LimitsConfig


class TooLarge(ValueError):
    """A field over its size limit; `param` is the field's dotted name."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _too_long(what: str, param: str, n: int, limit: int, key: str) -> TooLarge:
    return TooLarge(f"{param}: the {what} is {n} characters; the limit is {limit} (limits.{key})", param)


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m.content if hasattr(m, "content") else m["content"]) for m in prompt)


def _calls_chars(calls: list | None) -> int:
    """An answer's tool calls count towards its length: their names and arguments."""
    return sum(len(c.function.name) + len(c.function.arguments) for c in calls or ())


def check_teach(body: TeachRequest, limits: LimitsConfig) -> None:
    for i, pair in enumerate(body.examples):
        if (n := _prompt_chars(pair.prompt)) > limits.max_prompt_chars:
            raise _too_long("prompt", f"examples.{i}.prompt", n, limits.max_prompt_chars, "max_prompt_chars")
        if (n := len(pair.answer_text) + _calls_chars(pair.tool_calls)) > limits.max_answer_chars:
            raise _too_long("answer", f"examples.{i}.answer", n, limits.max_answer_chars, "max_answer_chars")
    for i, doc in enumerate(body.documents):
        if (n := len(doc)) > limits.max_document_chars:
            raise _too_long("document", f"documents.{i}", n, limits.max_document_chars, "max_document_chars")


def check_feedback(body: FeedbackRequest, limits: LimitsConfig) -> None:
    n = len(body.correction or "") + _calls_chars(body.tool_calls)
    if n > limits.max_answer_chars:
        raise _too_long("correction", "correction", n, limits.max_answer_chars, "max_answer_chars")
