"""Continuous batching for the embedded engine: every request in flight decodes in one batched forward per token.

Contract:
- `BatchDecoder(...)` owns the running batch: one row per choice being decoded, with a shared left-padded KV cache
  (a transformers `DynamicCache`, keys/values [rows, kv_heads, length, head_dim]) and the attention mask
  (LongTensor [rows, length], 0 over each row's left padding). Only the thread that owns the model calls it.
- `admit(requests)` prefills new requests, shortest prompts first, in groups of similar length (each group's prompts
  left-padded into one forward), picks each choice's first token at once and merges the new rows into the running
  batch (the shorter side is left-padded). A request with `n`
  choices is prefilled once and its cache row repeated n times; its choices share its seeded generator.
- `step()` decodes one token for every row in one forward (input ids [rows, 1], each row's own position id), then
  lets each row's `ChoiceStream` pick and emit. Rows whose choice ended or whose request was cancelled leave the
  batch at once (`cancelled` set: "cancelled" `Finished`, the other rows go on undisturbed); the padding no row
  needs any more is trimmed off the cache.
- Each row is pinned to its request's adapter version: when the batch's rows use different versions, the forward
  gets peft's per-row `adapter_names` (mixed-batch LoRA inference: each row's LoRA delta is its own adapter's,
  "__base__" adds none); when they all use one, that adapter is made active (or all adapters disabled, for the base)
  for the forward. Either way, loading, probing or unloading another adapter between steps never changes a row's
  adapter.
- Errors: a failing forward fails every request in it with `EngineError` (the batch is dropped, the engine goes
  on); a failing choice (e.g. its structured-generation processor) fails that request alone.

Why our own scheduler rather than transformers' continuous batching (`generate_batch` / `init_continuous_batching`,
transformers 5.x): it packs every request into one flat paged-attention row, so peft's per-row `adapter_names`
cannot pin a request to its adapter version, and its per-request sampling covers temperature/top-k/top-p only (no
logits processors of our own: OpenAI penalties, logit bias, xgrammar guides; no seeded per-request generator; no
top logprobs). Here everything that picks a token is still transformers' own processors (`sampling.ChoiceSampler`);
what is ours is only the bookkeeping of a padded batch that rows join and leave between steps.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .base import EngineError, SamplingParams
from .choice import ChoiceStream
from .logprobs import TokenTexts
from .sampling import ChoiceSampler

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in `adapter_names`
PREFILL_PAD_TOKENS = 64  # padding one prefill forward may carry (see `_length_groups`)


@dataclass
class BatchRequest:
    """One generation request as the decoder sees it. `emit` delivers an event (or an `EngineError`) to the caller
    from the decoding thread; `cancelled` is set by the caller when it stops listening; `guide` builds a fresh
    structured-generation logits processor for one choice (None: the request has no guide)."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[Any], None]
    cancelled: threading.Event
    guide: Callable[[], Any] | None = None


class _Row:
    __slots__ = ("request", "choice", "position", "last")

    def __init__(self, request: BatchRequest, choice: ChoiceStream, position: int, last: int):
        self.request = request
        self.choice = choice
        self.position = position  # the position id of the token fed next (= real tokens in the cache)
        self.last = last  # the token fed next


class BatchDecoder:
    """See the module docstring. `model_fn()` returns the current model (a peft wrapper appears and goes as
    adapters load and unload); `max_rows` bounds the batch (requests beyond it wait for rows to free); `flush()` is
    called when a prefill group or a step has emitted its events (callers may buffer `emit`s until then)."""

    def __init__(self, model_fn: Callable[[], Any], tokenizer: Any, texts: TokenTexts, eos_ids: set[int],
                 device: torch.device, *, max_rows: int = 32, flush: Callable[[], None] = lambda: None):
        self._model_fn = model_fn
        self._tokenizer = tokenizer
        self._texts = texts
        self._eos_ids = eos_ids
        self._device = device
        self.max_rows = max_rows
        self._flush = flush
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = int(pad if pad is not None else next(iter(eos_ids), 0))
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self.waiting: list[BatchRequest] = []  # admitted when rows are free
        params = inspect.signature(model_fn().forward).parameters
        # transformers renamed `past_key_values` to `cache` in 5.2x; speak whichever this version takes.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" in params

    @property
    def running(self) -> int:
        """Rows being decoded."""
        return len(self._rows)

    @property
    def busy(self) -> bool:
        return bool(self._rows or self.waiting)

    # -- the forward ------------------------------------------------------------------------------------------------
    def _forward(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 adapters: list[str | None]) -> torch.Tensor:
        """Logits of the last position, FloatTensor [rows, vocab] (float32)."""
        from peft import PeftModel

        kwargs: dict[str, Any] = {self._cache_arg: cache}
        if self._keep_arg:
            kwargs["logits_to_keep"] = 1
        uniform = len(set(adapters)) == 1
        scope: Any = contextlib.nullcontext()
        if isinstance(model, PeftModel):
            if not uniform:  # peft's mixed-batch LoRA: each row its own adapter's delta
                kwargs["adapter_names"] = [a if a is not None else BASE_ADAPTER for a in adapters]
            elif adapters[0] is None:
                scope = model.disable_adapter()
            elif model.active_adapter != adapters[0]:
                model.set_adapter(adapters[0])
            # One adapter for every row (nearly always: rows differ only while a swap drains): peft's plain forward.
            # The mixed-batch path indexes each LoRA layer's rows with Python lists (a host-to-device copy per
            # layer) and hooks every module per call; on the 8B shape on an H200 that made decoding with an
            # adapter several times slower than without (benchmarks/bench_loop.py, docs/gpu-notes.md run 19).
        elif any(a is not None for a in adapters):
            raise EngineError(f"adapter {next(a for a in adapters if a is not None)} is not loaded")
        with scope:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1].float()

    # -- joining ----------------------------------------------------------------------------------------------------
    def admit(self, requests: list[BatchRequest]) -> None:
        """Prefill `requests` (and those waiting for rows) and add their choices to the batch."""
        self.waiting.extend(requests)
        fresh: list[BatchRequest] = []
        rows = len(self._rows)
        while self.waiting and (rows + self.waiting[0].params.n <= self.max_rows or rows == 0):
            req = self.waiting.pop(0)
            if req.cancelled.is_set():
                _cancel_unstarted(req)
                continue
            fresh.append(req)
            rows += req.params.n
        for group in _length_groups(fresh):
            self._admit_group(group)
            self._flush()  # this group's first tokens go out before the next group's prefill
        self._flush()

    def _admit_group(self, fresh: list[BatchRequest]) -> None:
        try:
            logits, cache, mask = self._prefill(fresh)
        except Exception as e:
            for req in fresh:
                req.emit(EngineError(f"generation failed: {e}"))
            return
        keep: list[int] = []  # the prefill row each new batch row copies
        new_rows: list[_Row] = []
        for i, req in enumerate(fresh):
            try:
                chosen = self._start_choices(req, logits[i:i + 1])
            except Exception as e:
                req.emit(EngineError(f"generation failed: {e}"))
                continue
            for row in chosen:
                keep.append(i)
                new_rows.append(row)
        if new_rows:
            index = torch.tensor(keep, device=self._device)
            cache.batch_select_indices(index)
            self._merge(new_rows, cache, mask[index])

    def _prefill(self, requests: list[BatchRequest]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        from transformers import DynamicCache

        longest = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()  # plain full-attention layers: rows of any length can be padded and stacked
        with torch.inference_mode():
            logits = self._forward(self._model_fn(), ids, mask, positions, cache, [r.adapter for r in requests])
        return logits, cache, mask

    def _start_choices(self, req: BatchRequest, logits: torch.Tensor) -> list[_Row]:
        """The request's choices, each with its first token chosen from the prompt's `logits` [1, vocab]."""
        p = req.params
        gen = torch.Generator(device=self._device)
        gen.manual_seed(p.seed if p.seed is not None else int(time.time_ns() % (2**63)))
        rows = []
        for index in range(p.n):
            guide = req.guide() if req.guide is not None else None
            sampler = ChoiceSampler(p, len(req.prompt_ids), gen, guide)
            choice = ChoiceStream(index, sampler, p, req.prompt_ids, req.adapter, self._tokenizer, self._texts,
                                  self._eos_ids, req.emit)
            if choice.done:  # max_tokens 0
                continue
            tok, lp, top = sampler.choose(torch.tensor([choice.seq], device=self._device), logits)
            if not choice.add(tok, lp, top):
                rows.append(_Row(req, choice, len(req.prompt_ids), tok))
        return rows

    def _merge(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        old, new = self._mask.shape[1], mask.shape[1]
        length = max(old, new)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            if not getattr(mine, "is_initialized", False):
                continue
            mine.keys = torch.cat([_left_pad(mine.keys, length - old), _left_pad(theirs.keys, length - new)])
            mine.values = torch.cat([_left_pad(mine.values, length - old), _left_pad(theirs.values, length - new)])
        self._mask = torch.cat([F.pad(self._mask, (length - old, 0)), F.pad(mask, (length - new, 0))])
        self._rows += rows

    # -- decoding ---------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One token for every row (cancelled rows leave first)."""
        self._drop([i for i, r in enumerate(self._rows) if r.request.cancelled.is_set()], cancel=True)
        if not self._rows:
            self._flush()
            return
        rows = self._rows
        ids = torch.tensor([[r.last] for r in rows], device=self._device)
        positions = torch.tensor([[r.position] for r in rows], device=self._device)
        mask = F.pad(self._mask, (0, 1), value=1)
        try:
            with torch.inference_mode():
                logits = self._forward(self._model_fn(), ids, mask, positions, self._cache,
                                       [r.request.adapter for r in rows])
        except Exception as e:
            self.fail_all(EngineError(f"generation failed: {e}"))
            return
        self._mask = mask
        plain = [i for i, r in enumerate(rows) if r.choice.sampler.plain_greedy]
        argmax = dict(zip(plain, logits[plain].argmax(-1).tolist())) if plain else {}
        ended, failed = [], set()
        for i, row in enumerate(rows):
            if row.request.cancelled.is_set() or id(row.request) in failed:
                continue
            try:
                if i in argmax:
                    tok, lp, top = argmax[i], None, []
                else:
                    tok, lp, top = row.choice.sampler.choose(
                        torch.tensor([row.choice.seq], device=self._device), logits[i:i + 1])
                row.position += 1
                row.last = tok
                if row.choice.add(tok, lp, top):
                    ended.append(i)
            except Exception as e:
                failed.add(id(row.request))
                row.request.emit(EngineError(f"generation failed: {e}"))
        ended += [i for i, r in enumerate(rows) if id(r.request) in failed]
        self._drop(ended, cancel=False)
        self._flush()

    def _drop(self, indices: list[int], cancel: bool) -> None:
        if not indices:
            return
        gone = set(indices)
        for i in gone:
            if cancel:
                self._rows[i].choice.cancel()
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._device)
        self._cache.batch_select_indices(index)
        mask = self._mask[index]
        lead = int((mask.cumsum(-1) == 0).sum(-1).min())  # padding that every remaining row has
        if lead:
            mask = mask[:, lead:]
            for layer in self._cache.layers:
                if getattr(layer, "is_initialized", False):
                    layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
        self._mask = mask

    def fail_all(self, error: BaseException) -> None:
        """End every request in the batch and waiting with `error` (e.g. a forward failed)."""
        seen: set[int] = set()
        for row in self._rows:
            if id(row.request) not in seen:
                seen.add(id(row.request))
                row.request.emit(error)
        for req in self.waiting:
            req.emit(error)
        self._rows, self._cache, self._mask, self.waiting = [], None, None, []
        self._flush()


def _length_groups(requests: list[BatchRequest]) -> list[list[BatchRequest]]:
    """`requests` in prefill groups, shortest prompts first: a request joins the group before it while the group's
    left padding stays under `PREFILL_PAD_TOKENS` (one forward's fixed cost, in tokens: padding below it is cheaper
    than another forward; above it a long prompt would multiply the short ones' cost)."""
    groups: list[list[BatchRequest]] = []
    real = 0
    for req in sorted(requests, key=lambda r: len(r.prompt_ids)):
        n = len(req.prompt_ids)
        if groups and (len(groups[-1]) + 1) * n - (real + n) <= PREFILL_PAD_TOKENS:
            groups[-1].append(req)
            real += n
        else:
            groups.append([req])
            real = n
    return groups


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` [rows, heads, length, dim] with `n` zero positions added on the left of `length`."""
    return F.pad(t, (0, 0, n, 0)) if n else t


def _cancel_unstarted(req: BatchRequest) -> None:
    from .base import Finished

    for index in range(req.params.n):
        req.emit(Finished("", "cancelled", len(req.prompt_ids), 0, req.adapter, index, None))
