"""The LoRA update recipe, torchtune-style: one readable function from a `TrainJob` to a saved adapter.

Steps: load the base (4-bit NF4 through bitsandbytes when `job.quantize == "nf4"`), attach LoRA (continuing from the
parent adapter when there is one), optionally patch in `sloth_kernels`, score the eval sets, train one optimizer
step per prepared batch (loss on answer tokens only), score the eval sets again, save the adapter into
`job.output_dir`. Progress goes through `emit`; the caller (the child process entry) prints it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from ..prompting import IGNORE_INDEX, encode_example
from .job import EvalScores, TrainExample, TrainJob, TrainResult
from .scoring import score_eval_sets

Emit = Callable[[dict], None]


def load_base(job: TrainJob) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    device = torch.device(job.device)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = {"dtype": compute_dtype}
    if job.quantize == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(job.base_model, **kwargs)
    if job.quantize != "nf4":
        model.to(device)
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


def collate(tokenizer: Any, examples: list[TrainExample], max_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    pairs = [encode_example(tokenizer, e.kind, e.prompt, e.answer, max_len) for e in examples]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def run(job: TrainJob, emit: Emit) -> TrainResult:
    t0 = time.monotonic()
    torch.manual_seed(job.seed)
    device = torch.device(job.device)
    model, tokenizer = load_base(job)
    model = attach_lora(model, job)
    kernels = maybe_patch(model, job, emit)
    emit({"event": "log", "message": f"loaded {job.base_model} on {device} quantize={job.quantize}"})

    scores = {name: EvalScores(parent=None, candidate=None, examples=len(ex), ids=[e.id for e in ex])
              for name, ex in job.eval_sets.items()}
    score_eval_sets(model, tokenizer, job, scores, "parent", collate)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.learning_rate, weight_decay=0.0)
    steps = len(job.batches)
    warmup = max(1, min(10, steps // 10))
    # Linear warm-up, then cosine decay to 10%: short updates need the full rate early and a calm finish.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    model.train()
    losses, tokens = [], 0
    for step, examples in enumerate(job.batches):
        batch = collate(tokenizer, examples, job.max_seq_len, device)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        emit({"event": "progress", "step": step + 1, "steps": steps, "loss": losses[-1]})

    score_eval_sets(model, tokenizer, job, scores, "candidate", collate)
    model.save_pretrained(job.output_dir)
    return TrainResult(
        steps=steps,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        tokens=tokens,
        seconds=time.monotonic() - t0,
        device=str(device),
        quantized=job.quantize == "nf4",
        kernels=kernels,
        eval=scores,
    )
