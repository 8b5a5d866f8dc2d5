"""Embedded engine: in-process generation with transformers + peft, for machines without vLLM.

Contract: see `sloth_daemon.engine.base`. How it keeps it:
- One worker thread owns the model. Requests and adapter loads/unloads/probes are jobs on one queue; the worker
  runs the other jobs between two decoding steps, so the model is never mutated inside a forward.
- Concurrent requests are batched (continuous batching, `batching.BatchDecoder`): a request that arrives while
  others decode is prefilled and joins the running batch at the next step; one forward per step decodes a token
  for every request. A request's text is its own (rows never mix) and equals what it gets when served alone, up to
  floating-point ties.
- Each request pins the adapter version current when `generate` is called; each batch row carries its version to
  peft's per-row `adapter_names`, so a swap never changes an in-flight request's adapter. Loaded adapters are
  counted by the requests pinned to them; the old one is unloaded only when its count drops to zero.
- Tokens stream from the worker to the caller's event loop through an asyncio queue (handed over once per decoding
  step for all of a loop's requests); a caller that stops listening cancels its request, which leaves the batch at the next step without disturbing the others.
- The base is the checkpoint's weights (bf16 on CUDA, fp32 on CPU) or, with `quantization="nf4"`, bitsandbytes'
  4-bit NF4 copy (`sloth_daemon.nf4`, the config the trainer quantises with: ~4.1 bits per linear weight instead of 16);
  adapters then load onto peft's LoRA layers for bitsandbytes' `Linear4bit`, with the same per-row pinning.
- Everything that picks the next token is transformers' own logits processors, built once per choice in
  `sampling.ChoiceSampler`; a choice's text, stop strings and logprobs are `choice.ChoiceStream`'s. The `n` choices
  of a request decode side by side as rows of the batch and share its seeded generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch

from ..chat_template import ChatFormat, load_tokenizer
from ..nf4 import device_map, keep_plain_layout, nf4_config
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
)
from .batching import BatchDecoder, BatchRequest
from .guides import GuideCompiler
from .logprobs import TokenTexts

log = logging.getLogger(__name__)

PROBE_PROMPT = "The quick brown fox"
SMALL_MODEL_PARAMS = 50_000_000
QUANTIZATIONS = ("none", "nf4")  # how the base is held: as the checkpoint (bf16 on CUDA, fp32 on CPU), or NF4
SWITCH_INTERVAL_S = 0.0005  # the interpreter's GIL switch interval while the engine runs (see `start`)


@dataclass
class _Job:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class _Outbox:
    """Events from the worker thread to the callers' event loops, handed over once per decoding step: one wake-up
    of a loop per step for all its requests' events, not one per token and request. A closed loop (its callers are
    gone) drops them."""

    def __init__(self):
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}

    def emitter(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[Any], None]:
        return lambda ev: self._pending.setdefault(loop, []).append((events, ev))  # worker thread only

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for events, ev in items:
        events.put_nowait(ev)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class EmbeddedEngine:
    name = "embedded"

    def __init__(self, model_path: str | Path, *, model_name: str, device: str = "auto",
                 chat_template: str | None = None, max_batch_rows: int = 32, quantization: str = "none"):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
        self.model_path = Path(model_path)
        self.quantization = quantization  # "nf4": the base served from bitsandbytes' 4-bit NF4 (`sloth_daemon.nf4`)
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
        self._decoder: BatchDecoder | None = None  # the worker thread's
        self._outbox = _Outbox()
        self.max_batch_rows = max_batch_rows  # choices decoded in one batch; more wait for a free row

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        from transformers import AutoModelForCausalLM

        def load():
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self._tokenizer, self.chat_format = load_tokenizer(self.model_path, self.chat_template)
            if self.quantization == "nf4":
                # Placed while loading (a 4-bit model is not moved afterwards). On CPU without bitsandbytes' bf16
                # repack (`nf4.keep_plain_layout`): fp32 compute, the numerics the trainer's gate judged.
                self._model = keep_plain_layout(AutoModelForCausalLM.from_pretrained(
                    self.model_path, dtype=dtype, quantization_config=nf4_config(dtype),
                    device_map=device_map(self.device))).eval()
            else:
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
            if self.device.type == "cuda":
                # cuDNN's attention backend costs ~2.6 ms of host time per layer call when decoding (a new key length
                # every step); without it PyTorch picks flash / memory-efficient attention. 16 concurrent clients on
                # the 8B shape on an H200: 328 tokens/s against 104 with it (docs/gpu-notes.md, run 19). The trainer
                # is another process and keeps its own choice.
                torch.backends.cuda.enable_cudnn_sdp(False)
            if SWITCH_INTERVAL_S < sys.getswitchinterval():
                # The worker holds the GIL between its torch calls; at the default 5 ms switch interval the event
                # loop waits up to 5 ms each time it wants the GIL back (after every socket call), which under
                # load multiplies the HTTP path's latency (the convoy effect).
                sys.setswitchinterval(SWITCH_INTERVAL_S)
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
    def batch_rows(self) -> int:
        """Choices being decoded in the running batch now (0 when idle)."""
        return self._decoder.running if self._decoder is not None else 0

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
        """Between two batched decoding steps: run queued jobs, admit new requests; block only when idle."""
        decoder = self._decoder = BatchDecoder(lambda: self._model, self._tokenizer, self._token_texts,
                                               self._eos_ids, self.device, max_rows=self.max_batch_rows,
                                               flush=self._outbox.flush)
        stopping = False
        while True:
            jobs = []
            if not decoder.busy and not stopping:
                jobs.append(self._jobs.get())
            while True:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            fresh = []
            for job in jobs:
                if job is None:
                    stopping = True  # requests already queued or decoding still finish
                elif isinstance(job, BatchRequest):
                    fresh.append(job)
                else:
                    self._run_job(job)
            try:
                if fresh or decoder.waiting:
                    decoder.admit(fresh)
                if decoder.running:
                    decoder.step()
            except Exception as e:  # a bug in the bookkeeping: fail what is in flight, keep serving
                log.exception("batched decoding failed")
                for req in fresh:  # those not in the batch yet too (the first error event ends a request)
                    req.emit(EngineError(f"generation failed: {e}"))
                decoder.fail_all(EngineError(f"generation failed: {e}"))
            if stopping and not decoder.busy:
                return

    @staticmethod
    def _run_job(job: _Job) -> None:
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

    # -- requests -------------------------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        bad = [tok for tok, _ in request.params.logit_bias if not 0 <= tok < self.vocab_size]
        if bad:
            raise InvalidParam("logit_bias", f"logit_bias: token id {bad[0]} is not in the model's vocabulary "
                                             f"(0-{self.vocab_size - 1})")
        if request.params.guide is not None:
            self._guides.check(request.params.guide)
        ids = encode(self._tokenizer, render_prompt(self._tokenizer, request.kind, request.prompt, request.tools))
        n = len(ids)
        if n + request.params.max_tokens > self.max_model_len:
            raise RequestTooLong(
                f"prompt ({n} tokens) + max_tokens ({request.params.max_tokens}) exceeds the model's context "
                f"length ({self.max_model_len})"
            )
        return dataclasses.replace(request, prompt_ids=tuple(ids))

    def validate(self, request: GenerationRequest) -> int:
        return len(self.prepare(request).prompt_ids or ())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.prompt_ids is None:
            request = self.prepare(request)
        prompt_ids = list(request.prompt_ids or ())
        adapter = self._current  # pinned now: a swap after this point does not change this request
        self._pins[adapter] = self._pins.get(adapter, 0) + 1
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        guide = request.params.guide
        job = BatchRequest(prompt_ids, adapter, request.params, self._outbox.emitter(loop, events), threading.Event(),
                           (lambda: self._guides.processor(guide)) if guide is not None else None)
        try:
            self._jobs.put(job)
            left = request.params.n
            while True:
                ev = await events.get()
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

