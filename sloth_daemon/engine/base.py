"""The engine interface: what the daemon needs from whatever generates text (embedded transformers+peft, or vLLM).

Contract (both engines pass `tests/engine_contract.py`):
- `generate(request)` pins the adapter version that is current *at the call* and streams `TextDelta` events then
  one `Finished` per choice (or raises `EngineError`). Requests are never interleaved into each other's output.
- `swap_adapter(version, path)` loads the adapter under a name unique to that version, confirms the engine really
  applies it (`probe`), flips new requests to it atomically, waits for requests pinned to the old version to finish,
  then unloads the old one. On failure the old version keeps serving and `AdapterLoadError` says why.
  `swap_adapter(None, None)` goes back to the base model the same way.
- `prepare(request)` checks the request and renders and tokenises its prompt once (callers run it in a worker
  thread: it is CPU work), returning the request with its `prompt_ids`; `generate` uses those ids as they are (a
  request without them is prepared first). It raises `RequestTooLong` before any work when prompt + max_tokens
  exceed the model's context, `InvalidParam` (naming the request field) for a sampling field the model cannot take
  (e.g. a `logit_bias` token id outside its vocabulary), and `prompting.ChatTemplateError` when the chat template
  refuses the messages. `validate(request)` is `prepare` that returns the prompt's token count.
- With `params.n` > 1 the engine generates n choices for one prompt: `TextDelta`s and `Finished` carry the choice's
  `index`; every choice ends with its own `Finished` and the stream ends after the last one. `TextDelta.logprobs`
  holds the logprobs of the tokens whose text that delta completes (when `params.logprobs`), so the deltas' logprobs
  joined are the choice's `Finished.logprobs`.
- Both render prompts with `prompting.render_prompt` and the tokenizer `chat_template.load_tokenizer` gives them
  (`chat_format` says which template), as the trainer does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Protocol, Union, runtime_checkable

from ..chat_template import ChatFormat

Prompt = Union[list[dict], str]


# Below this temperature sampling is greedy (as vLLM's _SAMPLING_EPS): dividing logits by a denormal would overflow.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Guide:
    """A constraint on what may be generated (structured generation).

    `json_schema`: the JSON Schema (a dict) the text must satisfy; None with `kind == "json"` means any JSON object
    (OpenAI's `json_object`). `prefix`/`suffix`: literal text around the JSON value (a forced tool call in a
    model's tool-call format, e.g. `<tool_call>` ... `</tool_call>`).
    """

    json_schema: dict | None = None
    prefix: str = ""
    suffix: str = ""
    param: str = "response_format"  # the request field an unusable schema is reported against


@dataclass(frozen=True)
class SamplingParams:
    """What shapes one generation; field names and meanings are the OpenAI API's (penalties as in its docs:
    logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0), counted over generated tokens).

    `logit_bias`: (token id, bias) pairs added to the logits. `logprobs`: return the sampled tokens' logprobs (of
    the model's raw distribution, before penalties, bias, temperature and top-p: vLLM's default) with the
    `top_logprobs` most likely alternatives. `n`: choices per prompt. `guide`: structured generation.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    guide: Guide | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class GenerationRequest:
    """`tools`: OpenAI tool definitions the chat template renders into the prompt (None: no tools).
    `tool_choice`: set when the turn's output is to be read for tool calls ("auto", "required" or the forced tool's
    name; None: it is not), with `parallel_tool_calls`; an engine that parses tool calls itself (vLLM's own parsers)
    returns them in `Finished.tool_calls`, any other leaves that None and the daemon parses the text."""

    kind: Literal["chat", "completion"]
    prompt: Prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    tools: list[dict] | None = None
    prompt_ids: tuple[int, ...] | None = None  # the rendered prompt's tokens, once `Engine.prepare` has made them
    tool_choice: str | None = None
    parallel_tool_calls: bool = True


@dataclass(frozen=True)
class TopLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and its `top` alternatives (most likely first); `text_offset` is where the
    token's text starts in the choice's text (characters)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    text_offset: int = 0


@dataclass(frozen=True)
class TextDelta:
    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of one choice. `prompt_tokens` is the prompt's count; `completion_tokens` this choice's.
    `tool_calls`: the OpenAI tool calls the engine itself parsed from `text` (None: it did not parse; `()`: it
    found none), `content` the text outside them."""

    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str | None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[dict, ...] | None = None
    content: str | None = None


GenerationEvent = Union[TextDelta, Finished]


class EngineError(RuntimeError):
    """Generation failed inside the engine (the HTTP layer answers 5xx/503)."""


class RequestTooLong(ValueError):
    """Prompt plus max_tokens do not fit the model's context (the HTTP layer answers 400)."""


class InvalidParam(ValueError):
    """A request field the engine cannot take as given (the HTTP layer answers 400 naming `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class AdapterLoadError(RuntimeError):
    """An adapter could not be loaded or was not applied; the previous version keeps serving."""


@dataclass(frozen=True)
class ProbeResult:
    applied: bool
    detail: str


@runtime_checkable
class Engine(Protocol):
    name: str
    model_name: str
    chat_format: ChatFormat | None  # the chat template prompts are rendered with (`sloth_daemon.chat_template`)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def current_adapter(self) -> str | None: ...

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its `prompt_ids`; raises RequestTooLong."""
        ...

    def validate(self, request: GenerationRequest) -> int:
        """Return the prompt's token count or raise RequestTooLong."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    async def swap_adapter(self, version: str | None, path: Path | None) -> ProbeResult | None: ...

    def in_flight(self) -> dict[str | None, int]:
        """Requests being served, by adapter version (None = base model)."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, with the chat template set on it (loaded by `start()`)."""
        ...
