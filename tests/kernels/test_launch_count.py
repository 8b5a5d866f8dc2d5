"""Kernel launches per decoder layer of a patched model, pinned: host cost cannot creep back unnoticed.

A QLoRA step of an 8B model is host-bound (docs/kernels.md): each kernel launch costs the host 10-80 us, and a
decoder layer's launches repeat 32 times in the forward and again in the checkpoint re-run. This test counts, on CPU
under Triton's interpreter (`tests/kernels/launches.py`), the Triton launches and the kernel-launching ATen ops of
one training step (forward, then backward with the checkpoint re-run) of a patched NF4 Llama with LoRA on all
seven projections, for a model of 1 and of 2 decoder layers: the difference is exactly one decoder layer's
launches. Those numbers are pinned (`PER_LAYER`): a change that adds launches fails here, and one that removes
launches updates the pin (and docs/kernels.md) on purpose. The same code makes the same calls on CUDA: dispatch
depends on the tensor type alone.

Pinned: the step of the daemon's recipe (NF4 base, bf16 compute, LoRA weights in fp32 as peft keeps them,
checkpointing on, optimizer grads set to None between steps), second step (the first warms the caches).
"""

from __future__ import annotations

import pytest
import torch

from . import tiny_llama
from .launches import count_launches, total
from .patching import patch_model, unpatch_afterwards  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts under the CPU interpreter")

# One decoder layer's launches in one training step: (forward, backward incl. the checkpoint re-run).
PER_LAYER = {"forward": 27, "backward": 66}
# ... of which Triton launches (RMSNorm x2, RoPE, NF4 dequant x4, gated activation, and in the forward the
# LoRA operands of the four projection groups, once per step; see docs/kernels.md).
PER_LAYER_TRITON = {"forward": 12, "backward": 15}


@pytest.fixture(scope="module")
def saved_llamas(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch-llama")
    for layers in (1, 2):
        tiny_llama.save(path / str(layers), layers)
    return path


def _step_launches(model):
    """(forward counter, backward counter) of the second training step."""
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    model(input_ids=ids, labels=ids).loss.backward()
    for p in params:
        p.grad = None  # as optimizer.zero_grad(set_to_none=True): no accumulation adds in the next backward
    with count_launches() as forward:
        loss = model(input_ids=ids, labels=ids).loss
    with count_launches() as backward:
        loss.backward()
    return forward, backward


def test_launches_per_decoder_layer_are_pinned(saved_llamas):
    counts = {}
    for layers in (1, 2):
        model = tiny_llama.load(saved_llamas / str(layers), "cpu", quantized=True)
        patch_model(model, force=True)
        counts[layers] = _step_launches(model)
    per_layer = {phase: counts[2][i] - counts[1][i] for i, phase in enumerate(("forward", "backward"))}
    assert all(v >= 0 for c in per_layer.values() for v in c.values()), per_layer
    detail = {phase: dict(sorted(c.items())) for phase, c in per_layer.items()}
    assert {phase: total(c) for phase, c in per_layer.items()} == PER_LAYER, detail
    triton = {phase: sum(v for k, v in c.items() if k.startswith("triton:")) for phase, c in per_layer.items()}
    assert triton == PER_LAYER_TRITON, detail


def test_counter_counts_launches_not_views():
    from sloth_kernels.rms_norm import rms_norm

    x = torch.randn(4, 64, requires_grad=True)
    w = torch.ones(64)
    with count_launches() as c:
        y = rms_norm(x, w, 1e-6, 0.0)
        y.view(2, 2, 64).transpose(0, 1)  # views: no launch
        (y * 2).sum()
    assert c["triton:_rms_norm_fwd_kernel"] == 1
    assert c["aten:mul"] == 1 and c["aten:sum"] == 1
    assert not any(k in c for k in ("aten:view", "aten:transpose", "aten:empty"))
