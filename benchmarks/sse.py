"""Reading a streamed (SSE) OpenAI chat completion in the HTTP benchmarks (`bench_serving`, `bench_loop`).

Contract: `iter_sse_chunks(response)` yields each `data: {...}` event of an `httpx` streaming response, parsed, in
order (other lines and the closing `data: [DONE]` skipped); the caller reads its own clock as each chunk arrives.
`has_text(chunk)` says whether a chunk carries generated text, the moment time to first token is taken.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator


async def iter_sse_chunks(response: Any) -> AsyncIterator[dict]:
    """The JSON chunks of an `httpx.Response` opened with `client.stream(...)`; raises `json.JSONDecodeError` on a
    malformed event (a benchmark should stop there, not count it)."""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def has_text(chunk: dict) -> bool:
    """Whether any choice of the chunk has non-empty `delta.content`."""
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices", []))
