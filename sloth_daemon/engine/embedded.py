"""Embedded engine: in-process generation with transformers + peft, for machines without vLLM.

Contract: see `sloth_daemon.engine.base`. How it keeps it:
- One worker thread owns the model. Generation requests and adapter loads/unloads are jobs on one queue, so the
  model is never mutated while it generates and requests never interleave (they are served in arrival order).
- Each request pins the adapter version current when `generate` is called; the worker activates that version
  (peft `set_adapter`, or `disable_adapter()` for the base model) before decoding it. Loaded adapters are counted
  by the requests pinned to them; the old one is unloaded only when its count drops to zero.
- Tokens stream from the worker to the caller's event loop through an asyncio queue; a caller that stops
  listening cancels its job at the next token.
- Decoding is our own loop over the model's forward (it pins the adapter per request and cancels per token, which
  transformers' `generate()` cannot); everything that picks the next token is transformers' own logits processors,
  built once per choice in `sampling.ChoiceSampler` (the one place a request's decoding state lives). The `n`
  choices of a request are decoded one after another and share its seeded generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch

from ..chat_template import ChatFormat, load_tokenizer
from ..prompting import encode, render_prompt
from .base import (
    AdapterLoadError,
    EngineError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    InvalidParam,
    ProbeResult,
    RequestTooLong,
    TextDelta,
    TokenLogprob,
)
from .guides import GuideCompiler
from .logprobs import TokenTexts, token_logprob
from .sampling import ChoiceSampler
from .stop_strings import StopStrings

log = logging.getLogger(__name__)

PROBE_PROMPT = "The quick brown fox"
SMALL_MODEL_PARAMS = 50_000_000


@dataclass
class _Job:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass
class _GenJob:
    request: GenerationRequest
    prompt_ids: list[int]
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class EmbeddedEngine:
    name = "embedded"

    def __init__(self, model_path: str | Path, *, model_name: str, device: str = "auto",
                 chat_template: str | None = None):
        self.model_path = Path(model_path)
        self.model_name = model_name
        self.chat_template = chat_template  # the config's Jinja file, if any (`sloth_daemon.chat_template`)
        self.chat_format: ChatFormat | None = None
        self.device = pick_device(device)
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._model: Any = None  # transformers model, wrapped in a PeftModel once an adapter is loaded
        self._tokenizer: Any = None
        self._current: str | None = None
        self._loaded: set[str] = set()
        self._pins: dict[str | None, int] = {}
        self._pins_changed = asyncio.Condition()
        self.max_model_len = 2048
        self.vocab_size = 0
        self._guide_compiler: GuideCompiler | None = None  # structured generation, built at first use
        self._guide_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        from transformers import AutoModelForCausalLM

        def load():
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._tokenizer, self.chat_format = load_tokenizer(self.model_path, self.chat_template)
            self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
            cfg = self._model.config
            self.max_model_len = getattr(cfg, "max_position_embeddings", None) or 2048
            self.vocab_size = int(self._model.get_output_embeddings().weight.shape[0])
            self._token_texts = TokenTexts(self._tokenizer)
            gen = getattr(self._model, "generation_config", None)
            eos = getattr(gen, "eos_token_id", None) if gen else None
            if eos is None:
                eos = self._tokenizer.eos_token_id
            self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
            # transformers renamed `past_key_values` to `cache` in 5.2x; speak whichever this version takes.
            params = inspect.signature(self._model.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
            if self.device.type == "cpu" and sum(p.numel() for p in self._model.parameters()) < SMALL_MODEL_PARAMS:
                # Token-by-token decoding of a small model is dominated by thread hand-offs: one thread is faster.
                torch.set_num_threads(1)

        await asyncio.to_thread(load)
        self._thread = threading.Thread(target=self._worker, name="embedded-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    @property
    def current_adapter(self) -> str | None:
        return self._current

    def in_flight(self) -> dict[str | None, int]:
        return {k: v for k, v in self._pins.items() if v}

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def _guides(self) -> GuideCompiler:
        """Built at the first guided request, not at start: importing xgrammar takes seconds (triton and its FFI)."""
        with self._guide_lock:
            if self._guide_compiler is None:
                self._guide_compiler = GuideCompiler(self._tokenizer, self.vocab_size, self._eos_ids)
            return self._guide_compiler

    # -- the worker -------------------------------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, _GenJob):
                self._run_generation(job)
                continue
            try:
                job.result = job.fn()
            except BaseException as e:  # reported to the waiting caller
                job.error = e
            job.done.set()

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread, after the jobs already queued."""
        job = _Job(fn)
        self._jobs.put(job)
        await asyncio.to_thread(job.done.wait)
        if job.error is not None:
            raise job.error
        return job.result

    @contextlib.contextmanager
    def _adapter_context(self, adapter: str | None):
        from peft import PeftModel

        if isinstance(self._model, PeftModel):
            if adapter is None:
                with self._model.disable_adapter():
                    yield
                return
            self._model.set_adapter(adapter)
        elif adapter is not None:
            raise EngineError(f"adapter {adapter} is not loaded")
        yield

    def _run_generation(self, job: _GenJob) -> None:
        emit = lambda ev: job.loop.call_soon_threadsafe(job.events.put_nowait, ev)  # noqa: E731
        try:
            with torch.inference_mode(), self._adapter_context(job.adapter):
                self._decode(job, emit)
        except BaseException as e:
            log.exception("generation failed")
            emit(EngineError(f"generation failed: {e}"))

    def _decode(self, job: _GenJob, emit: Callable[[Any], None]) -> None:
        p = job.request.params
        gen = torch.Generator(device=self.device)
        gen.manual_seed(p.seed if p.seed is not None else int(time.time_ns() % (2**63)))
        for index in range(p.n):  # the choices one after another, sharing the seeded generator
            guide = self._guides.processor(p.guide) if p.guide is not None else None
            sampler = ChoiceSampler(p, len(job.prompt_ids), gen, guide)
            if not self._decode_choice(job, index, sampler, emit):
                return

    def _decode_choice(self, job: _GenJob, index: int, sampler: ChoiceSampler, emit: Callable[[Any], None]) -> bool:
        """Generate choice `index`; False when the request was cancelled (no more choices then)."""
        p = job.request.params
        ids = torch.tensor([job.prompt_ids], device=self.device)
        seq = list(job.prompt_ids)
        past = None
        out_ids: list[int] = []
        stops = StopStrings(p.stop)  # holds back what may still become a stop string or is half a character
        finish, cut = "length", False
        text = ""
        lps = _LogprobTrack(self._token_texts) if p.logprobs else None
        for _ in range(p.max_tokens):
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            out = self._model(input_ids=ids, use_cache=True, **{self._cache_arg: past})
            past = getattr(out, self._cache_arg)
            tok, logprob, top = sampler.choose(torch.tensor([seq], device=self.device), out.logits[:, -1].float())
            if tok in self._eos_ids:
                finish = "stop"
                break
            out_ids.append(tok)
            seq.append(tok)
            ids = torch.tensor([[tok]], device=self.device)
            text = self._tokenizer.decode(out_ids, skip_special_tokens=True)
            if lps is not None:
                lps.add(tok, logprob, top, text)
            delta, stopped = stops.feed(text)
            if stopped:
                finish, cut = "stop", True
                got = lps.take_rest(len(stops.sent)) if lps else ()
                if delta or got:
                    emit(TextDelta(delta, index, got))
                break
            if delta:
                emit(TextDelta(delta, index, lps.take(len(stops.sent)) if lps else ()))
        if finish != "cancelled" and not cut:  # the end of sequence or the length limit: release what was held
            rest = stops.flush(text)
            got = lps.take_rest(len(stops.sent)) if lps else ()
            if rest or got:
                emit(TextDelta(rest, index, got))
        emit(Finished(stops.sent, finish, len(job.prompt_ids), len(out_ids), job.adapter, index,
                      tuple(lps.done) if lps else None))
        return finish != "cancelled"

    # -- requests -------------------------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> int:
        bad = [tok for tok, _ in request.params.logit_bias if not 0 <= tok < self.vocab_size]
        if bad:
            raise InvalidParam("logit_bias", f"logit_bias: token id {bad[0]} is not in the model's vocabulary "
                                             f"(0-{self.vocab_size - 1})")
        if request.params.guide is not None:
            self._guides.check(request.params.guide)
        n = len(encode(self._tokenizer, render_prompt(self._tokenizer, request.kind, request.prompt, request.tools)))
        if n + request.params.max_tokens > self.max_model_len:
            raise RequestTooLong(
                f"prompt ({n} tokens) + max_tokens ({request.params.max_tokens}) exceeds the model's context "
                f"length ({self.max_model_len})"
            )
        return n

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        prompt_ids = encode(self._tokenizer, render_prompt(self._tokenizer, request.kind, request.prompt, request.tools))
        self.validate(request)
        adapter = self._current  # pinned now: a swap after this point does not change this request
        self._pins[adapter] = self._pins.get(adapter, 0) + 1
        job = _GenJob(request, prompt_ids, adapter, asyncio.get_running_loop(), asyncio.Queue())
        try:
            self._jobs.put(job)
            left = request.params.n
            while True:
                ev = await job.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if isinstance(ev, Finished):
                    left -= 1
                    if left == 0 or ev.finish_reason == "cancelled":
                        return
        finally:
            job.cancelled.set()
            self._pins[adapter] -= 1
            async with self._pins_changed:
                self._pins_changed.notify_all()

    # -- adapters -------------------------------------------------------------------------------------------------
    def _load(self, version: str, path: Path) -> None:
        from peft import PeftModel

        if isinstance(self._model, PeftModel):
            self._model.load_adapter(str(path), adapter_name=version, is_trainable=False)
        else:
            self._model = PeftModel.from_pretrained(self._model, str(path), adapter_name=version, is_trainable=False)
        self._model.eval()
        self._loaded.add(version)

    def _unload(self, version: str) -> None:
        if version not in self._loaded:
            return
        self._loaded.discard(version)
        if not self._loaded:
            # peft keeps pointing at a deleted last adapter; go back to the bare model instead.
            self._model = self._model.unload()
            return
        if version in self._model.active_adapters:
            self._model.set_adapter(next(iter(self._loaded)))
        self._model.delete_adapter(version)

    def _probe(self, version: str | None) -> ProbeResult:
        """Compare the logits with the adapter against the base model's on a fixed prompt."""
        ids = torch.tensor([encode(self._tokenizer, PROBE_PROMPT)], device=self.device)
        with torch.inference_mode():
            with self._adapter_context(None):
                base = self._model(input_ids=ids).logits.float()
            if version is None:
                return ProbeResult(True, "base model")
            with self._adapter_context(version):
                tuned = self._model(input_ids=ids).logits.float()
        diff = (tuned - base).abs().max().item()
        return ProbeResult(diff > 1e-6, f"max |logit difference| vs base = {diff:.3g}")

    async def swap_adapter(self, version: str | None, path: Path | None) -> ProbeResult:
        old = self._current
        if version == old:
            return ProbeResult(True, "already current")
        if version is not None:
            if version not in self._loaded:
                try:
                    await self._call(lambda: self._load(version, Path(path)))
                except Exception as e:
                    raise AdapterLoadError(f"loading {version} failed: {e}") from e
            probe = await self._call(lambda: self._probe(version))
            if not probe.applied:
                await self._call(lambda: self._unload(version))
                raise AdapterLoadError(f"{version} loaded but not applied ({probe.detail})")
        else:
            probe = ProbeResult(True, "base model")
        self._current = version  # the flip: requests from now on pin the new version
        if old is not None:
            async with self._pins_changed:
                await self._pins_changed.wait_for(lambda: self._pins.get(old, 0) == 0)
            if self._current != old:
                await self._call(lambda: self._unload(old))
        return probe

    async def loss_probe(self, fn: Callable[[Any, Any], Any]) -> Any:
        """Run `fn(model, tokenizer)` on the worker thread (used for anchor generation at first start)."""
        return await self._call(lambda: fn(self._model, self._tokenizer))


class _LogprobTrack:
    """Attaches each generated token's logprob to the delta that completes its text.

    A byte-level token may end inside a UTF-8 character (the decoded text then ends in U+FFFD); its text end is
    known once the character is whole, so ends are assigned when the decoded text is stable.
    """

    def __init__(self, texts: TokenTexts):
        self.texts = texts
        self.pending: list[tuple[int, float, list, int | None]] = []  # (id, logprob, top, end)
        self.done: list[TokenLogprob] = []
        self.offset = 0

    def add(self, token: int, logprob: float | None, top: list, text: str) -> None:
        self.pending.append((token, float(logprob or 0.0), top, None))
        if not text.endswith("\ufffd"):
            self.pending = [(t, lp, tp, len(text) if end is None else end) for t, lp, tp, end in self.pending]

    def take(self, upto: int) -> tuple[TokenLogprob, ...]:
        """The tokens whose text ends at or before character `upto`."""
        out = []
        while self.pending and self.pending[0][3] is not None and self.pending[0][3] <= upto:
            out.append(self._emit(self.pending.pop(0)))
        return tuple(out)

    def take_rest(self, length: int) -> tuple[TokenLogprob, ...]:
        """At the end of a choice: every remaining token that starts inside its `length` characters of text."""
        out = []
        while self.pending and self.offset < length:
            out.append(self._emit(self.pending.pop(0)))
        self.pending.clear()
        return tuple(out)

    def _emit(self, item: tuple[int, float, list, int | None]) -> TokenLogprob:
        token, logprob, top, end = item
        lp = token_logprob(self.texts, token, logprob, top, self.offset)
        self.offset = end if end is not None else self.offset
        self.done.append(lp)
        return lp
