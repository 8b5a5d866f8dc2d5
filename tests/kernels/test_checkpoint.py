"""Activation checkpointing: with it, loss and every grad equal those without it (dropout on, same seed).

A tiny random Llama (eager attention, attention dropout 0.3) is trained one step with and without checkpointing.
That the layer really re-runs is checked by counting calls of a submodule; that the RNG is replayed follows from
the grads matching with dropout on. Offload is exercised for real on CUDA (pinned host copies, prefetch) and, on
CPU, both as the documented fallback and through the bookkeeping test hook `_OFFLOAD_ON_CPU`.
"""

import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import sloth_kernels.checkpoint as ckpt
from sloth_kernels.checkpoint import (
    checkpoint_layer,
    disable_checkpointing,
    enable_checkpointing,
    checkpointed,
    offload_stats,
    recomputing,
    reset_offload_stats,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
N_LAYERS = 3


def _tiny_llama(device, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.3, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(device).train()


def _batch(device):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (2, 9), generator=gen).to(device)
    return ids, torch.ones_like(ids)


def _step(model, device, seed=123):
    """One forward+backward under a fixed seed; returns the loss and the grads of all trainable params."""
    ids, mask = _batch(device)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _count_mlp_calls(model):
    calls = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _assert_same(a, b, device, what):
    tol = 1e-6 if device == "cpu" else 1e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload", [False, True])
def test_checkpoint_layer_with_kwargs(device, offload, monkeypatch):
    """A decoder layer called with tensor kwargs (cos/sin that require grad, a mask, position ids)."""
    if device == "cpu" and offload:
        monkeypatch.setattr(ckpt, "_OFFLOAD_ON_CPU", True)
    model = _tiny_llama(device)
    layer = model.model.layers[1]
    torch.manual_seed(1)
    x0 = torch.randn(2, 9, 48, device=device, requires_grad=True)
    cos0 = torch.randn(2, 9, 12, device=device, requires_grad=True)
    sin0 = torch.randn(2, 9, 12, device=device, requires_grad=True)
    mask = torch.full((9, 9), float("-inf"), device=device).triu(1).expand(2, 1, 9, 9)
    pos = torch.arange(9, device=device).unsqueeze(0)
    calls = []
    layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))

    def run(wrap):
        torch.manual_seed(5)
        x = x0 * 1.5  # a non-leaf input, as between layers
        kwargs = dict(attention_mask=mask, position_embeddings=(cos0 * 1.0, sin0 * 1.0), position_ids=pos)
        out = checkpoint_layer(layer, x, offload=offload, **kwargs) if wrap else layer(x, **kwargs)
        # a second use of the same RNG after the layer: the replay must not disturb the caller's RNG stream
        noise = torch.rand(3, device=device)
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), [x0, cos0, sin0, *layer.parameters()])
        return out.detach(), noise, grads

    reset_offload_stats()
    out_ref, noise_ref, grads_ref = run(wrap=False)
    assert len(calls) == 1
    out, noise, grads = run(wrap=True)
    assert len(calls) == 3, "the checkpointed layer must run once in forward and once more in backward"
    _assert_same(out, out_ref, device, "output")
    assert torch.equal(noise, noise_ref)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        _assert_same(g, g_ref, device, f"grad {i}")
    stats = offload_stats()
    assert stats["offloaded"] == stats["fetched"] == (1 if offload else 0)


@pytest.mark.parametrize("offload", [False, True])
def test_recomputing_is_true_only_in_the_rerun(offload, monkeypatch):
    """`recomputing()` tells the backward's re-run from the forward (what lora_mlp's output skip relies on)."""
    monkeypatch.setattr(ckpt, "_OFFLOAD_ON_CPU", True)
    lin = torch.nn.Linear(8, 8)
    seen = []

    def layer(t):
        seen.append((recomputing(), checkpointed()))
        return torch.tanh(lin(t))

    out = checkpoint_layer(layer, torch.randn(3, 8, requires_grad=True), offload=offload)
    assert seen == [(False, True)] and not recomputing() and not checkpointed()
    out.sum().backward()
    assert seen == [(False, True), (True, True)] and not recomputing() and not checkpointed()
    with torch.no_grad():  # no checkpointing without grad: a plain call
        checkpoint_layer(layer, torch.randn(3, 8), offload=offload)
    assert seen[-1] == (False, False)


@pytest.mark.parametrize("offload", [False, True])
def test_offload_keeps_no_device_reference_to_the_input(offload, monkeypatch):
    """The memory contract: recompute keeps the layer input alive until backward, offload keeps only a host copy."""
    monkeypatch.setattr(ckpt, "_OFFLOAD_ON_CPU", True)
    lin = torch.nn.Linear(16, 16)
    x0 = torch.randn(4, 16, requires_grad=True)
    x = x0 * 2.0  # the previous layer's output: nothing but this frame holds it
    alive = weakref.ref(x)
    out = checkpoint_layer(lambda t: torch.relu(lin(t)) * t, x, offload=offload)
    del x
    assert (alive() is not None) == (not offload)
    (grad,) = torch.autograd.grad(out.sum(), [x0])
    # the same grad as plain autograd without checkpointing
    x0_ref = x0.detach().clone().requires_grad_()
    xr = x0_ref * 2.0
    (torch.relu(lin(xr)) * xr).sum().backward()
    torch.testing.assert_close(grad, x0_ref.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_reuses_its_pinned_buffers_and_captures_in_a_graph():
    """Once a step has run, the next allocates no pinned memory; a step with offload is then captured in a CUDA
    graph (the layers called through checkpoint_layer directly, no HF mask code), and its replays give the eager
    step's loss and grads."""
    model = _tiny_llama("cuda")
    layers = model.model.layers
    for layer in layers:
        layer.self_attn.attention_dropout = 0.0  # no RNG: under capture the re-run cannot replay saved RNG state
    torch.manual_seed(1)
    x0 = torch.randn(2, 9, 48, device="cuda", requires_grad=True)
    pos = torch.arange(9, device="cuda").unsqueeze(0)
    mask = torch.full((9, 9), float("-inf"), device="cuda").triu(1).expand(2, 1, 9, 9)
    cos, sin = model.model.rotary_emb(x0, pos)
    params = [x0] + [p for p in layers.parameters()]

    def step():
        x = x0 * 1.5
        for layer in layers:
            x = checkpoint_layer(layer, x, offload=True, attention_mask=mask, position_embeddings=(cos, sin),
                                 position_ids=pos)
        loss = (x.float() ** 2).mean()
        loss.backward()
        return loss

    def grads():
        out = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        return out

    reset_offload_stats()
    loss_ref = step().detach()
    grads_ref = grads()
    assert offload_stats()["pinned"] == N_LAYERS
    step()
    grads()
    assert offload_stats()["pinned"] == N_LAYERS, "the second step must reuse the pooled buffers"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(loss, loss_ref, "cuda", "graphed loss")
        for i, (p, ref) in enumerate(zip(params, grads_ref)):
            _assert_same(p.grad, ref, "cuda", f"graphed grad {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["recompute", "offload", "offload_cpu_fallback"])
@pytest.mark.parametrize("wrapper", ["hf", "peft"])
def test_enable_checkpointing_matches_plain_training(device, mode, wrapper, monkeypatch):
    if mode == "offload_cpu_fallback" and device != "cpu":
        pytest.skip("the fallback is the CPU behaviour")
    if mode == "offload" and device == "cpu":
        monkeypatch.setattr(ckpt, "_OFFLOAD_ON_CPU", True)
    model = _tiny_llama(device)
    if wrapper == "peft":  # frozen base: the first layer's input does not require grad
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        torch.manual_seed(3)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)  # non-zero B, so every LoRA grad is non-trivial
    calls = _count_mlp_calls(model)

    loss_ref, grads_ref = _step(model, device)
    assert len(calls) == N_LAYERS
    reset_offload_stats()
    assert enable_checkpointing(model, offload=mode != "recompute") == N_LAYERS
    loss, grads = _step(model, device)
    assert len(calls) == 3 * N_LAYERS, "each layer must be recomputed in the backward"

    _assert_same(loss, loss_ref, device, "loss")
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads:
        _assert_same(grads[name], grads_ref[name], device, name)

    stats = offload_stats()
    if mode == "offload":
        assert stats["offloaded"] == stats["fetched"] == N_LAYERS
        assert stats["prefetched"] == N_LAYERS - 1  # every layer but the last is fetched ahead of its re-run
        assert stats["pinned"] == (N_LAYERS if device == "cuda" else 0)
        assert stats["bytes"] == N_LAYERS * 2 * 9 * 48 * 4
    else:
        assert stats["offloaded"] == 0

    # eval / no-grad runs the layers once, and disabling restores plain training
    model.eval()
    with torch.no_grad():
        model(input_ids=_batch(device)[0])
    assert len(calls) == 4 * N_LAYERS
    model.train()
    disable_checkpointing(model)
    loss_again, _ = _step(model, device)
    assert len(calls) == 5 * N_LAYERS
    _assert_same(loss_again, loss_ref, device, "loss after disable")


def test_enable_checkpointing_wraps_plain_modules():
    """Layers that are not transformers' GradientCheckpointingLayer get an instance-level forward wrapper."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, scale=None):
            return x + self.drop(torch.tanh(self.lin(x))) * scale

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x, scale):
            for layer in self.layers:
                x = layer(x, scale=scale)
            return x

    torch.manual_seed(0)
    stack = Stack().train()
    x = torch.randn(4, 8)
    scale = torch.tensor(0.7, requires_grad=True)
    calls = []
    for layer in stack.layers:
        layer.lin.register_forward_pre_hook(lambda *_: calls.append(1))

    def step():
        torch.manual_seed(9)
        return torch.autograd.grad(stack(x, scale).square().sum(), [scale, *stack.parameters()])

    ref = step()
    assert enable_checkpointing(stack) == 2
    got = step()
    assert len(calls) == 2 + 4
    for g, r in zip(got, ref):
        _assert_same(g, r, "cpu", "grad")
    disable_checkpointing(stack)
    assert "forward" not in stack.layers[0].__dict__
    step()
    assert len(calls) == 6 + 2


def test_no_decoder_layers_is_an_error():
    with pytest.raises(ValueError, match="no decoder layers"):
        enable_checkpointing(torch.nn.Linear(2, 2))
