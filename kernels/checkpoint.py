"""Activation checkpointing for decoder layers: recompute, optionally with the saved inputs offloaded to the host.

Contract
--------
`checkpoint_layer(layer_forward, *args, offload=False, **kwargs)` returns `layer_forward(*args, **kwargs)` and, when
grad is enabled, keeps none of the layer's intermediate activations: the backward re-runs the layer (same CPU and
CUDA RNG state, so dropout masks are replayed; same autocast state) and backpropagates through the re-run. Built on
`torch.utils.checkpoint` in non-reentrant mode, so kwargs (position_embeddings, attention_mask, position_ids, ...)
may be tensors, even ones that require grad, and the layer input need not require grad (frozen embeddings + LoRA).

What is kept per layer between forward and backward (the memory contract):
- recompute (`offload=False`): the layer's positional inputs (for a decoder layer, the hidden state [B, T, H] in the
  compute dtype, on the device), references to the kwargs (position_embeddings, masks: the same tensors for every
  layer, so stored once) and the RNG states (a few KB on the host).
- offload (`offload=True`, CUDA tensors): the floating-point positional inputs are copied to pinned host memory
  on a side CUDA stream while the layer computes (device-to-host, asynchronous); the device keeps no per-layer
  tensor. In the backward, when a layer starts its recompute it waits for its own input (already on its way) and
  starts the host-to-device copy of the layer before it (the next one the backward reaches), so the copy overlaps
  the recompute and backward of the current layer. Device memory then holds at most two layer inputs at a time.
  The streams meet through events only (the compute stream waits for a layer's device-to-host copy at the end of
  that layer's forward), and the pinned host buffers are reused from step to step, so a step with offload can be
  captured in a CUDA graph once a warm-up step of the same shape has run (`sloth_kernels.graph_step`).
  On CPU tensors there is nothing to offload to: `offload=True` is plain recompute.
- RNG: the CPU and CUDA RNG states are saved and restored around the re-run, except under CUDA graph capture,
  where they cannot be read (the recipes patched here run no dropout).
- during the backward, one layer's activations exist at a time (the re-run), as with any checkpointing.

`enable_checkpointing(model, offload=False)` checkpoints every decoder layer of a Hugging Face causal LM
(`model.model.layers`; also a peft-wrapped model, or the bare `*Model` with `.layers`) and returns how many layers it
wrapped; `disable_checkpointing(model)` undoes it. Transformers' own layers (`GradientCheckpointingLayer`) are
switched through their checkpointing hook, so transformers keeps its behaviour: only in training mode with grad
enabled, and the KV cache is turned off while checkpointing. Call it after anything that calls
`gradient_checkpointing_enable` (e.g. peft's `prepare_model_for_kbit_training`), which would replace the hook.

`recomputing()` is True while a layer run by `checkpoint_layer` is being re-run for its backward (in the thread
that runs it), False otherwise. Ops use it to skip work whose value only the first run needs: e.g. `lora_mlp` skips
the down projection's GEMM in a re-run when the layer adds the MLP output straight to the residual (autograd needs
that node and its saved inputs, not its output: nothing after it saves a tensor for the backward).

`offload_stats()` / `reset_offload_stats()` count what the offload did (tensors, bytes, pinned buffers allocated,
fetches, fetches that were prefetched ahead), for tests and benchmarks.
"""

import contextvars
import functools
import threading
import weakref

import torch
from torch.utils.checkpoint import checkpoint

# Test hook: run the offload bookkeeping on CPU tensors too (host "copies" are clones), so CPU CI covers it.
_OFFLOAD_ON_CPU = False

_STAT_KEYS = ("offloaded", "bytes", "pinned", "fetched", "prefetched")
_stats = dict.fromkeys(_STAT_KEYS, 0)
_local = threading.local()  # the most recently offloaded input, to chain prefetches in backward order
_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}
# None outside checkpointed layers; False in a checkpointed layer's forward; True in its re-run.
_RECOMPUTING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("sloth_recomputing", default=None)


def recomputing() -> bool:
    """True inside the backward's re-run of a layer checkpointed by `checkpoint_layer`."""
    return bool(_RECOMPUTING.get())


def checkpointed() -> bool:
    """True in either run (forward or re-run) of a layer checkpointed by `checkpoint_layer`: what an op saves for
    its backward there is handed to that backward by torch's checkpoint from a fresh re-run, once, so the backward
    may overwrite it in place."""
    return _RECOMPUTING.get() is not None


def _marking_reruns(layer_forward):
    """layer_forward, with `recomputing()` True in every call after the first (the first is the forward)."""
    calls = 0

    def run(*args, **kwargs):
        nonlocal calls
        token = _RECOMPUTING.set(calls > 0)
        calls += 1
        try:
            return layer_forward(*args, **kwargs)
        finally:
            _RECOMPUTING.reset(token)

    return run


def offload_stats() -> dict[str, int]:
    return dict(_stats)


def reset_offload_stats() -> None:
    """Zero the counters and drop the pooled pinned buffers (the next offloads allocate, and count, anew)."""
    _stats.update(dict.fromkeys(_STAT_KEYS, 0))
    _host_buffers.clear()


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    # GPU notes: one copy stream per device, shared by all layers: copies run in issue order, which is exactly
    # the order they are needed in (layer order in the forward, reverse order in the backward).
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class _HostBuffers:
    """Pinned host buffers for offloaded inputs, kept and reused by shape and dtype.

    Reused rather than allocated per layer and step: a training step then allocates no pinned memory once warm,
    which is what lets a step with offload be captured in a CUDA graph (`sloth_kernels.graph_step`; pinned
    allocation is not allowed during capture), and saves the host allocator's bookkeeping per layer. A buffer is
    taken in the forward and given back when its input holder is freed (after the layer's backward); every copy that
    reads or writes these buffers runs on the one side stream, in issue order, so a buffer given back cannot be
    overwritten before the copy that reads it.
    """

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lock = threading.Lock()

    def take(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        with self.lock:
            bucket = self.free.get(key)
            if bucket:
                return bucket.pop()
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("offload under CUDA graph capture needs its pinned buffers from a warm-up step "
                               f"of the same shape ({tuple(x.shape)} {x.dtype})")
        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        _stats["pinned"] += int(buf.is_pinned())
        return buf

    def give_back(self, buf: torch.Tensor) -> None:
        with self.lock:
            self.free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


_host_buffers = _HostBuffers()


class _OffloadedInput:
    """One layer input: the device tensor during the forward, a host copy afterwards, brought back for the re-run."""

    def __init__(self, x: torch.Tensor):
        self.device, self.dtype, self.shape = x.device, x.dtype, x.shape
        self.requires_grad = x.requires_grad
        self.forward_value: torch.Tensor | None = x  # what the first (forward) run computes with
        self.prefetched: torch.Tensor | None = None
        self.ready: "torch.cuda.Event | None" = None
        self.copied: "torch.cuda.Event | None" = None
        if x.is_cuda:
            stream = _side_stream(x.device)
            self.host = _host_buffers.take(x)
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is produced on the compute stream
            with torch.cuda.stream(stream):
                self.host.copy_(x.detach(), non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(stream)
        else:
            self.host = x.detach().clone()
        _stats["offloaded"] += 1
        _stats["bytes"] += x.numel() * x.element_size()
        previous = getattr(_local, "last", None)
        self.previous = previous  # weakref to the input offloaded before this one (the layer before)
        _local.last = weakref.ref(self)

    def __del__(self):
        # The host buffer goes back for the next offload once this input is gone (after its layer's backward): every
        # later copy into it runs on the same side stream, after the copies that read it.
        if getattr(self, "host", None) is not None and self.device.type == "cuda":
            _host_buffers.give_back(self.host)

    def forward_done(self) -> None:
        if self.copied is not None:
            # The compute stream goes on only once the copy has read x, so x's memory (freed in the compute stream's
            # order) cannot be handed out under the copy. An event wait instead of `record_stream`: it keeps working
            # under CUDA graph capture, where a block with stream uses is not reused until the capture ends.
            torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.copied = None
        self.forward_value = None  # from now on the device keeps nothing for this input

    def _start_fetch(self) -> None:
        if self.device.type != "cuda":
            self.prefetched = self.host.clone()
            return
        stream = _side_stream(self.device)
        # Allocated on the compute stream, and the copy waits for the compute stream's work issued so far: so it
        # cannot write memory the compute stream still reads, and the compute stream waits for `ready` before its
        # first use (no `record_stream`, see forward_done).
        value = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            value.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.prefetched = value

    def prefetch(self) -> None:
        if self.forward_value is None and self.prefetched is None:
            self._start_fetch()

    def get(self) -> torch.Tensor:
        if self.forward_value is not None:
            return self.forward_value
        if self.prefetched is not None:
            _stats["prefetched"] += 1
        else:
            self._start_fetch()
        value, self.prefetched = self.prefetched, None
        if value.is_cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        _stats["fetched"] += 1
        earlier = self.previous() if self.previous is not None else None
        if earlier is not None:
            earlier.prefetch()  # overlap the next layer's copy with this layer's re-run and backward
        # the re-run must save the same tensors as the forward did, and ops save x only if x requires grad
        return value.requires_grad_(self.requires_grad)


def _preserve_rng() -> bool:
    # Under CUDA graph capture the RNG state cannot be read (and a captured step replays its own RNG offsets);
    # the LoRA training recipes this serves use no dropout there (peft's lora_dropout > 0 is not patched).
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _offloadable(x) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.numel() > 0
        and (x.is_cuda or (_OFFLOAD_ON_CPU and x.device.type == "cpu"))
    )


def _checkpoint_offloaded(layer_forward, args: tuple, kwargs: dict, positions: list[int]):
    inputs = {i: _OffloadedInput(args[i]) for i in positions}
    rest = tuple(None if i in inputs else a for i, a in enumerate(args))
    device = args[positions[0]].device
    # The closure below holds the offloaded inputs only through their holders. The 0-element anchor is what
    # torch.utils.checkpoint stores as "the inputs"; from it it infers the device whose RNG state and autocast
    # state it saves and restores.
    anchor = torch.empty(0, device=device)

    def run(_anchor):
        full = [inputs[i].get() if i in inputs else a for i, a in enumerate(rest)]
        return layer_forward(*full, **kwargs)

    try:
        return checkpoint(run, anchor, use_reentrant=False, preserve_rng_state=_preserve_rng())
    finally:
        for holder in inputs.values():
            holder.forward_done()


def checkpoint_layer(layer_forward, *args, offload: bool = False, **kwargs):
    """Run `layer_forward(*args, **kwargs)` keeping only its inputs (offload=True: on pinned host memory)."""
    if not torch.is_grad_enabled():
        return layer_forward(*args, **kwargs)
    layer_forward = _marking_reruns(layer_forward)
    if offload:
        positions = [i for i, a in enumerate(args) if _offloadable(a)]
        if positions:
            return _checkpoint_offloaded(layer_forward, args, kwargs, positions)
    return checkpoint(layer_forward, *args, use_reentrant=False, preserve_rng_state=_preserve_rng(), **kwargs)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    if hasattr(model, "get_base_model"):  # peft PeftModel -> the transformers model with LoRA layers injected
        model = model.get_base_model()
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers or .layers")


def _is_hf_checkpointing_layer(layer: torch.nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return isinstance(layer, GradientCheckpointingLayer)


def enable_checkpointing(model: torch.nn.Module, offload: bool = False) -> int:
    """Checkpoint each decoder layer of `model` (recompute; offload=True: inputs on pinned host memory)."""
    layers = _decoder_layers(model)
    func = functools.partial(checkpoint_layer, offload=offload)
    for layer in layers:
        if _is_hf_checkpointing_layer(layer):
            # transformers calls `_gradient_checkpointing_func(partial(forward, self, **kwargs), *args)`
            layer._gradient_checkpointing_func = func
            layer.gradient_checkpointing = True
        else:
            plain = layer.__dict__.get("_sloth_plain_forward", layer.forward)
            layer._sloth_plain_forward = plain

            def forward(*args, _plain=plain, _layer=layer, **kwargs):
                if _layer.training:
                    return func(_plain, *args, **kwargs)
                return _plain(*args, **kwargs)

            layer.forward = forward
    return len(layers)


def disable_checkpointing(model: torch.nn.Module) -> None:
    for layer in _decoder_layers(model):
        if _is_hf_checkpointing_layer(layer):
            layer.gradient_checkpointing = False
        elif "_sloth_plain_forward" in layer.__dict__:
            plain = layer.__dict__.pop("_sloth_plain_forward")
            if getattr(plain, "__self__", None) is layer and plain.__func__ is type(layer).forward:
                del layer.forward  # it was the class's forward: drop the instance override
            else:
                layer.forward = plain  # someone else's instance-level forward: put it back
