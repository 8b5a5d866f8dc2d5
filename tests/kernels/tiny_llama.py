"""A tiny Llama (hidden 64, vocab 128, 4 heads / 2 KV heads, sdpa) saved to disk and loaded with LoRA r=8, alpha 16
(random A and B: every grad is non-zero) on all seven projections, as an NF4 (bitsandbytes, double quant, bf16
compute) or a dense fp32 base: the model the launch-count and graph-step tests train."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save(path, layers: int = 2) -> None:
    config = AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def load(path, device: str, quantized: bool):
    """The saved model with LoRA, in train mode: NF4 on `device` ("cpu" or "cuda"), or dense fp32."""
    if quantized:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0 if device == "cuda" else "cpu"})
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=TARGETS))
    return model.train()
