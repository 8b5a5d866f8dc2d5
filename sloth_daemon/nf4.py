"""The 4-bit NF4 base: one bitsandbytes quantisation config shared by the trainer and the embedded engine.

QLoRA's recipe (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314): NF4
weights in blocks of 64 with double quantisation of the block scales (about 4.1 bits per weight), computed in
`compute_dtype`. Through transformers' own path (`BitsAndBytesConfig`, `from_pretrained(quantization_config=...)`):
the layers become bitsandbytes `Linear4bit`, on which peft's LoRA layers (`peft.tuners.lora.bnb.Linear4bit`) train
and serve. Both sides quantise the same checkpoint with the same config, and NF4 quantisation is deterministic, so an
adapter trained on the 4-bit base is served on exactly that base.

On CPU both keep bitsandbytes' plain layout (`keep_plain_layout`): its AVX512-BF16 inference path computes in bf16
whatever `compute_dtype` says, and repacks the weights in place at the first no-grad forward.
"""

from __future__ import annotations

from typing import Any

import torch


def nf4_config(compute_dtype: torch.dtype) -> Any:
    """transformers' `BitsAndBytesConfig` for an NF4 base computing in `compute_dtype` (bf16 on CUDA, fp32 on CPU)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def device_map(device: torch.device) -> dict[str, Any]:
    """accelerate's `device_map` that loads every layer onto `device` (a quantised model is placed while it loads:
    transformers quantises each weight as it reaches the GPU, so the full-precision model never sits there)."""
    return {"": (device.index or 0) if device.type == "cuda" else str(device)}


def keep_plain_layout(model: Any) -> Any:
    """Switch off bitsandbytes' CPU inference repack on every `Linear4bit` of `model` (in place; returns `model`).

    On a CPU with AVX512-BF16, `Linear4bit.forward` under no-grad repacks the NF4 weight in place into a layout for
    a fused kernel that casts activations and block scales to bf16 whatever `compute_dtype` is (bitsandbytes 0.50,
    `backends/cpu/ops.py`: "cpu fused op only support bf16 for now"). In the trainer, training on the repacked weight
    after the gate's scoring learnt far slower (sloth-tiny: loss 7.4 -> 6.5 in 6 steps instead of -> 2.5; and FSDP's
    next all-gather brings the original layout back under the repacked mark). In the engine, bf16 compute made a
    request's greedy answer depend on which rows shared its batch (sloth-tiny, NF4: max logit difference 0.13 against
    the fp32 path), and the served numerics differ from the ones the gate judged in the trainer. The plain layout
    dequantises to `compute_dtype` on every CPU, with or without AVX512-BF16. No effect on CUDA.
    """
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
    return model
