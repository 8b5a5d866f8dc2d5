"""Size limits on what is taught, and long documents split into chunks that fit one training row.

Contract:
- `check_teach(body, limits)` / `check_feedback(body, limits)` raise `TooLarge` (the operations answer it with
  HTTP 413) naming the field (`examples.2.answer`, `documents.0`, `correction`) when a taught prompt, answer,
  correction or document is longer than `limits.max_prompt_chars` / `max_answer_chars` / `max_document_chars`
  (characters). Nothing is stored then.
- `split_document(tokenizer, text, max_tokens)` returns the document as consecutive chunks whose tokens (plus the
  end-of-text token each trained document gets) fit `max_tokens`, so no part of it is cut off silently at training
  time. Chunks end at a paragraph, line or sentence break (else a space) when one lies in the second half of the
  window, and together they hold the whole text. Tokenizers without offset mappings fall back to decoding the
  token windows.
Why our own code: transformers' `return_overflowing_tokens` windows cut anywhere and need a fast tokenizer; a
document must come back whole, split at readable places.
"""

from __future__ import annotations

from typing import Any

from .api.schemas import FeedbackRequest, TeachRequest
from .config import LimitsConfig

_BREAKS = ("\n\n", "\n", ". ", "! ", "? ", " ")


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


def check_teach(body: TeachRequest, limits: LimitsConfig) -> None:
    for i, pair in enumerate(body.examples):
        if (n := _prompt_chars(pair.prompt)) > limits.max_prompt_chars:
            raise _too_long("prompt", f"examples.{i}.prompt", n, limits.max_prompt_chars, "max_prompt_chars")
        if (n := len(pair.answer)) > limits.max_answer_chars:
            raise _too_long("answer", f"examples.{i}.answer", n, limits.max_answer_chars, "max_answer_chars")
    for i, doc in enumerate(body.documents):
        if (n := len(doc)) > limits.max_document_chars:
            raise _too_long("document", f"documents.{i}", n, limits.max_document_chars, "max_document_chars")


def check_feedback(body: FeedbackRequest, limits: LimitsConfig) -> None:
    if body.correction is not None and (n := len(body.correction)) > limits.max_answer_chars:
        raise _too_long("correction", "correction", n, limits.max_answer_chars, "max_answer_chars")


def _cut(text: str, start: int, end: int) -> int:
    """Where to end a chunk spanning text[start:end]: after the last break in its second half, else at `end`."""
    floor = start + (end - start) // 2
    for brk in _BREAKS:
        at = text.rfind(brk, floor, end)
        if at > start:
            return at + len(brk)
    return end


def split_document(tokenizer: Any, text: str, max_tokens: int) -> list[str]:
    """Consecutive chunks of `text`, each at most `max_tokens - 1` tokens; see the module docstring."""
    room = max(1, max_tokens - 1)  # one token for the end-of-text marker that training appends
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=getattr(tokenizer, "is_fast", False))
    ids = enc["input_ids"]
    if len(ids) <= room:
        return [text]
    offsets = enc.get("offset_mapping")
    if not offsets:
        return [tokenizer.decode(ids[i : i + room]) for i in range(0, len(ids), room)]
    chunks, start, tok = [], 0, 0
    while tok < len(ids):
        last = min(tok + room, len(ids)) - 1
        end = len(text) if last == len(ids) - 1 else _cut(text, start, offsets[last][1])
        chunks.append(text[start:end])
        start = end
        while tok < len(ids) and offsets[tok][1] <= end:
            tok += 1
    if start < len(text):
        chunks[-1] += text[start:]
    # Tokens can merge differently at a chunk's edges than inside the whole text: halve any chunk that grew.
    out: list[str] = []
    for chunk in (c for c in chunks if c):
        if len(tokenizer(chunk, add_special_tokens=False)["input_ids"]) <= room or len(chunk) < 2:
            out.append(chunk)
        else:
            mid = len(chunk) // 2
            out.extend(split_document(tokenizer, chunk[:mid], max_tokens) + split_document(tokenizer, chunk[mid:],
                                                                                           max_tokens))
    return out
