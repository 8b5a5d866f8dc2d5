"""Turning prompts and training examples into tokens, the same way for serving, anchors, training and the gate.

Contract:
- `render_prompt(tokenizer, kind, prompt, tools=None)` is the text the model continues: the chat template
  (the one `chat_template.load_tokenizer` set on the tokenizer) with the generation prompt for chat messages (and
  the OpenAI `tools` given to the template; assistant tool calls reach it with object arguments,
  `tool_calls.to_template_messages`), the raw string for completions. `render_chat` is the only call of the
  template: every part renders through it.
- A template that refuses the messages (Jinja's `raise_exception`, as templates without a system role or with
  strict user/assistant alternation do), or fails on them in any other way, raises `ChatTemplateError` with the
  template's own message: a problem with the request (HTTP 400, param `messages`), never with the engine.
- `encode_example(tokenizer, kind, prompt, answer, max_len, tools=None, tool_calls=None)` returns
  `(input_ids, labels)` where labels are -100 on prompt tokens, so the loss covers the answer (and the end-of-turn
  token that teaches the model to stop) only. A chat example's prompt renders with its `tools` as serving renders
  it; an answer with `tool_calls` renders as the assistant message `{"content": answer, "tool_calls": ...}` through
  the template, so the model learns exactly the text the `tool_calls.ToolFormat` parser turns back into those calls.
  Documents (`kind="document"`) are trained on every token. Over-long examples keep the answer's start and cut the
  prompt's head, because the answer is what is being taught.
"""

from __future__ import annotations

from typing import Any

from .tool_calls import to_template_messages

IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    """The chat template refused or failed on these messages; the message is the template's own."""


def render_chat(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    """`messages` (and the OpenAI `tools`, if any) through the tokenizer's chat template (transformers'
    `apply_chat_template`) as text."""
    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(to_template_messages(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **extra)
    except Exception as e:  # rendering is a pure function of the messages: any failure is theirs with this template
        raise ChatTemplateError(str(e) or type(e).__name__) from None


def render_prompt(tokenizer: Any, kind: str, prompt: Any, tools: list[dict] | None = None) -> str:
    if kind == "chat":
        return render_chat(tokenizer, prompt, add_generation_prompt=True, tools=tools)
    if not isinstance(prompt, str):
        raise TypeError("a completion prompt must be a string")
    return prompt


def _eos_text(tokenizer: Any) -> str:
    return tokenizer.eos_token or ""


def _answer_text(tokenizer: Any, kind: str, prompt: Any, answer: str, prompt_text: str,
                 tools: list[dict] | None = None, tool_calls: list[dict] | None = None) -> str:
    """The text that follows the prompt when the model gives `answer` (and `tool_calls`), end-of-turn marker
    included."""
    if kind == "chat":
        reply: dict = {"role": "assistant", "content": answer}
        if tool_calls:
            reply["tool_calls"] = tool_calls
        full = render_chat(tokenizer, list(prompt) + [reply], add_generation_prompt=False, tools=tools)
        if full.startswith(prompt_text):
            return full[len(prompt_text):]
        if tool_calls:  # no plain-text fallback could hold the calls in the model's own format
            raise ChatTemplateError("the chat template renders an answer with tool calls in a way that does not "
                                    "continue its own generation prompt")
    return answer + _eos_text(tokenizer)


def check_example(tokenizer: Any, kind: str, prompt: Any, answer: str, tools: list[dict] | None = None,
                  tool_calls: list[dict] | None = None) -> None:
    """Render a training example as `encode_example` will (without tokenizing it); `ChatTemplateError` if the
    template refuses it, so it is refused when taught rather than failing the update."""
    if kind == "chat":
        _answer_text(tokenizer, kind, prompt, answer, render_prompt(tokenizer, kind, prompt, tools), tools,
                     tool_calls)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer: Any, kind: str, prompt: Any, answer: str, max_len: int,
                   tools: list[dict] | None = None, tool_calls: list[dict] | None = None
                   ) -> tuple[list[int], list[int]]:
    if kind == "document":
        ids = encode(tokenizer, answer + _eos_text(tokenizer))[:max_len]
        return ids, list(ids)
    prompt_text = render_prompt(tokenizer, kind, prompt, tools)
    p_ids = encode(tokenizer, prompt_text)
    a_ids = encode(tokenizer, _answer_text(tokenizer, kind, prompt, answer, prompt_text, tools, tool_calls))
    a_ids = a_ids[:max_len - 1] if len(a_ids) >= max_len else a_ids
    room = max_len - len(a_ids)
    p_ids = p_ids[-room:] if room > 0 else []
    return p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids
