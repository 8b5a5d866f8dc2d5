"""vLLM's own tool calling (`engine/vllm_tools.py`) without a vLLM: which parser, which server flags, the chat request
made from the engine's completion request, and vLLM's answer read back. `test_engine_vllm.py` runs it for real."""

from __future__ import annotations

import json

from sloth_daemon.chat_template import FALLBACK_NAME, FALLBACK_TEMPLATE, ChatFormat
from sloth_daemon.engine.base import GenerationRequest, Guide, SamplingParams
from sloth_daemon.engine.vllm import _vllm_param
from sloth_daemon.engine.vllm_tools import chat_body, finished_choices, parser_for, rendered_ids, server_args
from sloth_daemon.tool_calls import HERMES, LLAMA3_JSON, ToolFormat

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "Weather?"}]


def test_parser_from_the_template_on_a_started_vllm_only():
    model = ToolFormat("model", {}, can_force=False)
    assert [parser_for("auto", f, external=False) for f in (HERMES, LLAMA3_JSON, model)] == ["hermes", "llama3_json",
                                                                                            "hf"]
    assert parser_for("auto", HERMES, external=True) is None  # a server the daemon did not start: flags unknown
    assert parser_for("auto", None, external=False) is None  # the template renders no tools
    assert parser_for("daemon", HERMES, external=False) is None
    assert parser_for("mistral", LLAMA3_JSON, external=True) == "mistral"  # as the operator says


def test_server_args_carry_the_daemons_template_and_parser():
    assert server_args(None, ChatFormat("model", "/m", None)) == []
    assert server_args("hermes", ChatFormat("config", "/etc/t.jinja", "{{ x }}")) == [
        "--chat-template", "/etc/t.jinja", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--tool-strict-level", "parameter"]
    assert server_args(None, ChatFormat("fallback", FALLBACK_NAME, FALLBACK_TEMPLATE)) == [
        "--chat-template", FALLBACK_TEMPLATE]


def test_chat_body_passes_tools_through_and_drops_the_daemons_forcing_guide():
    completion = {"model": "v1-x", "prompt": [1, 2], "max_tokens": 9, "temperature": 0.0, "n": 2, "stream": True,
                  "stream_options": {"include_usage": True}, "return_token_ids": True, "logprobs": 3,
                  "return_tokens_as_token_ids": True, "stop": ["\n"], "logit_bias": {"5": -1.0},
                  "structured_outputs": {"structural_tag": "..."}}
    params = SamplingParams(max_tokens=9, logprobs=True, top_logprobs=3, n=2, guide=Guide(param="tools"))
    body = chat_body(completion, GenerationRequest("chat", MESSAGES, params, [WEATHER], (1, 2),
                                                   tool_choice="get_weather", parallel_tool_calls=False))
    assert body == {"model": "v1-x", "max_tokens": 9, "temperature": 0.0, "n": 2, "stop": ["\n"],
                    "logit_bias": {"5": -1.0}, "messages": MESSAGES, "tools": [WEATHER],
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                    "parallel_tool_calls": False, "return_token_ids": True, "logprobs": True, "top_logprobs": 3,
                    "return_tokens_as_token_ids": True, "kv_transfer_params": {"prompt_token_ids": [1, 2]}}
    json_mode = SamplingParams(guide=Guide({"type": "object"}))  # a response format stays: vLLM combines the two
    body = chat_body({"structured_outputs": {"json": {}}}, GenerationRequest("chat", MESSAGES, json_mode, [WEATHER],
                                                                            tool_choice="auto"))
    assert body["tool_choice"] == "auto" and body["structured_outputs"] == {"json": {}} and "logprobs" not in body


def test_vllms_answer_read_back():
    call_text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    answer = {"prompt_token_ids": [1, 2, 3], "usage": {"prompt_tokens": 3, "completion_tokens": 9},
              "choices": [
                  {"index": 1, "finish_reason": "stop", "token_ids": [7, 8], "message": {"content": "Sunny."}},
                  {"index": 0, "finish_reason": "tool_calls", "token_ids": [4, 5, 6],
                   "message": {"content": " ", "tool_calls": [{"id": "chatcmpl-tool-1", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": "{}"}}]},
                   "logprobs": {"content": [{"token": "token_id:4", "logprob": -0.5,
                                             "top_logprobs": [{"token": "token_id:9", "logprob": -2.0},
                                                              {"token": "token_id:4", "logprob": -0.5}]}]}}]}
    seen = []
    decoded = {(4, 5, 6): call_text + "\nafter the stop"}
    request = GenerationRequest("chat", MESSAGES, SamplingParams(n=2, logprobs=True, stop=("\n",)), [WEATHER],
                                tool_choice="auto")
    first, second = finished_choices(answer, request, lambda ids: decoded[tuple(ids)],
                                     lambda lp: seen.append(lp) or (), "v000002")
    assert rendered_ids(answer) == [1, 2, 3]
    assert (first.index, first.text, first.finish_reason, first.content) == (0, call_text, "stop", None)
    assert first.prompt_tokens == 3 and first.completion_tokens == 3 and first.adapter_version == "v000002"
    (call,) = first.tool_calls
    assert call["id"].startswith("call_") and call["function"] == {"name": "get_weather", "arguments": "{}"}
    assert json.loads(call["function"]["arguments"]) == {}
    # no calls: vLLM's content is the text (already cut at the stop string by vLLM), and the engine did parse
    assert (second.index, second.text, second.tool_calls, second.content) == (1, "Sunny.", (), None)
    assert seen[0]["content"][0]["token"] == "token_id:4"


def test_vllms_400s_name_the_field():
    err = '{"error": {"message": "tool_choice=\\"required\\" requires --tool-call-parser to be set", ' \
          '"type": "BadRequestError", "param": "tool_choice", "code": 400}}'
    assert _vllm_param(err) == "tool_choice"
    assert _vllm_param('{"error": {"message": "x", "param": "tool_choice.function.name"}}') == "tool_choice"
    assert _vllm_param("Invalid value for stop: not a string") == "stop"  # a word, not a letter in some other word
    assert _vllm_param('{"error": {"message": "the conversation cannot be rendered", "param": null}}') == "messages"
