"""Structured generation for the embedded engine: a request's `Guide` as an xgrammar grammar and a transformers
`LogitsProcessor` that masks every token the grammar does not allow.

Contract:
- `GuideCompiler(tokenizer, vocab_size, eos_ids)` builds xgrammar's tokenizer info once (the end-of-sequence ids are
  the grammar's stop tokens: the model may stop only where the grammar is complete).
- `check(guide)` compiles (cached per guide) and raises `InvalidParam` naming `guide.param` for a schema xgrammar
  cannot take; `processor(guide)` returns a fresh single-use `xgrammar.contrib.hf.LogitsProcessor` for one choice.
- A `Guide` with `json_schema=None` allows any JSON object (OpenAI's `json_object`); `prefix`/`suffix` are literal
  text around the JSON value (a forced tool call in the model's own call format).

Library choice, measured by `benchmarks/bench_json_mode.py` on sloth-tiny's byte-level vocabulary (results in
`benchmarks/results/json_mode.json` and the README): xgrammar (the default backend of vLLM's guided decoding, so
both engines constrain alike) builds for the tokenizer, compiles a schema in ~0.08 s (cached after) and adds ~1 ms
per token on CPU; llguidance ~100 ms per token on this CPU; lm-format-enforcer's transformers integration does not
import under transformers 5.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from .base import Guide, InvalidParam

ANY_OBJECT = {"type": "object"}


class GuideCompiler:
    """See the module docstring."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_ids))
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _compile(self, guide: Guide) -> Any:
        key = json.dumps([guide.json_schema, guide.prefix, guide.suffix], sort_keys=True)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        xgr = self._xgr
        schema = json.dumps(guide.json_schema if guide.json_schema is not None else ANY_OBJECT)
        try:
            if guide.prefix or guide.suffix:
                parts = [xgr.Grammar.from_json_schema(schema, any_whitespace=False)]
                if guide.prefix:
                    parts.insert(0, xgr.Grammar.from_ebnf(f"root ::= {json.dumps(guide.prefix)}"))
                if guide.suffix:
                    parts.append(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(guide.suffix)}"))
                compiled = self._compiler.compile_grammar(xgr.Grammar.concat(*parts))
            else:
                compiled = self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise InvalidParam(guide.param, f"{guide.param}: the JSON schema cannot be used for structured "
                                            f"generation: {e}") from None
        with self._lock:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = compiled
        return compiled

    def check(self, guide: Guide) -> None:
        self._compile(guide)

    def processor(self, guide: Guide) -> Any:
        return self._xgr.contrib.hf.LogitsProcessor(self._compile(guide))
