"""A whole training step (forward, backward, optimizer step) replayed as one CUDA graph per input shape.

Why: with these kernels a QLoRA step of an 8B model at a few thousand tokens is host-bound (docs/kernels.md: the GPU
works ~0.32 s of a ~0.4 s step; the rest is the Python and launch cost of ~4000 kernel calls). A CUDA graph records
the step's kernels once and replays them with one host call, so the step runs at the GPU's pace. Shapes are static
in a graph, so there is one graph per input shape: a length bucket, for a trainer that packs rows to a fixed length.

Contract
--------
`GraphedStep(model, optimizer, warmup_steps=2)`; `step(**batch) -> loss` runs one training step on `batch` (the
model's keyword arguments: tensors, e.g. input_ids, labels, position_ids) and returns the loss as a 0-d device tensor
(for a replayed step, the graph's own output tensor, overwritten by the next step of the same shape: read it before).
- The first `warmup_steps` steps of each shape run eagerly (real training steps, on a side stream as torch's
  documentation asks: they compile Triton kernels, create the optimizer state, fill the pinned-buffer pool of the
  offload); the next one is captured and then replayed, and every later step of that shape copies the batch into
  the graph's static inputs and replays. The graph's memory pool is its own; the cached blocks of the eager steps
  are handed back (`torch.cuda.empty_cache`) before capture so that they are not held twice.
- The optimizer must be capturable (`torch.optim.AdamW(..., capturable=True)`; its state on the device), and the
  step must not read device values on the host: `patch_model`'s kernels, checkpointing (offload too) and fused
  loss are capture-safe. Transformers' check for packed rows (`find_packed_sequence_indices`, a host sync) is
  decided per graph instead: rows count as packed when the batch passes `position_ids` (the mask is then built on
  the device from them at every replay), as unpacked otherwise.
- Gradients are the graph's: each replay writes them anew (no accumulation across steps) and the captured
  optimizer step reads them, so the caller neither zeroes them nor steps the optimizer. LR schedules that change
  `lr` need a tensor lr (torch's capturable optimizers accept one).
- When the capture fails (something in the step syncs with the host), the shape falls back to eager steps for good,
  with a warning; `fallbacks` holds the reasons by shape. On a model not on CUDA every step is eager.

Source: the "whole network capture" recipe of torch.cuda.graph
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs).
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _packed_rows_decided(packed: bool):
    """Transformers' packed-rows detection without its host sync: always the mask (packed) or never (unpacked)."""
    try:
        import transformers.masking_utils as masking
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        yield
        return
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def decided(position_ids):
        if not packed:
            return None
        first = position_ids[:, :1] - 1
        return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

    masking.find_packed_sequence_indices = decided
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


class _Graph:
    __slots__ = ("graph", "inputs", "loss")

    def __init__(self, graph, inputs, loss):
        self.graph, self.inputs, self.loss = graph, inputs, loss


class GraphedStep:
    """One training step per call, replayed from a CUDA graph per input shape; see the module docstring."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, warmup_steps: int = 2):
        self.model, self.optimizer, self.warmup_steps = model, optimizer, warmup_steps
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: dict[tuple, int] = {}
        self.fallbacks: dict[tuple, str] = {}
        self._side: torch.cuda.Stream | None = None

    @staticmethod
    def _key(batch: dict) -> tuple:
        return tuple(sorted((k, tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else (k, v)
                            for k, v in batch.items()))

    def _eager(self, batch: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, **batch) -> torch.Tensor:
        tensors = [v for v in batch.values() if torch.is_tensor(v)]
        if not tensors or not tensors[0].is_cuda:
            return self._eager(batch)
        key = self._key(batch)
        cached = self.graphs.get(key)
        if cached is not None:
            for name, value in batch.items():
                if torch.is_tensor(value):
                    cached.inputs[name].copy_(value, non_blocking=True)
            cached.graph.replay()
            return cached.loss
        if key in self.fallbacks:
            return self._eager(batch)
        seen = self.seen.get(key, 0)
        self.seen[key] = seen + 1
        if seen < self.warmup_steps:
            if self._side is None:
                self._side = torch.cuda.Stream()
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                loss = self._eager(batch)
            torch.cuda.current_stream().wait_stream(self._side)
            return loss
        return self._capture(key, batch)

    def _capture(self, key: tuple, batch: dict) -> torch.Tensor:
        inputs = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks: not to be held beside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with _packed_rows_decided("position_ids" in batch), torch.cuda.graph(graph):
                loss = self.model(**inputs).loss
                loss.backward()
                self.optimizer.step()
        except Exception as exc:  # noqa: BLE001 - any failure to capture means: run this shape eagerly
            reason = f"{type(exc).__name__}: {exc}"
            self.fallbacks[key] = reason
            logger.warning("sloth_kernels: CUDA graph capture failed, eager steps for this shape: %s", reason)
            del graph
            torch.cuda.synchronize()
            return self._eager(batch)
        cached = _Graph(graph, inputs, loss.detach())
        self.graphs[key] = cached
        graph.replay()  # the captured step has not run yet: this is it
        return cached.loss
