"""Model folders that stand in for other model families: copies of sloth-tiny whose chat templates, written for these
tests, behave like the major families' templates do (no model hub: the weights stay sloth-tiny's).

`make_family_model(tiny_model, dest, family)` copies the tiny model to `dest` with the chat template of `family`
in its `tokenizer_config.json` (or none at all). The templates speak sloth-tiny's own tokens (`<|user|>`, `<|end|>`,
...), and all but `folded` render a lone user message exactly as sloth-tiny's template does, so the taught answers
still come out; what differs is how they treat system messages, role order and tools:

| family | like | behaviour |
| --- | --- | --- |
| `no-system` | Gemma | `raise_exception('System role not supported')`; roles must alternate user/assistant |
| `alternating` | Mistral (v0.1) | roles must alternate user/assistant (`raise_exception`); no system or other roles |
| `folded` | Llama 2 | a system message is folded into the first user turn |
| `tools` | Hermes / Qwen 2.5 | `tools` rendered into a system turn; assistant `tool_calls` as `<tool_call>` JSON; `tool` results as `<tool_response>` in a user turn |
| `none` | a base model | no chat template at all |

`REFUSALS` gives, per family that refuses something, messages its template refuses and the message it raises.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

NO_SYSTEM = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] | trim + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

ALTERNATING = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + '<|end|>' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

FOLDED = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>' }}{% if loop.first and system %}{{ '[SYS]' + system + '[/SYS]\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TOOLS = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'"
    " 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '"
    " '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": '"
    " '<args-json-object>}\\n</tool_call><|end|>' }}"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|system|>' + messages[0]['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for tool_call in message['tool_calls'] or [] %}"
    "{% if tool_call['function'] is defined %}{% set tool_call = tool_call['function'] %}{% endif %}"
    "{% if not loop.first or message['content'] %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' }}"
    "{% if tool_call['arguments'] is string %}{{ tool_call['arguments'] }}"
    "{% else %}{{ tool_call['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|end|>' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|user|>' }}{% endif %}"
    "{{ '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|end|>' }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TEMPLATES: dict[str, str | None] = {
    "no-system": NO_SYSTEM,
    "alternating": ALTERNATING,
    "folded": FOLDED,
    "tools": TOOLS,
    "none": None,
}

SYSTEM_FIRST = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
TWO_USERS = [{"role": "user", "content": "Hello"}, {"role": "user", "content": "Are you there?"}]
# family -> [(messages its template refuses, the template's own message)]
REFUSALS: dict[str, list[tuple[list[dict], str]]] = {
    "no-system": [(SYSTEM_FIRST, "System role not supported"),
                  (TWO_USERS, "Conversation roles must alternate user/assistant/user/assistant/...")],
    "alternating": [(TWO_USERS, "Conversation roles must alternate user/assistant/user/assistant/..."),
                    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "assistant", "content": "Still there?"}],
                     "Conversation roles must alternate user/assistant/user/assistant/...")],
}


def make_family_model(tiny_model: Path, dest: Path, family: str) -> Path:
    """A copy of `tiny_model` at `dest` with the chat template of `family` (see `TEMPLATES`); returns `dest`."""
    template = TEMPLATES[family]
    shutil.copytree(tiny_model, dest)
    for name in ("chat_template.jinja", "chat_template.json"):  # where newer transformers keep templates
        (dest / name).unlink(missing_ok=True)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest
