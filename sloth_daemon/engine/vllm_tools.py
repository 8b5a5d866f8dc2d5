"""vLLM's own tool calling, for the vLLM engine: which of vLLM's tool parsers its server runs with, and a chat turn
that is read for tool calls sent to vLLM's `/v1/chat/completions` with `tools`, `tool_choice` and
`parallel_tool_calls`, its `tool_calls` read back.

Why: the issue asks for vLLM's own parsers on the vLLM engine. They exist only behind vLLM's chat endpoint
(`--enable-auto-tool-choice --tool-call-parser NAME`, https://docs.vllm.ai/en/latest/features/tool_calling.html),
which also forces `required` and named calls with its own structured generation (xgrammar structural tags in the
parser's format). Every other request keeps going to `/v1/completions` as token ids (`engine/vllm.py`).

Contract:
- `parser_for(setting, fmt, external)` is the `--tool-call-parser` to use, or None (the daemon parses tool calls
  itself, `tool_calls.py`). `setting` is the config's `vllm.tool_call_parser`: "auto" (default) picks vLLM's parser
  for the chat template's format (`PARSERS`: Hermes/Qwen -> `hermes`, Llama-3 JSON -> `llama3_json`, the
  tokenizer's own `response_template` -> `hf`) on a vLLM the daemon starts, and None on an external one (`vllm.url`:
  its flags are not the daemon's to know); "daemon" is always None; any other value is a vLLM parser name, used as
  given (an external server must run with it). None as well when the template renders no tools (`fmt` None).
- `server_args(parser, chat_format)`: the flags a started vLLM needs: the parser's (with `--tool-strict-level
  parameter`: arguments always follow the tool's schema), and `--chat-template` with the template the daemon renders
  with when it is not the model folder's own (the config's file, or the built-in fallback's text), so that vLLM's
  own rendering, should it ever render, is the daemon's.
- `chat_body(completion_body, request)`: the `/v1/chat/completions` request made from the engine's
  `/v1/completions` body (same sampling fields) for a `GenerationRequest` with `tool_choice` set: its messages as
  the client sent them, `tools`, `tool_choice` (a name becomes the named-function object), `parallel_tool_calls`,
  `logprobs` in the chat shape, token ids back, and the prompt's token ids as the daemon rendered them
  (`kv_transfer_params.prompt_token_ids`, which vLLM 0.32 takes in place of rendering the messages itself), so
  vLLM generates from exactly the tokens training sees. A guide that only forces the call (`Guide.param ==
  "tools"`) is dropped: vLLM forces it from `tool_choice`.
- `finished_choices(body, request, decode, logprobs, version)` turns vLLM's answer into one `Finished` per choice:
  `tool_calls` as vLLM parsed them (`{"id": "call_…", "type": "function", "function": {"name", "arguments": JSON
  string}}`, ids made here as the embedded engine's are), `content` the text outside them (None when empty);
  `text` the choice's generated text (its token ids decoded and cut at the first stop string, as vLLM cuts; the
  content when there are no calls), so what is logged is the raw answer, as on the embedded engine.
  `rendered_ids(body)` is the prompt token ids vLLM generated from, for the check that they are the daemon's.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

from ..chat_template import ChatFormat
from ..tool_calls import ToolFormat
from .base import Finished, GenerationRequest, TokenLogprob

PARSERS = {"hermes": "hermes", "llama3_json": "llama3_json", "model": "hf"}


def parser_for(setting: str, fmt: ToolFormat | None, external: bool) -> str | None:
    """See the module docstring."""
    if setting == "daemon" or fmt is None:
        return None
    if setting == "auto":
        return None if external else PARSERS.get(fmt.name)
    return setting


def server_args(parser: str | None, chat_format: ChatFormat | None) -> list[str]:
    """See the module docstring."""
    args: list[str] = []
    if chat_format is not None and chat_format.template is not None:
        # The config's file by its path; the fallback's text as it is (vLLM takes a template inline).
        args += ["--chat-template", chat_format.name if chat_format.source == "config" else chat_format.template]
    if parser is not None:
        # `parameter`: a call's arguments follow its tool's JSON schema whether or not the tool says `strict`, as
        # the embedded engine's forced calls do (vLLM's default pins only the call's envelope).
        args += ["--enable-auto-tool-choice", "--tool-call-parser", parser, "--tool-strict-level", "parameter"]
    return args


def chat_body(completion_body: dict[str, Any], request: GenerationRequest) -> dict[str, Any]:
    """See the module docstring."""
    body = {k: v for k, v in completion_body.items()
            if k not in ("prompt", "stream", "stream_options", "logprobs", "return_token_ids")}
    p = request.params
    if p.guide is not None and p.guide.param == "tools":
        body.pop("structured_outputs", None)
    choice = request.tool_choice
    body.update(messages=request.prompt, tools=request.tools, parallel_tool_calls=request.parallel_tool_calls,
                tool_choice=choice if choice in ("auto", "required", "none")
                else {"type": "function", "function": {"name": choice}},
                return_token_ids=True)
    if request.prompt_ids is not None:
        # The daemon's own prompt tokens: vLLM generates from them instead of rendering the messages again (its
        # tool dicts gain `"description": null`, so its rendering differs from the client's tools as training sees
        # them). vLLM reads them for disaggregated serving; the tool parser and tool_choice still apply.
        body["kv_transfer_params"] = {"prompt_token_ids": list(request.prompt_ids)}
    if p.logprobs:
        body.update(logprobs=True, top_logprobs=p.top_logprobs, return_tokens_as_token_ids=True)
    return body


def rendered_ids(body: dict[str, Any]) -> list[int] | None:
    ids = body.get("prompt_token_ids")
    return [int(i) for i in ids] if ids is not None else None


def _token_id(token: str) -> int:
    return int(token.rsplit(":", 1)[1])  # `token_id:N` (return_tokens_as_token_ids)


def chat_logprob_pairs(lp: dict | None) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """vLLM's chat-shaped logprobs (tokens as `token_id:N`) as (token id, logprob, [(alt id, logprob)])."""
    out = []
    for entry in (lp or {}).get("content") or ():
        alts = [(_token_id(a["token"]), float(a["logprob"])) for a in entry.get("top_logprobs") or ()]
        out.append((_token_id(entry["token"]), float(entry["logprob"]), sorted(alts, key=lambda a: -a[1])))
    return out


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to its first stop string (vLLM stops at the first match; an empty stop string matches nothing)."""
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return text[:min(hits)] if hits else text


def finished_choices(body: dict[str, Any], request: GenerationRequest, decode: Callable[[list[int]], str],
                     logprobs: Callable[[dict | None], tuple[TokenLogprob, ...]],
                     version: str | None) -> list[Finished]:
    """See the module docstring. `decode(token_ids)` is the daemon's tokenizer's decoding; `logprobs(choice's
    logprobs)` converts them."""
    usage = body.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    out = []
    for choice in sorted(body.get("choices") or (), key=lambda c: int(c.get("index") or 0)):
        message = choice.get("message") or {}
        calls = tuple({"id": "call_" + secrets.token_hex(12), "type": "function",
                       "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
                      for c in message.get("tool_calls") or ())
        content = message.get("content") or ""
        ids = [int(t) for t in choice.get("token_ids") or ()]
        text = _cut(decode(ids), request.params.stop) if calls else content
        out.append(Finished(
            text, "length" if choice.get("finish_reason") == "length" else "stop", prompt_tokens, len(ids), version,
            int(choice.get("index") or 0),
            logprobs(choice.get("logprobs")) if request.params.logprobs else None,
            calls, (content.strip() or None) if calls else None))
    return out
