"""Token logprobs in the OpenAI shapes' terms: each token's text and UTF-8 bytes, for any Hugging Face tokenizer.

Contract:
- `TokenTexts(tokenizer)` maps a token id to `(text, bytes)`: `bytes` are the token's own bytes (a byte-level BPE
  token that holds half of a UTF-8 character has those bytes; its `text` is what the tokenizer decodes it to, as the
  OpenAI API does); results are cached per id.
- `token_logprob(texts, token_id, logprob, top)` builds one `TokenLogprob` (top: `(id, logprob)` pairs, most likely
  first).
- `chat_logprobs(tokens)` and `completion_logprobs(tokens)` render a choice's logprobs as the chat API's
  `{"content": [...], "refusal": None}` and the completions API's `{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}` objects.

Byte recovery: byte-level vocabularies (GPT-2 style) map each byte to one printable character
(`transformers.convert_slow_tokenizer.bytes_to_unicode`, the tokenizers library's ByteLevel alphabet);
SentencePiece byte-fallback tokens are written `<0xHH>`; any other token's bytes are its decoded text's UTF-8.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable

from .base import TokenLogprob, TopLogprob

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), cached. See the module docstring."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:  # an id past the tokenizer's vocabulary (padding rows of the embedding)
            return "", ()
        if token_id in self._special:
            return piece, tuple(piece.encode("utf-8"))
        text = self._tokenizer.decode([token_id])
        if self._byte_level:
            decoder = _byte_decoder()
            if all(c in decoder for c in piece):
                return text, tuple(decoder[c] for c in piece)
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return text, (int(m.group(1), 16),)
        return text, tuple(text.encode("utf-8"))


def token_logprob(texts: TokenTexts, token_id: int, logprob: float, top: Iterable[tuple[int, float]] = (),
                  text_offset: int = 0) -> TokenLogprob:
    text, raw = texts(token_id)
    alts = tuple(TopLogprob(*texts(i), lp) for i, lp in top)
    return TokenLogprob(text, raw, logprob, alts, text_offset)


def _clean(logprob: float) -> float:
    # JSON has no -inf: a token the model gives probability 0 (masked) is reported at float32's lowest logprob.
    return logprob if logprob > -9999.0 else -9999.0


def chat_logprobs(tokens: Iterable[TokenLogprob]) -> dict:
    """The chat API's `choice.logprobs` (and a streamed chunk's)."""
    return {"content": [
        {"token": t.token, "logprob": _clean(t.logprob), "bytes": list(t.bytes),
         "top_logprobs": [{"token": a.token, "logprob": _clean(a.logprob), "bytes": list(a.bytes)} for a in t.top]}
        for t in tokens], "refusal": None}


def completion_logprobs(tokens: Iterable[TokenLogprob]) -> dict:
    """The completions API's `choice.logprobs`: parallel lists; `top_logprobs` maps token text to logprob."""
    tokens = list(tokens)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [_clean(t.logprob) for t in tokens],
            "top_logprobs": [{a.token: _clean(a.logprob) for a in t.top} for t in tokens],
            "text_offset": [t.text_offset for t in tokens]}
