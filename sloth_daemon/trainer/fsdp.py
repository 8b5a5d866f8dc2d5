"""One update across several processes (torchrun, one per device) with PyTorch FSDP2 (`fully_shard`): the same job,
progress events, result and adapter as the single-process recipe (`recipe.train_on`, run with the `Fsdp` hooks).

Contract: `run(job, emit)` in each worker torchrun started (RANK, WORLD_SIZE, LOCAL_RANK in its environment):
- joins the process group (nccl on CUDA, each process on cuda:LOCAL_RANK of the GPUs it sees; gloo on cpu);
- loads the base into host memory in the compute dtype (bf16 on CUDA, fp32 on cpu), quantised to NF4 when the job
  says so (bitsandbytes; each weight on this process's GPU, or on cpu split between the processes:
  `fsdp_load.HostQuantisation`), attaches LoRA with the job's seed (every process draws the same initial weights, as
  the single-process trainer does), then shards each decoder layer and the whole model (`fully_shard`: parameters,
  the packed 4-bit weights included, gradients and optimizer state are split across the processes; a device holds
  its shard plus the layer being computed). The QLoRA-FSDP recipe: the 4-bit weights are stored in a tensor FSDP can
  shard (bitsandbytes packs them into uint8 rows; FSDP2 all-gathers mixed dtypes as bytes), and bitsandbytes'
  `Linear4bit` finds its quantisation state on the layer again after each all-gather
  (`fix_4bit_weight_quant_state_from_module`); that state (absmax, code: ~1/64 of the weights) is kept whole on
  every device;
- trains each step on its share of the step's examples (every world-th one, `recipe.StepInputs`), with the loss
  summed over its answer tokens and divided by the whole step's count (`num_items_in_batch`, all-reduced), times
  the process count because FSDP averages gradients: the gradients are those of the single-process step, and the
  reported loss (summed over the processes) is the same mean over the step's answer tokens. Losses therefore match
  the single-process run within float rounding (tests/test_trainer_distributed.py);
- scores the eval sets in every process (the same examples: FSDP gathers each layer for the forward) and gathers the
  LoRA weights (`DTensor.full_tensor`) for process 0, which saves the adapter;
- prints progress, phases, logs and the result from process 0 only.
The kernels (`sloth_kernels`) are switched off with one logged line: their patched modules (the NF4 dequant and
LoRA-fused projections read the weights themselves) are not checked under FSDP's parameter gathering. A process that raises exits 1; torchrun then stops the others and exits non-zero (the daemon's
`TrainerFailed`); a killed torchrun takes its workers with it (`__main__.die_with_parent`).
Sources: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`, the FSDP2 tutorial), torchrun's environment
(`torch.distributed.run`), transformers' `num_items_in_batch` loss normalisation (gradient accumulation fix).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from ..prompting import IGNORE_INDEX
from .job import TrainJob, TrainResult
from .distill import kl_to_base_sum
from .fsdp_load import HostQuantisation
from .recipe import Emit, SingleProcess, StepInputs, answer_tokens, load_base, train_on

def decoder_layers(model: Any) -> list[Any]:
    """The model's transformer blocks: the classes its `_no_split_modules` names (transformers' own list of the
    modules that must stay whole), else modules whose class name ends in DecoderLayer."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules()
            if type(m).__name__ in names or (not names and type(m).__name__.endswith("DecoderLayer"))]


class Fsdp(SingleProcess):
    """`recipe.train_on`'s hooks for one of `world` processes (see the module docstring)."""

    reuses_base = False

    def __init__(self, rank: int, world: int, device: torch.device, distill_weight: float = 1.0):
        super().__init__(distill_weight)
        self.rank, self.world, self.device = rank, world, device
        self.processes = world

    def wrap(self, model: Any) -> Any:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for m in model.modules():
            state = getattr(m, "quant_state", None)
            if state is not None and hasattr(state, "to"):
                # An NF4 layer's quantisation state (absmax, code) is no parameter: FSDP does not move it. Each
                # process keeps it whole on its device; the packed 4-bit weight is sharded like any frozen tensor.
                state.to(self.device)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def step_inputs(self, tokenizer: Any, job: TrainJob, device: torch.device) -> StepInputs:
        return StepInputs(tokenizer, job, device, rank=self.rank, world=self.world)

    def backward(self, model: Any, batch: dict, tokens: int) -> tuple[float, int]:
        distill = batch.pop("distill", None)  # anchors trained on KL to the base (`distill.py`)
        answer = answer_tokens(batch) + (answer_tokens(distill) if distill is not None else 0)
        counts = torch.tensor([float(answer), float(tokens), float(distill is not None)], device=self.device)
        dist.all_reduce(counts)  # [answer tokens of the whole step, tokens of the whole step, processes distilling]
        loss = model(**batch, num_items_in_batch=counts[0]).loss  # this share's summed loss / the step's count
        if counts[2] > 0:
            # Every process runs the same forwards (FSDP gathers each layer's shards in all of them): one whose share
            # holds no anchor distils a pad token whose label is ignored (KL 0, no gradient).
            if distill is None:
                distill = {"input_ids": batch["input_ids"][:1, :1], "labels": torch.full_like(
                    batch["input_ids"][:1, :1], IGNORE_INDEX)}
            kl, _ = kl_to_base_sum(model, distill)
            loss = loss + self.distill_weight * kl / counts[0]
        (loss * self.world).backward()  # FSDP averages gradients over the processes
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total.item(), int(counts[1].item())

    def save(self, model: Any, folder: str) -> None:
        full = {}
        for name, p in model.named_parameters():  # every process takes part in gathering each tensor
            if p.requires_grad:
                full[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        if self.rank == 0:
            model.save_pretrained(folder, state_dict=full)
        dist.barrier()


def load_on_host(job: TrainJob, device: torch.device, rank: int, world: int, emit: Emit) -> tuple[Any, Any]:
    """The base and tokenizer in this process's host memory (`load_base(load_on="cpu")`), an NF4 base quantised on
    this process's GPU, or on cpu split between the processes (`fsdp_load.HostQuantisation`); logs how."""
    if job.quantize != "nf4":
        return load_base(job, load_on="cpu")
    with HostQuantisation(device, rank, world) as quantisation:
        base, tokenizer = load_base(job, load_on="cpu")
    quantisation.share(base)
    where = f"on {device}" if device.type == "cuda" else f"on the host, split over {world} processes"
    emit({"event": "log", "message": f"NF4 base quantised {where}: {quantisation.quantised} weights in process 0, "
                                     f"{quantisation.received} from the others"})
    return base, tokenizer


def run(job: TrainJob, emit: Emit) -> TrainResult | None:
    """This process's part of a distributed update; the result on process 0, None on the others."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = job.device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    out = emit if rank == 0 else (lambda event: None)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        kernels = job.kernels
        if kernels:
            out({"event": "log", "message": "kernels: off under FSDP (not checked with sharded parameters)"})
        job = job.model_copy(update={"device": str(device), "kernels": False, "offload": False})
        started = time.monotonic()
        base, tokenizer = load_on_host(job, device, rank, world, out)
        phases = {"load": round(time.monotonic() - started, 4)}
        out({"event": "phase", "phase": "load", "time": time.time()})
        result, _ = train_on(base, tokenizer, job, out, phases=phases,
                             strategy=Fsdp(rank, world, device, job.distill_weight))
        if kernels:
            result.kernels = "off under FSDP"
        result.device = "cuda" if cuda else "cpu"
        return result if rank == 0 else None
    finally:
        dist.destroy_process_group()
