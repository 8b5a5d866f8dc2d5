"""sloth-tiny copies whose chat templates render tools, standing in for tool-calling model families in tests.

`HERMES_TEMPLATE` is sloth-tiny's own chat format plus a Hermes/Qwen-style tool section: the tools as JSON in a
system turn, assistant tool calls as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, tool results as
`<tool_response>` user turns. Without tools it renders exactly what sloth-tiny's template renders (the format the
model was taught), so plain chat behaves the same. `LLAMA3_JSON_TEMPLATE`: tools rendered, calls as a bare
`{"name": ..., "parameters": ...}` JSON object (Llama 3.1's JSON tool calling).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERMES_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>You may call these tools. Answer with <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call> to call one.\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}<|assistant|>{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] %}<tool_call>\n{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|end|>"
    "{% elif message['role'] == 'tool' %}<|user|><tool_response>\n{{ message['content'] }}\n</tool_response><|end|>"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

LLAMA3_JSON_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>Call a function by answering with {\"name\": function name, \"parameters\": "
    "arguments}.\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}<|assistant|>"
    "{% for call in message['tool_calls'] %}{\"name\": \"{{ call['function']['name'] }}\", \"parameters\": "
    "{{ call['function']['arguments'] | tojson }}}{% endfor %}<|end|>"
    "{% elif message['role'] == 'tool' %}<|user|>{{ message['content'] }}<|end|>"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_template(model_dir: Path, dest: Path, template: str) -> Path:
    """A copy of `model_dir` at `dest` whose tokenizer carries `template` as its chat template."""
    shutil.copytree(model_dir, dest)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for stale in ("chat_template.jinja", "chat_template.json"):
        (dest / stale).unlink(missing_ok=True)
    return dest
