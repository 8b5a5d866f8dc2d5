"""How each process of a distributed update (`trainer.fsdp`) gets the NF4-quantised base into host memory quickly.

Why this exists: the FSDP trainer loads the base on the host (no GPU may hold the whole model) and transformers
then quantises every linear weight there, with bitsandbytes' CPU path (`torch.bucketize` over every element) in a
process torchrun started with one OpenMP thread, in every process at once. On the 8B shape that cost ~1.2 s per
weight, ~270 s for a process's 224 weights (docs/gpu-notes.md, run 21, cut at 170 s halfway, and session 7; the
one-process recipe quantises on its GPU and loads in 13 s). transformers and bitsandbytes offer no "quantise there,
keep it here" option, so this module changes only where bitsandbytes' `Params4bit._quantize` runs, for the duration
of one load:

- `device` CUDA: each weight is quantised on this process's GPU (as the one-process recipe does) and its packed
  4-bit data and quantisation state are moved back to the host at once, so a GPU holds one full-precision weight
  at a time, never the model;
- `device` cpu (several processes sharing the host's cores): the weights are split between the processes (the
  i-th quantised weight belongs to process i % world); a process quantises only its own and leaves an empty
  placeholder for the others, then `HostQuantisation.share(model)` sends each weight from its owner to the others
  (`torch.distributed` broadcasts: the packed bytes, and the quantisation state through bitsandbytes' own
  `QuantState.as_dict`/`from_dict`). Every process ends with the same bytes as if it had quantised all of them.

Contract: `with HostQuantisation(device, rank, world) as q: model = load_base(...)`, then `q.share(model)` in every
process (a no-op on CUDA and with one process; a collective otherwise: every process must call it). `q.quantised`
counts the weights this process quantised, `q.received` those it got from others. The order in which transformers
quantises is the checkpoint's, the same in every process; ownership is recorded per module during the load and
`share` walks the modules in the model's order, so no collective runs inside transformers' loader (`share` first
checks that every process recorded the same owners, and raises RuntimeError if not).
Sources: bitsandbytes `Params4bit` / `QuantState` (bitsandbytes 0.50), the QLoRA-FSDP recipe (Answer.AI's
fsdp_qlora quantises each layer on the GPU and keeps it on the host: "low_memory" loading).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class HostQuantisation:
    """Where and by whom the NF4 weights are quantised while one process of `world` loads the base on the host
    (module docstring). `device`: the process's training device (torch.device)."""

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1):
        self.device, self.rank, self.world = device, rank, world
        self.split = device.type == "cpu" and world > 1
        self.quantised = 0
        self.received = 0
        self._calls = 0
        self._owner: dict[int, int] = {}  # id(Linear4bit) -> the rank that quantised its weight
        self._original = None

    def __enter__(self) -> "HostQuantisation":
        from bitsandbytes.nn import Params4bit

        self._original = original = Params4bit._quantize
        owner_of, me = self._owner, self

        def _quantize(param, device):
            if device.type != "cpu":  # not a host load (e.g. a warm trainer in this process): as bitsandbytes does
                return original(param, device)
            owner = me.rank
            if me.split and param.module is not None:  # (a weight without its module is quantised everywhere)
                owner = me._calls % me.world
                me._calls += 1
                owner_of[id(param.module)] = owner
            if owner != me.rank:  # another process quantises it; `share` fills it in
                param.data = torch.empty(0, dtype=param.quant_storage)
                param.bnb_quantized = True
                return param
            me.quantised += 1
            if me.device.type == "cpu":
                return original(param, device)
            original(param, me.device)  # packed data and state on the GPU: move both back to the host
            param.data = param.data.to(device)
            param.quant_state.to(device)
            return param

        Params4bit._quantize = _quantize
        return self

    def __exit__(self, *exc) -> None:
        from bitsandbytes.nn import Params4bit

        Params4bit._quantize = self._original
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the quantisation's scratch goes; the shards come next

    def share(self, model: torch.nn.Module) -> None:
        """Give every process the weights the others quantised (module docstring). A collective when split."""
        if not self.split:
            return
        from bitsandbytes.functional import QuantState

        modules = [m for m in model.modules() if id(m) in self._owner]
        owners = [self._owner[id(m)] for m in modules]
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, owners)
        if any(o != owners for o in everyone):  # the loader quantised in another order somewhere: fail, not hang
            raise RuntimeError(f"the processes split the NF4 weights differently ({[len(o) for o in everyone]} "
                               "weights); transformers must quantise in the checkpoint's order in every process")
        for module, owner in zip(modules, owners):
            weight = module.weight
            header = [(tuple(weight.data.shape), weight.data.dtype, weight.quant_state.as_dict())
                      if owner == self.rank else None]
            dist.broadcast_object_list(header, src=owner)
            shape, dtype, state = header[0]
            data = weight.data if owner == self.rank else torch.empty(shape, dtype=dtype)
            dist.broadcast(data, src=owner)
            if owner != self.rank:
                weight.data = data
                weight.quant_state = module.quant_state = QuantState.from_dict(state, torch.device("cpu"))
                self.received += 1
