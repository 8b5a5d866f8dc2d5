"""The LoRA update recipe, torchtune-style: one readable function from a `TrainJob` to a saved adapter.

Steps: load the base (4-bit NF4 through bitsandbytes when `job.quantize == "nf4"`), attach LoRA (continuing from the
parent adapter when there is one), optionally patch in `sloth_kernels`, score the eval sets (`scoring.py`), train one optimizer step per prepared batch (loss on answer tokens only; with `job.pack`
the batch's examples are packed into rows, and `job.step_tokens` merges consecutive batches into one step; the
examples in `job.distill`, the anchors, are trained on KL to the base instead, `distill.py`; AdamW's weight decay,
`job.weight_decay`, pulls the LoRA weights toward zero, i.e. the model toward its base), score
the eval sets again, save the adapter into `job.output_dir`, and take the LoRA layers out of the base again
(`train_on`, which a warm trainer calls on its resident base; `run` loads the base first). Progress goes through
`emit`; the caller (the child process entry) prints it: `progress` per step, `phase` (with a wall-clock `time`) at
the end of each of load, attach, eval_before, train, eval_after, save; `TrainResult.phases` has their seconds.
`train_on`'s `strategy` holds what differs when one update runs in several processes (`SingleProcess` here; FSDP's
in `trainer.fsdp`): wrapping the model, each process's share of a step, the backward pass, saving.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from ..chat_template import apply_chat_format
from ..nf4 import keep_plain_layout
from ..prompting import IGNORE_INDEX, ChatTemplateError, check_example, encode_example
from .collate import collate_encoded, pad_id
from .job import EvalScores, TrainExample, TrainJob, TrainResult
from .distill import kl_to_base_sum
from .packing import pack
from .scoring import score_eval_sets

Emit = Callable[[dict], None]


def load_base(job: TrainJob, *, load_on: str | None = None) -> tuple[Any, Any]:
    """The base model (frozen; dtype bf16 when `job.device` is CUDA, else fp32; NF4 through bitsandbytes with
    `job.quantize == "nf4"`) and its tokenizer, on `job.device`, or on `load_on` when given (the FSDP trainer loads
    and quantises on cpu and shards it onto the GPUs, so no GPU ever holds the whole model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    apply_chat_format(tokenizer, job.chat_template)  # the template the daemon serves with: same prompts, same tokens
    device = torch.device(job.device)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": compute_dtype}
    if job.quantize == "nf4":
        from ..nf4 import device_map, nf4_config

        kwargs["quantization_config"] = nf4_config(compute_dtype)
        kwargs["device_map"] = device_map(device if load_on != "cpu" else torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(job.base_model, **kwargs)
    keep_plain_layout(model)  # bitsandbytes' CPU repack: training on it learnt far slower (`nf4.keep_plain_layout`)
    if job.quantize != "nf4":
        model.to(torch.device(load_on) if load_on else device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def attach_lora(model: Any, job: TrainJob) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if job.parent_adapter:
        return PeftModel.from_pretrained(model, job.parent_adapter, is_trainable=True)
    cfg = LoraConfig(
        r=job.lora.r,
        lora_alpha=job.lora.alpha,
        lora_dropout=job.lora.dropout,
        target_modules=job.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def maybe_patch(model: Any, job: TrainJob, emit: Emit) -> str:
    if not job.kernels:
        return "off"
    from sloth_kernels.patch import patch_model

    report = patch_model(model, force=True, offload=job.offload)
    emit({"event": "log", "message": f"kernels: {report}"})
    return str(report)


def drop_unrenderable(job: TrainJob, tokenizer: Any, emit: Emit) -> None:
    """Leave out the examples the chat template refuses (e.g. stored before the template changed): one bad example
    must not fail the whole update. New ones were already checked when they were taught."""
    refused: dict[str, str] = {}
    for ex in job.examples.values():  # each example once, however many batches repeat it
        try:
            check_example(tokenizer, ex.kind, ex.prompt, ex.answer, ex.tools, ex.tool_calls)
        except ChatTemplateError as e:
            refused[ex.id] = str(e)
    if refused:
        emit({"event": "log", "message": f"left out {len(refused)} example(s) the chat template refuses: "
                                         + "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:3])})
        job.leave_out(set(refused))


def collate(tokenizer: Any, examples: list[TrainExample], max_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`examples` as one right-padded batch: input_ids, labels (-100 on prompt and padding) and attention_mask,
    each int64 of shape (len(examples), longest example in tokens, at most `max_len`), on `device`."""
    pairs = [encode_example(tokenizer, e.kind, e.prompt, e.answer, max_len, e.tools, e.tool_calls) for e in examples]
    return collate_encoded(pairs, pad_id(tokenizer), device)


class StepInputs:
    """The model inputs of every optimizer step, built when a step is reached (`for batch, tokens in steps`).

    Unpacked: one padded batch per job batch. Packed: each job batch packed into rows of `max_seq_len`; with
    `step_tokens`, consecutive batches merged until a step holds about that many tokens (fewer, fuller steps: the
    GPU waits less on the host per token). Each distinct example is tokenized once, and only one step's tensors
    exist at a time: a long update repeats a few examples over thousands of steps, and building every step up
    front cost minutes before the first one ran.
    """

    def __init__(self, tokenizer: Any, job: TrainJob, device: torch.device, rank: int = 0, world: int = 1):
        self.pad, self.device, self.job = pad_id(tokenizer), device, job
        self.rank, self.world = rank, world  # a distributed update: this process takes every world-th example
        encoded = {i: encode_example(tokenizer, e.kind, e.prompt, e.answer, job.max_seq_len,
                                  e.tools, e.tool_calls)
                   for i, e in job.examples.items()}
        distill = set(job.distill)
        # Each step's (encoded example, trained by distillation toward the base) pairs.
        self.groups: list[list[tuple[tuple[list[int], list[int]], bool]]] = []
        tokens = 0
        for ids in (b for b in job.batches if b):  # a batch drop_unrenderable emptied has no step
            pairs = [(encoded[i], i in distill) for i in ids]
            n = sum(len(p) for (p, _), _ in pairs)
            if job.pack and self.groups and job.step_tokens > 0 and tokens + n <= job.step_tokens:
                self.groups[-1].extend(pairs)
                tokens += n
            else:
                self.groups.append(pairs)
                tokens = n

    def __len__(self) -> int:
        return len(self.groups)

    def _inputs(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[dict, int]:
        if not self.job.pack:
            batch = collate_encoded(pairs, self.pad, self.device)
            return batch, int(batch["attention_mask"].sum())
        packed = pack(pairs, self.job.max_seq_len, self.pad)
        return ({k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in packed.model_inputs().items()},
                packed.tokens)

    def __iter__(self):
        """(model inputs, tokens) per step. Examples in `job.distill` go into a separate batch of their own under
        the key "distill" (their loss is KL to the base, `distill.py`); the others are the batch itself."""
        for group in self.groups:
            if self.world > 1:  # this process's share; one left without examples runs one ignored pad token
                group = group[self.rank::self.world]
            plain = [p for p, d in group if not d]
            kl = [p for p, d in group if d]
            batch, tokens = (self._inputs(plain) if plain else
                             (collate_encoded([([self.pad], [IGNORE_INDEX])], self.pad, self.device), 0))
            if kl:
                batch["distill"], more = self._inputs(kl)
                tokens += more
            yield batch, tokens


def answer_tokens(batch: dict) -> int:
    """Label positions a causal-LM loss scores in `batch` (labels shifted by one, as the loss shifts them)."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def step_inputs(tokenizer: Any, job: TrainJob, device: torch.device) -> StepInputs:
    """The model inputs of every optimizer step and their token counts (`StepInputs`)."""
    return StepInputs(tokenizer, job, device)


class SingleProcess:
    """How `train_on` trains in one process: the hooks a distributed update replaces (`trainer.fsdp.Fsdp`).

    `wrap(model)` -> the model to train; `step_inputs(tokenizer, job, device)` -> `StepInputs`; `backward(model,
    batch, tokens)` runs one step's forward and backward and returns (the step's loss: mean nats per answer token,
    the step's tokens); `save(model, folder)` writes the adapter; `reuses_base`: whether the LoRA layers are taken
    out of the base afterwards (for a warm trainer's next job)."""

    processes = 1
    reuses_base = True

    def __init__(self, distill_weight: float = 1.0):
        self.distill_weight = distill_weight  # an anchor token's KL to the base against a token's cross-entropy

    def wrap(self, model: Any) -> Any:
        return model

    def step_inputs(self, tokenizer: Any, job: TrainJob, device: torch.device) -> StepInputs:
        return step_inputs(tokenizer, job, device)

    def backward(self, model: Any, batch: dict, tokens: int) -> tuple[float, int]:
        distill = batch.pop("distill", None)
        if distill is None:
            loss = model(**batch).loss
        else:  # mean over all answer tokens: cross-entropy on the plain ones, weighted KL to the base on the others
            n_ce = answer_tokens(batch)
            kl, n_kl = kl_to_base_sum(model, distill)
            ce = model(**batch).loss * n_ce if n_ce else kl.new_zeros(())
            loss = (ce + self.distill_weight * kl) / max(1, n_ce + n_kl)
        loss.backward()
        return loss.item(), tokens

    def save(self, model: Any, folder: str) -> None:
        model.save_pretrained(folder)


def detach_lora(model: Any, job: TrainJob) -> Any:
    """Take the update's LoRA layers (and the kernels' patches) out again and return the bare base model, as it was
    before `attach_lora` (a warm trainer trains the next update on it)."""
    if job.kernels:
        from sloth_kernels.patch import unpatch_model

        unpatch_model(model)
    base = model.unload()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def train_on(base: Any, tokenizer: Any, job: TrainJob, emit: Emit, *, warm: bool = False,
             phases: dict[str, float] | None = None, strategy: SingleProcess | None = None) -> tuple[TrainResult, Any]:
    """Run `job` on an already loaded base model; return the result and the base model with the LoRA layers taken
    out again (for the next job of a warm trainer), or None when they could not be taken out (or `strategy` does not
    reuse its base: a distributed update)."""
    strategy = strategy or SingleProcess(job.distill_weight)
    phases = {} if phases is None else phases
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[name] = round(now - clock, 4)
        clock = now
        emit({"event": "phase", "phase": name, "time": time.time()})

    t0 = time.monotonic() - sum(phases.values())
    device = torch.device(job.device)
    torch.manual_seed(job.seed)  # after loading: a warm trainer's update draws the same LoRA init as a cold one
    if job.chat_template is not None:  # a warm trainer's tokenizer may come from a preload without it
        tokenizer.chat_template = job.chat_template
    drop_unrenderable(job, tokenizer, emit)
    model = attach_lora(base, job)
    try:
        kernels = maybe_patch(model, job, emit)
        model = strategy.wrap(model)
        emit({"event": "log", "message": f"{'warm' if warm else 'loaded'} {job.base_model} on {device} "
                                         f"quantize={job.quantize} processes={strategy.processes}"})
        steps_in = strategy.step_inputs(tokenizer, job, device)
        phase("attach")
        scores = {name: EvalScores(parent=None, candidate=None, examples=len(ids), ids=list(ids))
                  for name, ids in job.eval_sets.items()}
        score_eval_sets(model, tokenizer, job, scores, "parent")
        phase("eval_before")

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=job.learning_rate, weight_decay=job.weight_decay)
        steps = len(steps_in)
        warmup = max(1, min(10, steps // 10))
        # Linear warm-up, then cosine decay to 10%: short updates need the full rate early and a calm finish.
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        )
        model.train()
        losses, tokens = [], 0
        t_train = time.monotonic()
        for step, (batch, n_tokens) in enumerate(steps_in):
            loss, n_tokens = strategy.backward(model, batch, n_tokens)
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # FSDP's sharded (DTensor) grads: the global norm
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss)
            tokens += n_tokens
            emit({"event": "progress", "step": step + 1, "steps": steps, "loss": losses[-1], "tokens": tokens,
                  "seconds": time.monotonic() - t_train})
        del opt, steps_in
        phase("train")

        score_eval_sets(model, tokenizer, job, scores, "candidate")
        phase("eval_after")
        strategy.save(model, job.output_dir)
        phase("save")
    finally:
        try:
            base = detach_lora(model, job) if strategy.reuses_base else None
        except Exception as e:  # the update itself is done; only the next one cannot reuse this base
            emit({"event": "log", "message": f"could not take the LoRA layers out again ({e!r}); base not reused"})
            base = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what training cached goes back to the serving engine between updates
    result = TrainResult(
        steps=steps,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        tokens=tokens,
        seconds=time.monotonic() - t0,
        device=str(device),
        processes=strategy.processes,
        quantized=job.quantize == "nf4",
        kernels=kernels,
        eval=scores,
        warm=warm,
        phases=dict(phases),
    )
    return result, base


def run(job: TrainJob, emit: Emit) -> TrainResult:
    """Load the base for `job` and run it (one cold update: what a fresh trainer process does)."""
    started = time.monotonic()
    torch.manual_seed(job.seed)
    model, tokenizer = load_base(job)
    phases = {"load": round(time.monotonic() - started, 4)}
    emit({"event": "phase", "phase": "load", "time": time.time()})
    result, _ = train_on(model, tokenizer, job, emit, phases=phases)
    return result
