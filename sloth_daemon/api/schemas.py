"""Request bodies of the HTTP API (pydantic), and their conversion to engine prompts and sampling parameters.

Contract:
- Generation requests (`ChatCompletionRequest`, `CompletionRequest`) take the OpenAI fields with the OpenAI types,
  strictly (`temperature: true` and `stream: "yes"` are errors, not coerced) and range-checked where the engine
  or the store needs it (`seed` within int64 as vLLM takes it, `logit_bias` values within [-100, 100], `n` up to
  `MAX_N`, `top_logprobs` up to `MAX_TOP_LOGPROBS`); `null` means the default wherever the OpenAI schema allows it.
- Every field that changes the output is honoured (see the README's API table). `IGNORED_FIELDS` change nothing
  and are accepted; any other field with a non-null value is refused: `refused_field(body)` names it, and the
  operations answer 400 with that `param`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import GenerationConfig
from ..engine.base import Guide, SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 16
MAX_TOP_LOGPROBS = 20
# OpenAI fields that do not change what is generated: accepted and not acted on.
IGNORED_FIELDS = frozenset({"user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})

Float = Annotated[float, Field(strict=True)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _Request(BaseModel):
    """A generation request: unknown fields are kept (as extras) so `refused_field` can name them."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Lenient):
    include_usage: bool | None = False


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]


class FunctionCall(_Lenient):
    name: FunctionName
    arguments: str = Field(description="the arguments as a JSON string, as the OpenAI API sends them")


class MessageToolCall(_Lenient):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def as_dict(self) -> dict:
        """The message as the chat template and the replay store take it (OpenAI shape, unset fields left out)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out

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


class JsonSchemaFormat(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self

    def guide(self) -> Guide | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Guide(None)
        assert self.json_schema is not None
        return Guide(self.json_schema.schema_ or {})


class FunctionDefinition(_Lenient):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: dict[str, FunctionName]

    @field_validator("function")
    @classmethod
    def _has_name(cls, v: dict) -> dict:
        if set(v) != {"name"}:
            raise ValueError("give the tool as {\"name\": ...}")
        return v


class _SamplingFields(_Request):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    store: bool | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[Float, Field(ge=-100, le=100)]] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict | None) -> dict | None:
        for key in v or {}:
            if not key.isdigit() or int(key) > INT64_MAX:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        return v

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.streaming and self.stream_options and self.stream_options.include_usage)

    @property
    def stored(self) -> bool:
        return self.store is not False

    def _logprobs(self) -> tuple[bool, int]:
        return False, 0

    def _guide(self) -> Guide | None:
        return None

    def sampling(self, defaults: GenerationConfig, max_tokens: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        logprobs, top = self._logprobs()
        return SamplingParams(
            max_tokens=max_tokens or self.max_tokens or defaults.max_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            stop=stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            logprobs=logprobs,
            top_logprobs=top,
            n=self.n or 1,
            guide=self._guide(),
        )


def refused_field(body: BaseModel) -> str | None:
    """The first field of `body` that is set (not null) but neither honoured nor in `IGNORED_FIELDS`."""
    for name, value in (body.model_extra or {}).items():
        if value is not None and name not in IGNORED_FIELDS:
            return name
    return None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def _logprobs(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0

    def _guide(self) -> Guide | None:
        return self.response_format.guide() if self.response_format else None

    def prompt(self) -> list[dict]:
        return [m.as_dict() for m in self.messages]

    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def tool_choice_name(self) -> str:
        """"none", "auto", "required", or the forced tool's name; OpenAI's default: auto with tools, else none."""
        choice = self.tool_choice
        if choice is None:
            return "auto" if self.tools else "none"
        return choice if isinstance(choice, str) else choice.function["name"]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1, description="only best_of=1 is supported")

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

    def _logprobs(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class AnswerToolCall(_Lenient):
    """A tool call given as an answer (teaching, a correction): OpenAI's shape, the `id` optional (not learnt)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interaction_id: str = Field(min_length=1, description="the `id` of a chat/completion response")
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, min_length=1, description="the answer the model should have given")
    tool_calls: list[AnswerToolCall] | None = Field(
        None, min_length=1, description="a correction that calls tools (of those the turn offered); `correction` is "
                                        "then the text before the calls, if any")
    comment: str | None = None

    @model_validator(mode="after")
    def _something(self) -> "FeedbackRequest":
        if self.rating is None and self.correction is None and self.tool_calls is None:
            raise ValueError("give a rating ('up' or 'down'), a correction (text or tool_calls), or both")
        return self

    def correction_tool_calls(self) -> list[dict] | None:
        return None if self.tool_calls is None else [c.model_dump(exclude_none=True) for c in self.tool_calls]


class TeachPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[ChatMessage] = Field(description="a user message, or a whole conversation so far")
    answer: str | None = Field(None, min_length=1, description="the answer's text (before its tool calls, if any)")
    tool_calls: list[AnswerToolCall] | None = Field(None, min_length=1, description="an answer that calls tools")
    tools: list[Tool] | None = Field(None, min_length=1, description="the tools the prompt offers (OpenAI shape)")
    kind: Literal["chat", "completion"] = "chat"

    @model_validator(mode="after")
    def _an_answer(self) -> "TeachPair":
        if self.answer is None and self.tool_calls is None:
            raise ValueError("give an answer (text, tool_calls, or both)")
        if self.kind == "completion" and (self.tools is not None or self.tool_calls is not None):
            raise ValueError("tools and tool_calls need a chat example")
        return self

    @property
    def answer_text(self) -> str:
        return self.answer or ""

    def tool_use(self) -> dict:
        """`tools` and `tool_calls` as plain dicts, for `make_example` / `ReplayStore.add_taught`."""
        return {"tools": None if self.tools is None else [t.model_dump(exclude_none=True) for t in self.tools],
                "tool_calls": None if self.tool_calls is None else [c.model_dump(exclude_none=True)
                                                                    for c in self.tool_calls]}

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
        return [{**m.as_dict(), "role": m.role} for m in self.prompt]  # tool calls and results in the history kept


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


class RequeueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    example_ids: list[str] | None = Field(None, description="set-aside examples to make pending again; none = all")


class ForgetRequest(BaseModel):
    """What to forget (`sloth_replay.forgetting`): any mix of the selectors; at least one."""

    model_config = ConfigDict(extra="forbid")
    example_ids: list[str] = Field([], description="training examples (ids as teach, feedback and status give them)")
    feedback_ids: list[Annotated[int, Field(ge=1, le=INT64_MAX)]] = Field(
        [], description="feedback (ids as /sloth/feedback and /sloth/interactions give)")
    interaction_ids: list[str] = Field([], description="logged turns (response ids), with their feedback")
    conversation: str | None = Field(None, description="a turn id: every turn of its conversation")
    since: str | None = Field(None, description="ISO-8601 time: what was created at or after it")
    until: str | None = Field(None, description="ISO-8601 time: what was created before it")

    @model_validator(mode="after")
    def _something(self) -> "ForgetRequest":
        if not (self.example_ids or self.feedback_ids or self.interaction_ids or self.conversation or self.since
                or self.until):
            raise ValueError("say what to forget: example_ids, feedback_ids, interaction_ids, conversation, or a "
                             "time range (since/until)")
        return self


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(description="an adapter version such as v000002, or 'base' for no adapter")
