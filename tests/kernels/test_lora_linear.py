"""LoRA projections: forward and grads (x, A, B, bias) against the reference and against peft's own modules.

Both NF4 matmul backends ("dequant": Triton dequant + matmul, "fused": NF4 tiles decoded inside a Triton GEMM) run
on NF4 weights made by bitsandbytes (with and without double quant) and on dense weights, fp32 and bf16, odd sizes
and non-contiguous inputs. A tiny Llama with LoRA r=8 on all seven projections (4-bit via bitsandbytes on CPU, and
dense) checks lora_qkv / lora_o / lora_mlp against the peft modules' forward and autograd through them.
"""

import os

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import sloth_kernels.lora_linear as ll
from sloth_kernels.lora_linear import (
    LoraNotApplicable,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_o,
    lora_parts,
    lora_qkv,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
BACKENDS = ["dequant", "fused"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(ll, "MATMUL_BACKEND", request.param)
    return request.param


def _assert_close(got, ref, dtype, what):
    """fp32: ~1e-5 relative; bf16: ~1e-2 of the reference's magnitude (reference computed in fp32)."""
    scale = max(ref.detach().abs().max().item(), 1e-3)
    rtol, atol = (1e-5, 1e-5 * scale) if dtype == torch.float32 else (1e-2, 1e-2 * scale)
    torch.testing.assert_close(got.detach().float(), ref.detach().float(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _nf4_weight(out_f, in_f, nested, device, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * in_f**-0.5
    param = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=nested, quant_type="nf4").to(device)
    return param, param.quant_state


# ----------------------------------------------------------------------------------------------------------------
# lora_linear on tensors
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["nf4", "nf4_nested", "dense"])
def test_lora_linear_matches_reference(device, dtype, kind, backend):
    # CPU: odd sizes (37 out, 21 rows, rank 5); CUDA: an 8B-like slice.
    (batch, seq, in_f, out_f, rank) = (3, 7, 128, 37, 5) if device == "cpu" else (2, 256, 4096, 1024, 16)
    torch.manual_seed(0)
    if kind == "dense":
        weight, qs = (torch.randn(out_f, in_f) * in_f**-0.5).to(device, dtype), None
    else:
        weight, qs = _nf4_weight(out_f, in_f, kind == "nf4_nested", device, seed=1)
    has_bias = kind != "nf4"
    bias = (torch.randn(out_f, device=device) * 0.1).requires_grad_() if has_bias else None
    A = (torch.randn(rank, in_f, device=device) * 0.1).requires_grad_()
    B = (torch.randn(out_f, rank, device=device) * 0.1).requires_grad_()
    # Non-contiguous input: every other column of a wider tensor.
    x = torch.randn(batch, seq, 2 * in_f, device=device).to(dtype)[..., ::2].detach().requires_grad_()
    assert not x.is_contiguous()

    y = lora_linear(x, weight, qs, A, B, 1.75, bias)
    assert y.shape == (batch, seq, out_f) and y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)

    xr = x.detach().float().requires_grad_()
    Ar, Br = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    br = bias.detach().clone().requires_grad_() if has_bias else None
    yr = lora_linear_reference(xr, weight, qs, Ar, Br, 1.75, br)
    yr.backward(dy.float())

    _assert_close(y, yr, dtype, "y")
    _assert_close(x.grad, xr.grad, dtype, "dx")
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    _assert_close(A.grad, Ar.grad, dtype, "dA")
    _assert_close(B.grad, Br.grad, dtype, "dB")
    if has_bias:
        _assert_close(bias.grad, br.grad, dtype, "dbias")


def test_reference_base_equals_bitsandbytes_linear4bit():
    """With B = 0 the reference is exactly bnb's Linear4bit forward (dequant math and orientation)."""
    torch.manual_seed(3)
    layer = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(40, 128) * 0.1, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    x = torch.randn(3, 5, 128, requires_grad=True)  # requires grad: bnb keeps its trainable path
    A, B = torch.randn(4, 128), torch.zeros(40, 4)
    expected = layer(x)
    ref = lora_linear_reference(x, layer.weight, layer.weight.quant_state, A, B, 2.0, layer.bias)
    torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-6)


def test_rejects_trainable_base_weight():
    w = torch.randn(8, 16, requires_grad=True)
    with pytest.raises(LoraNotApplicable, match="requires grad"):
        lora_linear(torch.randn(2, 16), w, None, torch.randn(2, 16), torch.randn(8, 2), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# peft modules
# ----------------------------------------------------------------------------------------------------------------
def _llama_config():
    # in-features are whole NF4 blocks (64): bnb's own CPU dequant is only right for those (see test_nf4).
    return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(_llama_config()).save_pretrained(path)
    return path


def _peft_llama(saved_llama, quantized, dtype, device="cpu", **lora_kwargs):
    if quantized:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=dtype)
        model = LlamaForCausalLM.from_pretrained(saved_llama, quantization_config=qconfig, device_map=device,
                                                 dtype=dtype)
    else:
        model = LlamaForCausalLM.from_pretrained(saved_llama, dtype=dtype).to(device)
    torch.manual_seed(1)
    # init_lora_weights=False: random B too, so the LoRA branch is non-zero.
    options = dict(r=8, lora_alpha=16, target_modules=PROJECTIONS, lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(model, LoraConfig(**{**options, **lora_kwargs}))
    model.train()
    return model, model.get_base_model().model.layers[0]


def _lora_params(layer):
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


def _run_block(layer, x, fast):
    """(q, k, v, o, mlp) of x through our fused functions (fast) or the modules' own forward."""
    attn, mlp = layer.self_attn, layer.mlp
    if fast:
        q, k, v = lora_qkv(x, attn.q_proj, attn.k_proj, attn.v_proj)
        return q, k, v, lora_o(x, attn.o_proj), lora_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(x), mlp(x)


def _grads_of_block(layer, x, fast, weights):
    params = _lora_params(layer)
    for p in params.values():
        p.grad = None
    xi = x.detach().requires_grad_()
    outs = _run_block(layer, xi, fast)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    return outs, xi.grad, {n: p.grad.clone() for n, p in params.items()}


# Per-projection ranks and alphas: the stacked groups' block-diagonal up-projection must keep each one's own.
PATTERNS = dict(rank_pattern={"k_proj": 4, "up_proj": 4}, alpha_pattern={"v_proj": 5, "gate_proj": 3, "q_proj": 24})


@pytest.mark.parametrize("quantized,patterns", [(True, False), (False, False), (True, True)])
def test_fused_groups_match_peft_modules_fp32(saved_llama, quantized, patterns, backend):
    model, layer = _peft_llama(saved_llama, quantized, torch.float32, **(PATTERNS if patterns else {}))
    if patterns:
        attn, mlp = layer.self_attn, layer.mlp
        assert len({attn.q_proj.scaling["default"], attn.k_proj.scaling["default"], attn.v_proj.scaling["default"]}) == 3
        assert mlp.gate_proj.scaling["default"] != mlp.up_proj.scaling["default"]
    torch.manual_seed(2)
    x = torch.randn(5, 2, 64).transpose(0, 1)  # [2, 5, 64], non-contiguous
    weights = [torch.randn(2, 5, n) for n in (64, 32, 32, 64, 64)]
    outs, dx, grads = _grads_of_block(layer, x, True, weights)
    ref_outs, ref_dx, ref_grads = _grads_of_block(layer, x, False, weights)
    for name, o, r in zip(("q", "k", "v", "o", "mlp"), outs, ref_outs):
        assert o.shape == r.shape
        _assert_close(o, r, torch.float32, name)
    _assert_close(dx, ref_dx, torch.float32, "dx")
    assert len(grads) == 14
    for name in grads:
        _assert_close(grads[name], ref_grads[name], torch.float32, name)


@pytest.mark.parametrize("quantized", [True, False])
def test_fused_groups_bf16(saved_llama, quantized, backend):
    """bf16 model (bnb compute dtype bf16, peft's LoRA weights kept fp32) vs the reference in fp32 from the same
    bf16 inputs; and loosely vs peft's own bf16 forward."""
    model, layer = _peft_llama(saved_llama, quantized, torch.bfloat16)
    attn, mlp = layer.self_attn, layer.mlp
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    weights = [torch.randn(2, 5, n) for n in (64, 32, 32, 64, 64)]
    outs, dx, grads = _grads_of_block(layer, x, True, weights)

    params = _lora_params(layer)
    for p in params.values():
        p.grad = None
    xr = x.float().requires_grad_()
    ref_outs = [lora_linear_reference(xr, *lora_parts(m)) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    ref_outs.append(lora_linear_reference(xr, *lora_parts(attn.o_proj)))
    ref_outs.append(lora_mlp_reference(xr, mlp.gate_proj, mlp.up_proj, mlp.down_proj, compute_dtype=torch.float32))
    sum((o * w).sum() for o, w in zip(ref_outs, weights)).backward()
    for name, o, r in zip(("q", "k", "v", "o", "mlp"), outs, ref_outs):
        assert o.dtype == torch.bfloat16
        _assert_close(o, r, torch.bfloat16, name)
    _assert_close(dx, xr.grad, torch.bfloat16, "dx")
    for name, p in params.items():
        _assert_close(grads[name], p.grad, torch.bfloat16, name)

    with torch.no_grad():
        for name, o, r in zip(("q", "k", "v", "o", "mlp"), outs, _run_block(layer, x, False)):
            torch.testing.assert_close(o.float(), r.float(), rtol=3e-2, atol=3e-2 * r.float().abs().max().item(),
                                       msg=lambda m: f"{name} vs peft: {m}")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_mlp_recompute_switch_and_gelu(saved_llama, activation, backend, monkeypatch):
    """Saving gate/up instead of recomputing gives the same grads; GeGLU (tanh) against the reference."""
    model, layer = _peft_llama(saved_llama, True, torch.float32)
    mlp = layer.mlp
    torch.manual_seed(4)
    x = torch.randn(3, 3, 64)
    dy = torch.randn(3, 3, 64)
    params = _lora_params(mlp)

    def run(fn, recompute):
        monkeypatch.setattr(ll, "MLP_RECOMPUTE", recompute)
        for p in params.values():
            p.grad = None
        xi = x.clone().requires_grad_()
        y = fn(xi, mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation)
        y.backward(dy)
        return y, xi.grad, {n: p.grad.clone() for n, p in params.items()}

    ref = run(lora_mlp_reference, True)
    for recompute in (True, False):
        y, dx, grads = run(lora_mlp, recompute)
        _assert_close(y, ref[0], torch.float32, f"y recompute={recompute}")
        _assert_close(dx, ref[1], torch.float32, f"dx recompute={recompute}")
        for name in grads:
            _assert_close(grads[name], ref[2][name], torch.float32, f"{name} recompute={recompute}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute", [True, False])
def test_mlp_without_output_gives_the_same_grads(saved_llama, dtype, recompute, backend, monkeypatch):
    """compute_output=False (a checkpoint re-run) builds the same node: dx and every LoRA grad bit for bit, whether
    the backward recomputes gate/up or keeps them (patch_model's setting under checkpointing)."""
    monkeypatch.setattr(ll, "MLP_RECOMPUTE", recompute)
    model, layer = _peft_llama(saved_llama, True, dtype)
    mlp = layer.mlp
    torch.manual_seed(6)
    x = torch.randn(2, 5, 64).to(dtype)
    dy = torch.randn(2, 5, 64).to(dtype)
    params = _lora_params(mlp)
    results = []
    for compute_output in (True, False):
        for p in params.values():
            p.grad = None
        xi = x.clone().requires_grad_()
        y = lora_mlp(xi, mlp.gate_proj, mlp.up_proj, mlp.down_proj, compute_output=compute_output)
        assert y.shape == x.shape and y.dtype == dtype
        y.backward(dy)
        results.append((xi.grad, {n: p.grad.clone() for n, p in params.items()}))
    (dx, grads), (dx_skip, grads_skip) = results
    assert torch.equal(dx, dx_skip)
    assert grads.keys() == grads_skip.keys() and len(grads) == 6
    for name in grads:
        assert torch.equal(grads[name], grads_skip[name]), name


def test_cast_cache_follows_the_epoch(saved_llama, backend):
    """Within one cache epoch the compute-dtype LoRA weights are cast once; a new epoch sees weights changed even
    where no version counter moved (`.data` writes, fused AdamW); no epoch caches nothing."""
    model, layer = _peft_llama(saved_llama, True, torch.bfloat16)
    o_proj = layer.self_attn.o_proj
    A = o_proj.lora_A["default"].weight
    assert A.dtype == torch.float32  # peft keeps LoRA fp32: the op casts it
    x = torch.randn(2, 3, 64).to(torch.bfloat16)

    def run(epoch):
        with torch.no_grad():
            return lora_o(x, o_proj, cache_epoch=epoch).float()

    before = run(epoch=1)
    version = A._version
    A.data.add_(0.5)  # changes the weight, not its version counter
    assert A._version == version
    stale, fresh, uncached = run(epoch=1), run(epoch=2), run(epoch=None)
    assert torch.equal(stale, before)  # same epoch: the caller promised nothing changed
    assert not torch.equal(fresh, before)
    assert torch.equal(fresh, uncached)
    ref = lora_linear_reference(x, *lora_parts(o_proj)).float()
    _assert_close(fresh, ref, torch.bfloat16, "o after the update")


def test_stacked_and_block_caches_follow_the_epoch(saved_llama, backend):
    """q/k/v and gate/up use cached stacked A and block-diagonal B: a new epoch sees every changed A and B."""
    model, layer = _peft_llama(saved_llama, True, torch.bfloat16)
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(2, 3, 64).to(torch.bfloat16)

    def run(epoch):
        with torch.no_grad():
            q, k, v = lora_qkv(x, attn.q_proj, attn.k_proj, attn.v_proj, cache_epoch=epoch)
            y = lora_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, cache_epoch=epoch)
        return [t.float() for t in (q, k, v, y)]

    before = run(epoch=10)
    for proj in (attn.k_proj, mlp.up_proj):  # one A and one B inside each stacked group
        proj.lora_A["default"].weight.data.mul_(-1)
        proj.lora_B["default"].weight.data.add_(0.25)
    stale, fresh = run(epoch=10), run(epoch=11)
    for name, b_, s_, f_ in zip("qkvy", before, stale, fresh):
        assert torch.equal(s_, b_), name
    assert torch.equal(fresh[0], before[0])  # q's own weights did not change
    assert not torch.equal(fresh[1], before[1]) and not torch.equal(fresh[3], before[3])
    refs = [lora_linear_reference(x, *lora_parts(m)) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    refs.append(lora_mlp_reference(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    for name, got, ref in zip("qkvy", fresh, refs):
        _assert_close(got, ref.float(), torch.bfloat16, name)


def test_module_parts_are_looked_up_once(saved_llama, monkeypatch):
    """What lora_parts finds on a peft module is reused until the module's LoRA state or tensors change."""
    model, layer = _peft_llama(saved_llama, True, torch.float32)
    o_proj = layer.self_attn.o_proj
    calls = []
    real = ll.lora_parts
    monkeypatch.setattr(ll, "lora_parts", lambda m: calls.append(m) or real(m))
    x = torch.randn(2, 3, 64)
    first = lora_o(x, o_proj)
    for _ in range(3):
        assert torch.equal(lora_o(x, o_proj), first)
    assert len(calls) == 1
    o_proj.scaling["default"] *= 2  # what set_scale does: seen, and the output follows
    doubled = lora_o(x, o_proj)
    assert len(calls) == 2 and not torch.equal(doubled, first)
    model.eval()
    lora_o(x, o_proj)
    assert len(calls) == 3
    o_proj.lora_B["default"].weight = torch.nn.Parameter(torch.zeros(64, 8))  # a re-created adapter weight
    base_only = lora_o(x, o_proj)
    assert len(calls) == 4
    _assert_close(base_only, lora_linear_reference(x, *real(o_proj)), torch.float32, "after the new B")


def test_module_parts_follow_the_base_weight_storage(saved_llama):
    """`.to()` and `.data =` keep the Parameter but swap its storage; unfreezing it makes the op not apply."""
    model, layer = _peft_llama(saved_llama, False, torch.float32)
    o_proj = layer.self_attn.o_proj
    x = torch.randn(2, 3, 64)
    first = lora_o(x, o_proj)
    base = o_proj.get_base_layer().weight
    base.data = base.data * 2
    doubled = lora_o(x, o_proj)
    assert not torch.equal(doubled, first)
    _assert_close(doubled, lora_linear_reference(x, *lora_parts(o_proj)), torch.float32, "after the new storage")
    base.requires_grad_(True)
    with pytest.raises(LoraNotApplicable, match="requires grad"):
        lora_o(x, o_proj)


def test_lora_weight_changed_between_forward_and_backward_is_an_error(saved_llama):
    """LoRA weights ride on ctx, not save_for_backward: the op makes autograd's version check itself."""
    model, layer = _peft_llama(saved_llama, True, torch.float32)
    o_proj = layer.self_attn.o_proj
    y = lora_o(torch.randn(2, 3, 64, requires_grad=True), o_proj)
    with torch.no_grad():
        o_proj.lora_A["default"].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_mlp_inside_checkpoint_may_overwrite_its_saved_gate_up(saved_llama, monkeypatch):
    """In a checkpointed layer lora_mlp's backward overwrites the re-run's g/u instead of cloning them: grads equal
    the plain ones, also for a second backward through a retained graph (which re-runs the layer again)."""
    from sloth_kernels.checkpoint import checkpoint_layer

    model, layer = _peft_llama(saved_llama, True, torch.float32)
    mlp = layer.mlp
    monkeypatch.setattr(ll, "MLP_RECOMPUTE", False)  # keep g/u, as patch_model does under checkpointing
    torch.manual_seed(7)
    x, dy = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    params = _lora_params(mlp)

    def plain(t):
        return lora_mlp(t, mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def grads(fn, backwards):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        runs = []
        for i in range(backwards):
            for p in params.values():
                p.grad = None
            xi.grad = None
            y.backward(dy, retain_graph=i + 1 < backwards)
            runs.append((xi.grad.clone(), {n: p.grad.clone() for n, p in params.items()}))
        return runs

    (ref_dx, ref_grads), *again = grads(plain, 2)  # outside a checkpoint the backward clones: retainable
    for dx, got in again + grads(lambda t: checkpoint_layer(plain, t), 2):
        _assert_close(dx, ref_dx, torch.float32, "dx")
        for name in ref_grads:
            _assert_close(got[name], ref_grads[name], torch.float32, name)


def test_unused_outputs_give_zero_grads(saved_llama):
    """Only q feeds the loss: q's LoRA grads match peft, k/v's are zero (not garbage)."""
    model, layer = _peft_llama(saved_llama, True, torch.float32)
    attn = layer.self_attn
    x = torch.randn(2, 3, 64)
    xi = x.clone().requires_grad_()
    q, _, _ = lora_qkv(xi, attn.q_proj, attn.k_proj, attn.v_proj)
    q.square().sum().backward()
    xr = x.clone().requires_grad_()
    params = {n: p for n, p in _lora_params(attn).items() if "o_proj" not in n}
    ours = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    attn.q_proj(xr).square().sum().backward()
    _assert_close(xi.grad, xr.grad, torch.float32, "dx")
    for name, p in params.items():
        if "q_proj" in name:
            _assert_close(ours[name], p.grad, torch.float32, name)
        else:
            assert p.grad is None and not ours[name].any(), name


def test_autocast_runs_in_autocast_dtype(saved_llama):
    model, layer = _peft_llama(saved_llama, True, torch.float32)
    attn = layer.self_attn
    x = torch.randn(2, 3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = lora_qkv(x, attn.q_proj, attn.k_proj, attn.v_proj)
    assert q.dtype == torch.bfloat16
    (q.float().sum() + v.float().sum()).backward()
    assert x.grad.dtype == torch.float32
    ref = lora_linear_reference(x.detach(), *lora_parts(attn.q_proj))
    _assert_close(q, ref, torch.bfloat16, "q under autocast")


def test_reference_path_without_triton(saved_llama, monkeypatch):
    """On CPU without the interpreter the public functions run the reference, and it equals the modules."""
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    model, layer = _peft_llama(saved_llama, True, torch.float32)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        for name, o, r in zip(("q", "k", "v", "o", "mlp"), _run_block(layer, x, True), _run_block(layer, x, False)):
            _assert_close(o, r, torch.float32, name)


def test_lora_parts(saved_llama):
    model, layer = _peft_llama(saved_llama, True, torch.float32)
    q = layer.self_attn.q_proj
    weight, qs, A, B, scaling, bias = lora_parts(q)
    assert isinstance(weight, bnb.nn.Params4bit) and qs is weight.quant_state and tuple(qs.shape) == (64, 64)
    assert A.shape == (8, 64) and B.shape == (64, 8) and scaling == 2.0 and bias is None

    with pytest.raises(LoraNotApplicable, match="not a peft LoRA layer"):
        lora_parts(torch.nn.Linear(4, 4))
    q.merge()
    with pytest.raises(LoraNotApplicable, match="merged"):
        lora_parts(q)
    q.unmerge()
    model.add_adapter("second", LoraConfig(r=4, target_modules=PROJECTIONS))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(LoraNotApplicable, match="exactly one active adapter"):
        lora_parts(q)
    model.base_model.set_adapter("default")
    lora_parts(q)
    with model.disable_adapter():
        with pytest.raises(LoraNotApplicable, match="disabled"):
            lora_parts(q)


@pytest.mark.parametrize("kwargs, match", [({"lora_dropout": 0.1}, "lora_dropout"), ({"use_dora": True}, "DoRA")])
def test_lora_parts_rejects_training_variants(saved_llama, kwargs, match):
    model, layer = _peft_llama(saved_llama, False, torch.float32, **kwargs)
    with pytest.raises(LoraNotApplicable, match=match):
        lora_parts(layer.self_attn.v_proj)
    if "lora_dropout" in kwargs:
        model.eval()  # dropout is the identity in eval mode: fine then
        lora_parts(layer.self_attn.v_proj)


def test_bnb_compute_dtype_is_the_compute_dtype(saved_llama):
    """fp32 activations into a 4-bit layer whose bnb compute dtype is bf16 (what prepare_model_for_kbit_training
    leads to): computed and returned in bf16, dx back in fp32; the reference does the same."""
    model, layer = _peft_llama(saved_llama, True, torch.bfloat16)
    attn, mlp = layer.self_attn, layer.mlp
    x = torch.randn(2, 3, 64, requires_grad=True)
    q, k, v = lora_qkv(x, attn.q_proj, attn.k_proj, attn.v_proj)
    y = lora_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    assert q.dtype == y.dtype == torch.bfloat16
    (q.float().sum() + y.float().sum()).backward()
    assert x.grad.dtype == torch.float32
    xb = x.detach().to(torch.bfloat16)
    _assert_close(q, lora_linear_reference(xb.float(), *lora_parts(attn.q_proj)), torch.bfloat16, "q")
    ref = lora_mlp_reference(xb.float(), mlp.gate_proj, mlp.up_proj, mlp.down_proj, compute_dtype=torch.float32)
    _assert_close(y, ref, torch.bfloat16, "mlp")
    with torch.no_grad():
        assert lora_mlp_reference(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj).dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_lora_operands_kernel_matches_torch(device, out_dtype, count):
    """One launch builds a group's stacked A and block-diagonal s B^T: equal to the torch construction (a cast, a
    cat, a scaled copy per block into zeros), odd ranks and widths; a non-contiguous weight takes the torch path."""
    gen = torch.Generator().manual_seed(count)
    ranks, widths, k = [3, 5, 7][:count], [33, 17, 9][:count], 45
    As = [torch.randn(r, k, generator=gen).to(device) for r in ranks]
    Bs = [torch.randn(n, r, generator=gen).to(device) for n, r in zip(widths, ranks)]
    scalings = [2.0, 0.5, 1.0][:count]
    a, bt = ll._lora_operands(As, Bs, scalings, out_dtype)
    a_ref, bt_ref = ll._lora_operands_torch(As, Bs, scalings, out_dtype)
    assert a.shape == (sum(ranks), k) and bt.shape == (sum(ranks), sum(widths)) and a.dtype == bt.dtype == out_dtype
    assert torch.equal(a, a_ref) and torch.equal(bt, bt_ref)  # casts round to nearest even in both
    strided = [B.t().contiguous().t() for B in Bs]  # same values, column-major
    a2, bt2 = ll._lora_operands(As, strided, scalings, out_dtype)
    assert torch.equal(a2, a_ref) and torch.equal(bt2, bt_ref)
