"""Which chat template turns messages into the prompt text, chosen once at start for serving, anchors, training and
the gate alike.

The choice, in order (like vLLM's `--chat-template`):
1. `chat_template` in the config: a Jinja file (the format of Hugging Face chat templates: `messages`,
   `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, ...).
2. The model folder's own template (`tokenizer_config.json` / `chat_template.jinja`, as transformers loads it;
   also a set of named templates).
3. None of them: the built-in fallback `FALLBACK_NAME` (`FALLBACK_TEMPLATE`), logged as a warning and shown in
   `/sloth/status`, so a base model without a template serves, generates its anchors and trains. Each message is
   `### <Role>:` and its text, separated by blank lines; an assistant message ends with the tokenizer's eos token,
   so training teaches the model to stop where the engines stop (at eos). Since transformers 4.44 no longer
   supplies a default template, and vLLM refuses chat requests without one, the daemon brings its own.

Contract:
- `load_tokenizer(model_path, setting)` returns `(tokenizer, ChatFormat)`: the folder's tokenizer (transformers'
  `AutoTokenizer`) with the chosen template set on it, so `prompting.render_prompt` (the one rendering function)
  uses it everywhere. The trainer gets `ChatFormat.template` in its job and sets it the same way
  (`apply_chat_format`).
- A template that cannot be compiled (Jinja syntax error), or a `chat_template` file that cannot be read, raises
  `ChatTemplateSetupError` at start, naming the file or the model folder. A template that raises on some messages
  (no system role, strict alternation) is not a setup error: those requests get a 400 (`prompting`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

FALLBACK_NAME = "sloth-plain"
FALLBACK_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}{{ '### Assistant:\\n' }}{% endif %}"
)

Source = Literal["config", "model", "fallback"]


class ChatTemplateSetupError(RuntimeError):
    """The configured or the model's chat template cannot be used at all (unreadable file, Jinja syntax error)."""


@dataclass(frozen=True)
class ChatFormat:
    """The chat template in use: where it comes from, its name for people, and the Jinja text set on the tokenizer
    (None: the tokenizer's own, left as the model folder has it)."""

    source: Source
    name: str
    template: str | None

    def describe(self) -> dict[str, str]:
        return {"source": self.source, "name": self.name}


def read_template_file(setting: str | Path) -> tuple[Path, str]:
    """The `chat_template` setting's file and its text; `ChatTemplateSetupError` when it cannot be read."""
    path = Path(setting).expanduser().resolve()
    try:
        return path, path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateSetupError(f"chat_template: cannot read the Jinja file {path}: {e}") from None


def resolve_chat_format(tokenizer: Any, setting: str | Path | None, model_path: str | Path) -> ChatFormat:
    """Which template to use for `tokenizer` (see the module docstring); logs the choice."""
    if setting:
        path, text = read_template_file(setting)
        log.info("chat template: %s (from the config's chat_template)", path)
        return ChatFormat("config", str(path), text)
    if getattr(tokenizer, "chat_template", None):
        log.info("chat template: the model folder's own (%s)", model_path)
        return ChatFormat("model", str(model_path), None)
    log.warning("the model folder %s has no chat template: chat prompts use the built-in fallback template %r "
                "(set chat_template to a Jinja file to use another)", model_path, FALLBACK_NAME)
    return ChatFormat("fallback", FALLBACK_NAME, FALLBACK_TEMPLATE)


def apply_chat_format(tokenizer: Any, template: str | None, where: str = "the chat template") -> None:
    """Set `template` on `tokenizer` (None: keep its own) and compile it once, so a broken one fails now."""
    if template is not None:
        tokenizer.chat_template = template
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                      tokenize=False)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateSetupError(f"{where} is not a valid Jinja template (line {e.lineno}: {e.message})") from None
    except Exception as e:  # a template may refuse even this; requests it refuses get a 400, it still serves
        log.warning("%s refuses a single user message (%s: %s)", where, type(e).__name__, e)


def load_tokenizer(model_path: str | Path, setting: str | Path | None) -> tuple[Any, ChatFormat]:
    """The model folder's tokenizer with the chat template chosen for it set on it, and that choice."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    fmt = resolve_chat_format(tokenizer, setting, model_path)
    apply_chat_format(tokenizer, fmt.template,
                      f"chat_template {fmt.name}" if fmt.source == "config" else f"the chat template of {model_path}")
    return tokenizer, fmt
