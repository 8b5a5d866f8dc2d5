"""Splitting a long document into chunks that each fit one training sequence, so nothing is silently cut.

Contract: `split_document(tokenizer, text, max_tokens)` returns slices of `text`, in order, whose concatenation is
exactly `text`, each encoding (without special tokens) to at most `max_tokens` tokens. A chunk ends at the last
paragraph break, else line break, else sentence end, else whitespace within its second half, else at a token
boundary. `max_tokens` is `train.max_seq_len - 1`: the trainer adds the end-of-text token to each document.
Needs a fast (Rust) tokenizer for character offsets; every Hugging Face model folder has one or can make one.
"""

from __future__ import annotations

import re
from typing import Any

_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"[.!?]\s"), re.compile(r"\s"))


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cut(text: str, start: int, hard_end: int) -> int:
    """Where to end the chunk text[start:hard_end]: a natural break in its second half, else hard_end."""
    floor = start + (hard_end - start) // 2
    for pattern in _BREAKS:
        ends = [m.end() for m in pattern.finditer(text, floor, hard_end)]
        if ends:
            return ends[-1]
    return hard_end


def split_document(tokenizer: Any, text: str, max_tokens: int) -> list[str]:
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if _count(tokenizer, text) <= max_tokens:
        return [text]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    chunks, start, i = [], 0, 0
    while start < len(text):
        # The first token that starts at or after `start`, then max_tokens tokens on.
        while i < len(offsets) and offsets[i][0] < start:
            i += 1
        j = min(i + max_tokens, len(offsets))
        hard_end = len(text) if j >= len(offsets) else offsets[j][0]
        end = _cut(text, start, hard_end) if hard_end < len(text) else hard_end
        if end <= start:
            end = max(hard_end, start + 1)
        # A slice can tokenize differently from the same span inside the whole text; shrink until it fits.
        while end - start > 1 and _count(tokenizer, text[start:end]) > max_tokens:
            end = start + max(1, (end - start) * 9 // 10)
        chunks.append(text[start:end])
        start = end
    return chunks
