"""The engine interface: what the daemon needs from whatever generates text (embedded transformers+peft, or vLLM).

Contract (both engines pass `tests/engine_contract.py`):
- `generate(request)` pins the adapter version that is current *at the call* and streams `TextDelta` events then
  exactly one `Finished` (or raises `EngineError`). Requests are never interleaved into each other's output.
- `swap_adapter(version, path)` loads the adapter under a name unique to that version, confirms the engine really
  applies it (`probe`), flips new requests to it atomically, waits for requests pinned to the old version to finish,
  then unloads the old one. On failure the old version keeps serving and `AdapterLoadError` says why.
  `swap_adapter(None, None)` goes back to the base model the same way.
- `validate(request)` raises `RequestTooLong` before any work when prompt + max_tokens exceed the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Literal, Protocol, Union, runtime_checkable

Prompt = Union[list[dict], str]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    kind: Literal["chat", "completion"]
    prompt: Prompt
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str | None


GenerationEvent = Union[TextDelta, Finished]


class EngineError(RuntimeError):
    """Generation failed inside the engine (the HTTP layer answers 5xx/503)."""


class RequestTooLong(ValueError):
    """Prompt plus max_tokens do not fit the model's context (the HTTP layer answers 400)."""


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

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def current_adapter(self) -> str | None: ...

    def validate(self, request: GenerationRequest) -> int:
        """Return the prompt's token count or raise RequestTooLong."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    async def swap_adapter(self, version: str | None, path: Path | None) -> ProbeResult | None: ...

    def in_flight(self) -> dict[str | None, int]:
        """Requests being served, by adapter version (None = base model)."""
        ...
