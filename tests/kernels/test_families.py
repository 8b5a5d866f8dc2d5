"""Patched vs unpatched, per model family: tiny random models with LoRA r=8 on every linear projection.

For each family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3) two identical models are built
from the same seed; one is patched with `patch_model(force=True)`. Batches have prompt tokens masked with -100 and
right padding, so ignore_index and the attention mask go through the patched code.

- `test_step_and_logits`: one training step (loss and every LoRA grad) and the eval-mode logits of the patched
  model equal the unpatched ones. On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by
  tests/conftest.py), so this is where the Triton kernels meet the real HF modules.
- `test_twenty_steps`: 20 AdamW steps; per-step loss within tolerance, final LoRA weights close. On CPU the
  interpreter would take minutes for 20 steps x 8 families, so here the patched model dispatches to the ops'
  PyTorch references (TRITON_INTERPRET=0): that tests the patch itself (fused loss, fed q/k/v, lora_mlp, rope
  switch, checkpointing) over a whole run. On CUDA both tests run the Triton kernels (fp32 and bf16).
- `test_nf4_llama`: the same with a 4-bit (bitsandbytes NF4, double quant) base, Llama only, interpreter on CPU.

Tolerances (`_compare`): fp32: patched vs unpatched, losses 1e-4 relative, grads/logits 1e-3 of their largest
element, trained weights 1e-3 in norm (the kernels reassociate sums). bf16 (CUDA): an fp32 run of the same model is
the yardstick; the patched run's error must stay within max(floor, 3x the unpatched bf16 run's own error), floors
1e-2 relative for losses (the issue's figure) and 5e-2 for grads, logits and weights.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from sloth_kernels.patch import patch_report, unpatch_model

from .patching import patch_model, unpatch_afterwards  # noqa: F401 (autouse fixture)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB, SEQ, BATCH = 128, 8, 2
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager", tie_word_embeddings=False,
)
# head_dim 16 or 32, GQA / MQA / MHA, biases (Qwen2), q/k norms (Qwen3, Gemma 3), soft-capping (Gemma 2),
# sliding windows (Gemma 2/3), partial rotary and fused projections (Phi-3).
FAMILIES = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(num_attention_heads=2, num_key_value_heads=1, sliding_window=6),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gemma": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, final_logit_softcapping=5.0,
                   attn_logit_softcapping=20.0, query_pre_attn_scalar=32, sliding_window=6),
    "gemma3_text": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0),
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5),
}
SKIPS_MLP_OUTPUT_IN_RERUN = {"llama", "mistral", "qwen2", "qwen3", "gemma"}  # phi3: no lora_mlp (fused gate_up)
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What the patch must cover in every family (modules patched per kind, 2 layers).
EXPECTED = {
    "default": {"rope": 2, "qkv": 2, "o": 2, "mlp": 2, "loss": 1, "checkpoint": 2},
    "phi3": {"rope": 2, "proj": 6, "o": 2, "glu": 2, "loss": 1, "checkpoint": 2},
}

DEVICE_DTYPES = [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.float32, marks=[pytest.mark.gpu, CUDA]),
    pytest.param("cuda", torch.bfloat16, marks=[pytest.mark.gpu, CUDA]),
]



def _tiny(family: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A tiny random model of `family` with LoRA (random A and B, so every grad is non-zero) in train mode."""
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=TARGETS.get(family, DEFAULT_TARGETS))
    torch.manual_seed(seed + 1)
    model = get_peft_model(model, lora).to(device)
    return model.train()


def _batches(n: int, device: str, seed: int = 0, distinct: int = 4):
    """n batches cycling through `distinct` random ones (so that 20 steps visibly lower the loss)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(min(n, distinct)):
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # right padding
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, :3] = -100  # a masked prompt
        out.append({k: v.to(device) for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))})
    return [out[i % len(out)] for i in range(n)]


def _tol(dtype):
    """(loss, grads/logits/weights) floors: fp32 tight, bf16 per the issue."""
    return (1e-4, 1e-3) if dtype == torch.float32 else (1e-2, 5e-2)


SLACK = 3.0  # bf16: patched may deviate from fp32 up to SLACK x what plain HF's own bf16 run deviates


def _rel(got, ref, norm=False):
    """Relative error: largest |got - ref| over largest |ref| (norm=True: ||got - ref|| / ||ref||)."""
    got = torch.as_tensor(got).detach().float().cpu()
    ref = torch.as_tensor(ref).detach().float().cpu()
    if norm:
        return ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def _compare(what, patched, plain, truth=None, floor=1e-3, norm=False):
    """Each entry of `patched` (a dict name -> tensor) against the unpatched run.

    fp32 (truth None): patched vs plain, entry by entry, within `floor`. bf16: HF's own bf16 run is not exact
    either (peft keeps the LoRA branch in fp32, we compute it in bf16; the rounding points differ), so both runs are
    measured against an fp32 run of the same model and the patched one's worst error must stay within
    max(floor, SLACK x the plain one's worst error).
    """
    assert patched.keys() == plain.keys(), what
    if truth is None:
        for name in patched:
            err = _rel(patched[name], plain[name], norm)
            assert err <= floor, f"{what} {name}: relative error {err:.3g} > {floor}"
        return
    worst = max(_rel(patched[n], truth[n], norm) for n in patched)
    worst_plain = max(_rel(plain[n], truth[n], norm) for n in patched)
    bound = max(floor, SLACK * worst_plain)
    assert worst <= bound, f"{what}: patched error {worst:.3g} vs fp32 > {bound:.3g} (plain bf16: {worst_plain:.3g})"


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _check_report(family, model, checkpointing=True):
    report = patch_report(model)
    assert report is not None and report.active, report
    expected = dict(EXPECTED.get(family, EXPECTED["default"]), checkpoint=2 if checkpointing else 0)
    for kind, count in expected.items():
        assert report.patched[kind] == count, f"{kind}: {report}"
    # every norm: 2 per layer + final, Gemma 2/3 have 4 per layer, Qwen3/Gemma 3 add q_norm and k_norm
    assert report.patched["rms_norm"] >= 5
    assert not report.fallbacks, report
    return report


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_step_and_logits(family, device, dtype):
    plain, patched = _tiny(family, device, dtype), _tiny(family, device, dtype)
    truth = _tiny(family, device, torch.float32) if dtype != torch.float32 else None
    patch_model(patched, force=True, checkpointing=False)
    report = _check_report(family, patched, checkpointing=False)
    loss_tol, rel = _tol(dtype)
    (batch,) = _batches(1, device)
    models = {"plain": plain, "patched": patched, **({"truth": truth} if truth is not None else {})}

    losses, grads = {}, {}
    for key, model in models.items():
        out = model(**batch)
        out.loss.backward()
        losses[key] = {"loss": out.loss.detach()}
        grads[key] = {n: p.grad for n, p in _lora_params(model).items()}
    assert patched(**batch).logits is None  # training with labels: the fused loss, no logits
    _compare("loss", losses["patched"], losses["plain"], losses.get("truth"), loss_tol)
    _compare("grads", grads["patched"], grads["plain"], grads.get("truth"), rel)

    logits = {}
    for key, model in models.items():
        model.eval()
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits[key] = {"logits": out.logits}
    _compare("eval logits", logits["patched"], logits["plain"], logits.get("truth"), rel)
    # The kernels really ran (on CPU: under the interpreter).
    for kind in ("rms_norm", "rope", "loss"):
        assert report.calls[kind] > 0, report.calls
    assert report.calls["qkv" if family != "phi3" else "proj"] > 0
    assert report.calls["mlp" if family != "phi3" else "glu"] > 0


def _train(model, batches):
    # fused AdamW writes the weights without bumping their version counters: the patched model's cast cache
    # (sloth_kernels.lora_linear, one epoch per forward) must still see every step's weights.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, fused=True)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("device,dtype", [DEVICE_DTYPES[0], DEVICE_DTYPES[2]])
def test_twenty_steps(family, device, dtype, monkeypatch):
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the references: see the module docstring
    plain, patched = _tiny(family, device, dtype), _tiny(family, device, dtype)
    truth = _tiny(family, device, torch.float32) if dtype != torch.float32 else None
    patch_model(patched, force=True)
    report = _check_report(family, patched)
    _check_training(plain, patched, truth, _batches(20, device, seed=1), dtype)
    assert report.calls["loss"] == 20
    if device == "cuda":  # the re-run skips the MLP output only where nothing reads it (Gemma 2/3 post-norm it)
        assert (report.calls["mlp_output_skipped"] > 0) == (family in SKIPS_MLP_OUTPUT_IN_RERUN), report.calls


def _check_training(plain, patched, truth, batches, dtype):
    """Train all given models on `batches`; per-step losses and final LoRA weights must agree (see `_compare`)."""
    loss_tol, rel = _tol(dtype)
    runs = {"plain": plain, "patched": patched, **({"truth": truth} if truth is not None else {})}
    losses = {k: {f"step {i}": v for i, v in enumerate(_train(m, batches))} for k, m in runs.items()}
    _compare("losses", losses["patched"], losses["plain"], losses.get("truth"), loss_tol)
    ref = list(losses["plain"].values())
    if len(ref) >= 8:
        assert sum(ref[-4:]) < sum(ref[:4])  # it did learn something (the same 4 batches, again and again)
    weights = {k: dict(_lora_params(m)) for k, m in runs.items()}
    _compare("trained LoRA weights", weights["patched"], weights["plain"], weights.get("truth"), rel, norm=True)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = AutoConfig.for_model("llama", **COMMON, **FAMILIES["llama"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _nf4_llama(path, device, dtype):
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0 if device == "cuda" else "cpu"})
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=DEFAULT_TARGETS)
    torch.manual_seed(1)
    return get_peft_model(model, lora).train()


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_nf4_llama(tiny_llama_dir, device, dtype):
    plain, patched = _nf4_llama(tiny_llama_dir, device, dtype), _nf4_llama(tiny_llama_dir, device, dtype)
    truth = _nf4_llama(tiny_llama_dir, device, torch.float32) if dtype != torch.float32 else None
    patch_model(patched, force=True)  # with checkpointing: recompute through the NF4 kernels
    report = _check_report("llama", patched)
    # CPU: 4 interpreted steps (the 4 distinct batches) keep the file's time budget; CUDA: 20.
    n_steps = 4 if device == "cpu" else 20
    _check_training(plain, patched, truth, _batches(n_steps, device, seed=2), dtype)
    assert report.calls["qkv"] > 0 and report.calls["mlp"] > 0
    # every layer's re-run skipped the output (a re-run stops inside lora_mlp, so "mlp" counts forwards only)
    assert report.calls["mlp_output_skipped"] == report.calls["mlp"] == n_steps * 2
