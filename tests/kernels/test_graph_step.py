"""GraphedStep: a training step replayed from a CUDA graph trains exactly as the same eager steps.

CUDA: a patched tiny Llama (LoRA on all seven projections, NF4 base on CUDA, checkpointing with and without offload)
trained for 6 steps over two input shapes (two graphs), one of them packed rows with position ids, gives the
per-step losses and final LoRA weights of the same eager loop (same kernels; the graph replays them). CPU: the
class runs eager steps (no graphs) and trains as a plain loop does (unpatched model: the plumbing alone).
"""

from __future__ import annotations

import pytest
import torch

from sloth_kernels.graph_step import GraphedStep

from . import tiny_llama
from .patching import patch_model, unpatch_afterwards  # noqa: F401 (autouse fixture)

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph-llama")
    tiny_llama.save(path)
    return path


def _batches(device):
    """Six steps over two shapes: plain rows [2, 16] and packed rows [1, 24] (examples of 10 and 14 tokens)."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for step in range(6):
        if step % 2 == 0:
            ids = torch.randint(3, 128, (2, 16), generator=gen)
            out.append({"input_ids": ids.to(device), "labels": ids.to(device)})
        else:
            ids = torch.randint(3, 128, (1, 24), generator=gen)
            pos = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
            labels = ids.clone()
            labels[0, :4] = -100
            out.append({"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device)})
    return out


def _train(model, batches, graphed: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, capturable=params[0].is_cuda)  # the same optimizer math in both
    step = GraphedStep(model, opt, warmup_steps=1) if graphed else None
    losses = []
    for batch in batches:
        if step is not None:
            loss = step(**batch)
        else:
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
        losses.append(float(loss))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights, step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [False, True])
def test_graphed_steps_train_as_eager_steps_cuda(saved, offload):
    runs = {}
    for graphed in (False, True):
        model = tiny_llama.load(saved, "cuda", quantized=True)
        patch_model(model, offload=offload)
        runs[graphed] = _train(model, _batches("cuda") * 2, graphed)
    (eager_losses, eager_w, _), (graph_losses, graph_w, step) = runs[False], runs[True]
    assert not step.fallbacks, step.fallbacks
    assert len(step.graphs) == 2  # one per shape, replayed from the second step of each shape on
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    for name in eager_w:
        torch.testing.assert_close(graph_w[name], eager_w[name], rtol=1e-5, atol=1e-6, msg=name)


def test_graphed_step_is_an_eager_step_on_cpu(saved):
    runs = {}
    for graphed in (False, True):
        model = tiny_llama.load(saved, "cpu", quantized=False)  # unpatched: the step's plumbing alone
        runs[graphed] = _train(model, _batches("cpu")[:3], graphed)
    assert runs[True][0] == runs[False][0]
    assert not runs[True][2].graphs
