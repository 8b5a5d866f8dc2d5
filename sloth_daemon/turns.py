"""One served turn, front-end agnostic: generate through the engine with the current adapter, then log it.

Contract: `TurnService.run(kind, prompt, params, store=..., transport=...)` yields `TextDelta`s and ends with one
`TurnDone`. The turn's id (`chatcmpl-…` / `cmpl-…`) is the replay-store interaction id clients send feedback for.
A finished turn is logged exactly once, unless `store=False` (the OpenAI API's own flag) or it was cancelled
(the client went away: no answer was delivered, so there is nothing to learn from).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from sloth_replay import ReplayStore

from .engine.base import Engine, Finished, GenerationRequest, Prompt, SamplingParams, TextDelta


@dataclass(frozen=True)
class TurnDone:
    id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str | None
    logged: bool


def new_turn_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


class TurnService:
    def __init__(self, engine: Engine, store: ReplayStore, model_name: str):
        self.engine = engine
        self.store = store
        self.model_name = model_name

    def validate(self, kind: Literal["chat", "completion"], prompt: Prompt, params: SamplingParams) -> None:
        self.engine.validate(GenerationRequest(kind, prompt, params))

    async def run(self, kind: Literal["chat", "completion"], prompt: Prompt, params: SamplingParams, *,
                  store: bool = True, transport: str = "http", turn_id: str | None = None
                  ) -> AsyncIterator[TextDelta | TurnDone]:
        turn_id = turn_id or new_turn_id(kind)
        t0 = time.monotonic()
        ttft = None
        stream = self.engine.generate(GenerationRequest(kind, prompt, params))
        async with contextlib.aclosing(stream):
            async for ev in stream:
                if isinstance(ev, TextDelta):
                    if ttft is None:
                        ttft = (time.monotonic() - t0) * 1000
                    yield ev
                    continue
                assert isinstance(ev, Finished)
                logged = store and ev.finish_reason != "cancelled"
                if logged:
                    self.store.log_interaction(
                        id=turn_id, kind=kind, prompt=prompt, response=ev.text, model=self.model_name,
                        adapter_version=ev.adapter_version, prompt_tokens=ev.prompt_tokens,
                        completion_tokens=ev.completion_tokens, latency_ms=(time.monotonic() - t0) * 1000,
                        ttft_ms=ttft, finish_reason=ev.finish_reason,
                        params={"max_tokens": params.max_tokens, "temperature": params.temperature,
                                "top_p": params.top_p, "stop": list(params.stop), "seed": params.seed},
                        transport=transport,
                    )
                yield TurnDone(turn_id, ev.text, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens,
                               ev.adapter_version, logged)
                return
