"""Request bodies of the HTTP API (pydantic), and their conversion to engine prompts and sampling parameters.

OpenAI request fields we do not act on (e.g. `frequency_penalty`, `user`, `logit_bias`) are accepted and ignored,
as other OpenAI-compatible servers do, so stock clients work; fields we cannot honour with a different meaning
(`n` > 1, non-text content parts) are refused with 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import GenerationConfig
from ..engine.base import SamplingParams


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        parts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class _SamplingFields(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    store: bool = True

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def sampling(self, defaults: GenerationConfig, max_tokens: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens or self.max_tokens or defaults.max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            stop=stop,
            seed=self.seed,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt string is supported per request")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interaction_id: str = Field(min_length=1, description="the `id` of a chat/completion response")
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, min_length=1, description="the answer the model should have given")
    comment: str | None = None

    @model_validator(mode="after")
    def _something(self) -> "FeedbackRequest":
        if self.rating is None and self.correction is None:
            raise ValueError("give a rating ('up' or 'down'), a correction, or both")
        return self


class TeachPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[ChatMessage] = Field(description="a user message, or a whole conversation so far")
    answer: str = Field(min_length=1)
    kind: Literal["chat", "completion"] = "chat"

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    def as_prompt(self) -> list[dict] | str:
        if self.kind == "completion":
            if not isinstance(self.prompt, str):
                raise ValueError("a completion example needs a string prompt")
            return self.prompt
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [{"role": m.role, "content": m.content} for m in self.prompt]


class TeachRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    examples: list[TeachPair] = []
    documents: list[str] = []

    @model_validator(mode="after")
    def _something(self) -> "TeachRequest":
        if not self.examples and not self.documents:
            raise ValueError("give at least one example or document")
        if any(not d.strip() for d in self.documents):
            raise ValueError("documents must not be empty")
        return self


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(description="an adapter version such as v000002, or 'base' for no adapter")
