"""The embedded engine (transformers + peft in-process) against the shared engine contract."""

from __future__ import annotations

import pytest
import torch

from sloth_daemon.engine.embedded import EmbeddedEngine

from .engine_contract import EngineContract, run


def make_lora(model_dir, out_dir, seed: int):
    """A real peft LoRA adapter with random non-zero weights (so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = EmbeddedEngine(tiny_model, model_name="sloth-tiny", device="cpu")
    run(eng.start())
    yield eng
    run(eng.stop())


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [(f"v00000{i}", make_lora(tiny_model, root / f"a{i}", seed=i)) for i in (1, 2)]


class TestEmbeddedEngine(EngineContract):
    pass
