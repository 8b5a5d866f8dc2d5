"""Turning prompts and training examples into tokens, the same way for serving and for training.

Contract:
- `render_prompt(tokenizer, kind, prompt, tools=None)` is the text the model continues: the chat template with the
  generation prompt for chat messages (and the OpenAI `tools` given to the template; assistant tool calls reach it
  with object arguments, `tool_calls.to_template_messages`), the raw string for completions.
- `encode_example(tokenizer, kind, prompt, answer, max_len)` returns `(input_ids, labels)` where labels are -100 on
  prompt tokens, so the loss covers the answer (and the end-of-turn token that teaches the model to stop) only.
  Documents (`kind="document"`) are trained on every token. Over-long examples keep the answer's start and cut the
  prompt's head, because the answer is what is being taught.
"""

from __future__ import annotations

from typing import Any

from .tool_calls import to_template_messages

IGNORE_INDEX = -100


def render_prompt(tokenizer: Any, kind: str, prompt: Any, tools: list[dict] | None = None) -> str:
    if kind == "chat":
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(to_template_messages(prompt), add_generation_prompt=True,
                                             tokenize=False, **extra)
    if not isinstance(prompt, str):
        raise TypeError("a completion prompt must be a string")
    return prompt


def _eos_text(tokenizer: Any) -> str:
    return tokenizer.eos_token or ""


def _answer_text(tokenizer: Any, kind: str, prompt: Any, answer: str, prompt_text: str) -> str:
    """The text that follows the prompt when the model gives `answer`, end-of-turn marker included."""
    if kind == "chat":
        full = tokenizer.apply_chat_template(
            list(prompt) + [{"role": "assistant", "content": answer}], tokenize=False
        )
        if full.startswith(prompt_text):
            return full[len(prompt_text):]
    return answer + _eos_text(tokenizer)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer: Any, kind: str, prompt: Any, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    if kind == "document":
        ids = encode(tokenizer, answer + _eos_text(tokenizer))[:max_len]
        return ids, list(ids)
    prompt_text = render_prompt(tokenizer, kind, prompt)
    p_ids = encode(tokenizer, prompt_text)
    a_ids = encode(tokenizer, _answer_text(tokenizer, kind, prompt, answer, prompt_text))
    a_ids = a_ids[:max_len - 1] if len(a_ids) >= max_len else a_ids
    room = max_len - len(a_ids)
    p_ids = p_ids[-room:] if room > 0 else []
    return p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids
