"""One served turn, front-end agnostic: generate through the engine with the current adapter, then log it.

Contract: `TurnService.run(kind, prompt, params, store=..., transport=...)` yields `TextDelta`s (each with its
choice's `index`) and ends with one `TurnDone` holding every choice (`n` of them) and the summed usage. The turn's
id (`chatcmpl-…` / `cmpl-…`) is the replay-store interaction id clients send feedback for.
With tools (`tool_use`, unless its choice is "none") each choice's text is parsed for tool calls in the model's
format (`tool_calls.py`), or taken from the engine when it parsed them itself (`Finished.tool_calls`: vLLM's own
parsers): a choice with calls has `tool_calls`, `content` the text outside them and finish reason `tool_calls`.
Its text is not streamed as it comes (it may be a call): it arrives whole in the `TurnDone`.
What is logged keeps what learning needs: the tools offered, the tool choice, the calls made, the response format
(`interactions.params`), and the prompt messages with their tool calls and tool results.
A finished turn is logged exactly once, unless `store=False` (the OpenAI API's own flag) or it was cancelled
(the client went away: no answer was delivered, so there is nothing to learn from). Logging runs on the store
worker's thread; when the store cannot take the turn now it is journaled (`TurnDone.journaled`) and logged later,
and `TurnDone.logged` is True only once the row is committed.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Literal

from .engine.base import Engine, Finished, GenerationRequest, Prompt, SamplingParams, TextDelta, TokenLogprob
from .tool_calls import ToolFormat, ToolUse, detect

if TYPE_CHECKING:
    from .store_worker import StoreWorker


@dataclass(frozen=True)
class Choice:
    """One choice: `text` as generated; `content` and `tool_calls` the message a client gets (tool calls parsed)."""

    index: int
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[dict, ...] = ()
    content: str | None = None

    @property
    def message_content(self) -> str | None:
        return self.content if self.tool_calls else self.text


@dataclass(frozen=True)
class TurnDone:
    """A finished turn: `text` and `finish_reason` are choice 0's; `completion_tokens` counts all choices."""

    id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str | None
    logged: bool
    choices: tuple[Choice, ...] = ()
    journaled: bool = False  # answered, not in the store yet: the journal holds it until the store takes it


def new_turn_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


class TurnService:
    def __init__(self, engine: Engine, store: "StoreWorker", model_name: str):
        self.engine = engine
        self.store = store
        self.model_name = model_name
        self._tool_format: ToolFormat | None | bool = False  # False: not looked at yet

    @property
    def tool_format(self) -> ToolFormat | None:
        """How the served model writes tool calls (None: its template does not render tools)."""
        if self._tool_format is False:
            self._tool_format = detect(self.engine.tokenizer)
        return self._tool_format  # type: ignore[return-value]

    def prepare(self, kind: Literal["chat", "completion"], prompt: Prompt, params: SamplingParams,
                tool_use: ToolUse | None = None) -> GenerationRequest:
        """The engine's checks and the prompt tokenised once (`Engine.prepare`; CPU work: call it in a worker
        thread); raises what `Engine.prepare` raises."""
        return self.engine.prepare(GenerationRequest(kind, prompt, params, tool_use.tools if tool_use else None))

    async def run(self, kind: Literal["chat", "completion"], prompt: Prompt, params: SamplingParams, *,
                  store: bool = True, transport: str = "http", turn_id: str | None = None,
                  tool_use: ToolUse | None = None, prompt_ids: tuple[int, ...] | None = None
                  ) -> AsyncIterator[TextDelta | TurnDone]:
        turn_id = turn_id or new_turn_id(kind)
        t0 = time.monotonic()
        ttft = None
        parse = tool_use is not None and tool_use.parses
        stream = self.engine.generate(GenerationRequest(
            kind, prompt, params, tool_use.tools if tool_use else None, prompt_ids,
            tool_use.choice if parse else None, tool_use.parallel if tool_use else True))
        finished: dict[int, Finished] = {}
        async with contextlib.aclosing(stream):
            async for ev in stream:
                if isinstance(ev, TextDelta):
                    if ttft is None:
                        ttft = (time.monotonic() - t0) * 1000
                    if not parse:
                        yield ev
                    continue
                assert isinstance(ev, Finished)
                finished[ev.index] = ev
                if ev.finish_reason == "cancelled" or len(finished) == params.n:
                    break
        first = finished[0]
        choices = tuple(_choice(f, tool_use if parse else None) for f in sorted(finished.values(),
                                                                                key=lambda f: f.index))
        completion_tokens = sum(f.completion_tokens for f in finished.values())
        outcome = None
        if store and all(c.finish_reason != "cancelled" for c in choices) and len(choices) == params.n:
            outcome = await self.store.log_turn(dict(
                id=turn_id, kind=kind, prompt=prompt, response=first.text, model=self.model_name,
                adapter_version=first.adapter_version, prompt_tokens=first.prompt_tokens,
                completion_tokens=completion_tokens, latency_ms=(time.monotonic() - t0) * 1000,
                ttft_ms=ttft, finish_reason=choices[0].finish_reason,
                params=logged_params(params, choices, tool_use),
                transport=transport,
            ))
        yield TurnDone(turn_id, first.text, choices[0].finish_reason, first.prompt_tokens, completion_tokens,
                       first.adapter_version, outcome == "logged", choices, outcome == "journaled")


def _choice(f: Finished, tool_use: ToolUse | None) -> Choice:
    if tool_use is None or f.finish_reason == "cancelled":
        return Choice(f.index, f.text, f.finish_reason, f.logprobs)
    if f.tool_calls is not None:  # the engine parsed them itself (vLLM's own tool parser)
        content, calls = f.content, list(f.tool_calls)
    else:
        content, calls = tool_use.parse(f.text)
    if not calls:
        return Choice(f.index, f.text, f.finish_reason, f.logprobs)
    return Choice(f.index, f.text, "tool_calls", f.logprobs, tuple(calls), content)


def logged_params(params: SamplingParams, choices: tuple[Choice, ...], tool_use: ToolUse | None = None) -> dict:
    """The request fields that shaped the answer, as the replay store keeps them (`interactions.params`); when
    choice 0 called tools, its `tool_calls` and `content` (the text outside them: what a thumbs-up teaches); the
    other choices' texts when n > 1 (the response column holds choice 0's raw text)."""
    out: dict = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                 "stop": list(params.stop), "seed": params.seed}
    if params.presence_penalty or params.frequency_penalty:
        out.update(presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)
    if params.logit_bias:
        out["logit_bias"] = {str(k): v for k, v in params.logit_bias}
    if params.guide is not None and params.guide.param == "response_format":
        g = params.guide
        out["response_format"] = ({"type": "json_object"} if g.json_schema is None else
                                  {"type": "json_schema", "json_schema": {"schema": g.json_schema}})
    if tool_use is not None:
        out.update(tools=tool_use.tools, tool_choice=tool_use.choice, parallel_tool_calls=tool_use.parallel,
                   tool_call_format=tool_use.format.name)
        if choices[0].tool_calls:  # the message the client got: its calls and the text outside them
            out.update(tool_calls=list(choices[0].tool_calls), content=choices[0].content)
    if params.n > 1:
        out["n"] = params.n
        out["choices"] = [{"text": c.text, "finish_reason": c.finish_reason, "tool_calls": list(c.tool_calls)}
                          for c in choices[1:]]
    return out
