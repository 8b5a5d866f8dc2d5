"""The patcher's own contract: report, fallbacks logged once, no-op on CPU, unpatch, adapter format, loss forward.

Kernel numerics inside real models are `test_families.py`'s job; here the ops dispatch to their PyTorch references
(TRITON_INTERPRET=0) so that each test runs in about a second on a CPU.
"""

from __future__ import annotations

import filecmp
import logging

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sloth_kernels.patch import patch_report, unpatch_model

from .patching import patch_model, unpatch_afterwards  # noqa: F401 (autouse fixture)

VOCAB = 96
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")



def _llama(seed=0):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _lora(model, targets=ALL, dropout=0.0, seed=1):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, cfg)


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 7), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "labels": labels}


def _overridden(model):
    """Names of modules that carry an instance-level forward (what the patch installs)."""
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_noop_on_cpu_without_force():
    model = _lora(_llama())
    original_rope = modeling_llama.apply_rotary_pos_emb
    report = patch_model(model)
    assert not report.active and report.patched == {}
    assert str(report).startswith("sloth_kernels off (model is on cpu")
    assert _overridden(model) == [] and patch_report(model) is None
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.base_model.model.model.layers)


def test_report_counts_fallbacks_and_summary(caplog):
    # The daemon's default LoRA targets: attention only, so the MLPs keep their projections (activation kernel only).
    model = _lora(_llama(), targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    with caplog.at_level(logging.WARNING, logger="sloth_kernels.patch"):
        report = patch_model(model, force=True)
    assert report.active and report.family == "llama"
    assert dict(report.patched) == {"rms_norm": 5, "rope": 2, "qkv": 2, "o": 2, "glu": 2, "loss": 1, "checkpoint": 2}
    (reason,) = report.fallbacks
    assert reason.startswith("mlp: ") and "not a peft LoRA layer" in reason
    assert report.fallbacks[reason] == 2  # both MLPs, one log line
    assert [r.getMessage() for r in caplog.records] == [
        f"sloth_kernels: mlp falls back to the original code: {reason[len('mlp: '):]}"
    ]
    text = str(report)
    assert "\n" not in text
    assert text.startswith("sloth_kernels on llama: checkpoint=2 glu=2 loss=1 o=2 qkv=2 rms_norm=5 rope=2")
    assert "fallbacks: mlp: " in text

    model.train()
    model(**_batch()).loss.backward()
    # forward + checkpointed recompute (which stops early once the saved tensors are all rebuilt)
    assert report.calls["qkv"] >= 2 and report.calls["glu"] >= 2 and report.calls["loss"] == 1


def test_runtime_fallback_logged_once_and_exact(caplog):
    # LoRA dropout qualifies in eval mode (dropout off), not while training: decided on every call.
    plain = _lora(_llama(), dropout=0.1)
    patched = _lora(_llama(), dropout=0.1)
    patched.eval()
    report = patch_model(patched, force=True, checkpointing=False)
    assert not report.fallbacks
    for model in (plain, patched):
        model.train()
    losses = []
    with caplog.at_level(logging.WARNING, logger="sloth_kernels.patch"):
        for model in (plain, patched):
            torch.manual_seed(5)
            losses.append(torch.stack([model(**_batch(s)).loss for s in range(2)]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)  # dropout masks replayed identically
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(set(messages)) == 3, messages  # qkv, o, mlp: once each
    assert all("lora_dropout=0.1 while training" in m for m in messages)
    for kind in ("qkv", "o", "mlp"):
        (key,) = [k for k in report.fallbacks if k.startswith(kind + ":")]
        assert report.fallbacks[key] == 4  # 2 layers x 2 forwards
    assert report.calls["qkv"] == 0 and report.calls["glu"] == 4  # the MLP fell back to its activation kernel


def test_unpatch_restores_everything():
    model = _lora(_llama())
    base = model.get_base_model()
    base.gradient_checkpointing_enable()  # the user's own setting must survive patch + unpatch
    layers = base.model.layers
    hf_func = layers[0]._gradient_checkpointing_func
    original_rope = modeling_llama.apply_rotary_pos_emb
    model.eval()
    with torch.no_grad():
        before = model(input_ids=_batch()["input_ids"]).logits

    patch_model(model, force=True)
    assert modeling_llama.apply_rotary_pos_emb is not original_rope
    assert layers[0]._gradient_checkpointing_func is not hf_func
    assert unpatch_model(model) is True
    assert unpatch_model(model) is False
    assert _overridden(model) == [] and patch_report(model) is None
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func is hf_func for layer in layers)
    with torch.no_grad():
        after = model(input_ids=_batch()["input_ids"]).logits
    assert torch.equal(before, after)


def test_repatch_replaces_instead_of_stacking():
    model = _lora(_llama())
    first = dict(patch_model(model, force=True).patched)
    report = patch_model(model, force=True)
    assert dict(report.patched) == first and patch_report(model) is report
    model.eval()
    with torch.no_grad():
        model(input_ids=_batch()["input_ids"])
    assert report.calls["rms_norm"] == 5 and report.calls["rope"] == 2  # one wrapper each, not two
    unpatch_model(model)
    assert _overridden(model) == [] and modeling_llama.apply_rotary_pos_emb.__name__ == "apply_rotary_pos_emb"
    assert not hasattr(modeling_llama.apply_rotary_pos_emb, "_sloth_original")


def test_unpatched_model_in_same_process_is_untouched():
    other = _lora(_llama(seed=3)).eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        before = other(input_ids=ids).logits
    patched = _lora(_llama())
    report = patch_model(patched, force=True)
    with torch.no_grad():
        after = other(input_ids=ids).logits
    assert torch.equal(before, after)
    assert report.calls["rope"] == 0 and report.calls["rms_norm"] == 0  # the switch stayed off for `other`
    unpatch_model(patched)


def test_saved_adapter_is_a_plain_peft_adapter(tmp_path):
    plain, patched = _lora(_llama()), _lora(_llama())
    patch_model(patched, force=True)
    plain.save_pretrained(tmp_path / "plain")
    patched.save_pretrained(tmp_path / "patched")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "patched").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "plain", tmp_path / "patched", files, shallow=False)
    assert mismatch == [] and errors == [], (mismatch, errors)

    # Train the patched model a step, save, load into a fresh unpatched base: same model.
    patched.train()
    opt = torch.optim.AdamW([p for p in patched.parameters() if p.requires_grad], lr=1e-2)
    patched(**_batch()).loss.backward()
    opt.step()
    patched.save_pretrained(tmp_path / "trained")
    reloaded = PeftModel.from_pretrained(_llama(), tmp_path / "trained").eval()
    patched.eval()
    ids = _batch(1)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, reloaded(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_unsupported_family_is_left_alone():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    report = patch_model(model, force=True)
    assert not report.active and "'gpt2' is not supported" in str(report)
    assert _overridden(model) == []


def test_loss_forward_matches_hf_and_falls_through():
    plain, patched = _lora(_llama()), _lora(_llama())
    report = patch_model(patched, force=True, checkpointing=False)
    batch = _batch()
    for model in (plain, patched):
        model.train()
    # Gradient accumulation: sum over the step's tokens / num_items_in_batch, as HF's loss does.
    n_items = torch.tensor(17)
    ref = plain(**batch, num_items_in_batch=n_items)
    out = patched(**batch, num_items_in_batch=n_items)
    assert out.logits is None and report.calls["loss"] == 1
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), patched.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)

    # Not training, or no grad, or a tuple asked for: the original forward, logits included.
    with torch.no_grad():
        out = patched(**batch)
    assert out.logits is not None and report.calls["loss"] == 1
    torch.testing.assert_close(out.loss, plain(**batch).loss.detach(), rtol=1e-5, atol=1e-6)
    assert isinstance(patched.get_base_model()(**batch, return_dict=False), tuple)


def test_lm_head_with_lora_keeps_hf_loss():
    model = _lora(_llama(), targets=ALL + ["lm_head"])
    report = patch_model(model, force=True)
    assert "loss" not in report.patched
    assert any(k.startswith("loss: lm_head is peft.tuners.lora") for k in report.fallbacks), report.fallbacks
    model.train()
    assert model(**_batch()).logits is not None


def test_gemma_norm_offset_and_phi3_fused_projections():
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, pad_token_id=0))
    torch.nn.init.normal_(gemma.model.norm.weight)  # Gemma stores w with scale 1 + w: zeros would hide the offset
    gemma.eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        ref = gemma(input_ids=ids).logits
        report = patch_model(gemma, force=True)
        got = gemma(input_ids=ids).logits
    assert report.patched["rms_norm"] == 3 and report.patched["glu"] == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    phi3 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "phi3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0))
    # LoRA only on the fused gate_up_proj: it goes through lora_o, the plain qkv_proj/down_proj keep their forward.
    phi3 = _lora(phi3, targets=["gate_up_proj"])
    report = patch_model(phi3, force=True)
    assert report.patched["proj"] == 1 and report.patched["glu"] == 1
    assert sum(n for k, n in report.fallbacks.items() if k.startswith("proj: ")) == 2
