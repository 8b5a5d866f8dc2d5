"""Cross-entropy kernels vs the PyTorch reference: loss and grads of hidden, weight, bias (fused) and logits (plain).

CPU runs the Triton interpreter on tiny odd shapes (37 tokens, hidden 67, vocab 301); CUDA uses Llama-3 sizes.
bf16 results are compared with the reference computed in fp32 from the same bf16 inputs.
"""

import pytest
import torch

from sloth_kernels.cross_entropy import (
    _CHUNK_BYTES,
    _default_chunk_rows,
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
DTYPES = [torch.float32, torch.bfloat16]
IGNORE = -100


def _sizes(device):
    # (tokens, hidden, vocab, chunk rows that do not divide the valid rows)
    return (37, 67, 301, 8) if device == "cpu" else (1031, 4096, 128256, 300)


def _assert_close(actual, expected, dtype, what):
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp(min=1e-12).item()
    if dtype == torch.float32:
        rtol, atol = 1e-5, 1e-5 * scale
    else:
        rtol, atol = 2e-2, 1e-2 * scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _labels(n, vocab, device, gen):
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    labels[8:16] = IGNORE  # one whole chunk of 8 rows, plus scattered rows
    labels[::5] = IGNORE
    return labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_matches_reference(device, dtype, reduction, softcap):
    n, hid, vocab, chunk = _sizes(device)
    gen = torch.Generator().manual_seed(0)
    # hidden is a transposed (non-contiguous) view of a leaf, as a sliced/permuted activation would be
    h_leaf = torch.randn(hid, n, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hid, generator=gen) / hid**0.5).to(device, dtype).requires_grad_()
    bias = torch.randn(vocab, generator=gen).to(device, dtype).requires_grad_()
    labels = _labels(n, vocab, device, gen)

    loss = fused_linear_cross_entropy(
        h_leaf.t(), weight, labels, bias, reduction=reduction, softcap=softcap, chunk_size=chunk
    )
    # a grad_output other than 1 checks that the backward scales the grads stored by the forward
    grads = torch.autograd.grad(loss * 1.7, [h_leaf, weight, bias])

    ref_inputs = [t.detach().float().requires_grad_() for t in (h_leaf, weight, bias)]
    ref = fused_linear_cross_entropy_reference(
        ref_inputs[0].t(), ref_inputs[1], labels, ref_inputs[2], reduction=reduction, softcap=softcap
    )
    ref_grads = torch.autograd.grad(ref * 1.7, ref_inputs)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    _assert_close(loss, ref, dtype, "loss")
    for name, g, rg, src in zip(("hidden", "weight", "bias"), grads, ref_grads, (h_leaf, weight, bias)):
        assert g.dtype == src.dtype and g.shape == src.shape
        _assert_close(g, rg, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_frozen_weight_default_chunks(device):
    """The LoRA case: frozen LM head, no bias, 3-d hidden; only the hidden grad is produced."""
    n, hid, vocab, _ = _sizes(device)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, n, hid, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(vocab, hid, generator=gen) / hid**0.5).to(device)
    labels = _labels(n, vocab, device, gen).view(1, n)

    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = fused_linear_cross_entropy_reference(ref_hidden, weight, labels)
    ref.backward()

    assert weight.grad is None
    _assert_close(loss, ref, torch.float32, "loss")
    _assert_close(hidden.grad, ref_hidden.grad, torch.float32, "grad hidden")


def test_fused_all_ignored_and_no_grad():
    n, hid, vocab, chunk = _sizes("cpu")
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, hid, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hid, generator=gen) / hid**0.5).requires_grad_()
    ignored = torch.full((n,), IGNORE)

    # torch gives NaN for a mean over nothing; the grads must still be clean zeros
    loss = fused_linear_cross_entropy(hidden, weight, ignored, chunk_size=chunk)
    assert torch.isnan(loss) and torch.isnan(fused_linear_cross_entropy_reference(hidden, weight, ignored))
    total = fused_linear_cross_entropy(hidden, weight, ignored, reduction="sum", chunk_size=chunk)
    assert total.item() == 0.0
    g_h, g_w = torch.autograd.grad(total, [hidden, weight])
    assert torch.count_nonzero(g_h) == 0 and torch.count_nonzero(g_w) == 0

    labels = _labels(n, vocab, "cpu", gen)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, softcap=5.0, chunk_size=chunk)
        ref = fused_linear_cross_entropy_reference(hidden, weight, labels, softcap=5.0)
    assert not loss.requires_grad
    _assert_close(loss, ref, torch.float32, "no-grad loss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_static_rows_path(device, reduction, monkeypatch):
    """The CUDA-graph-capture path (no host sync: ignored rows stay in, the mean divides by a device count) gives
    the reference's loss and grads; forced here outside a capture."""
    import sloth_kernels.cross_entropy as ce

    monkeypatch.setattr(ce, "_static_rows", lambda hidden: True)
    n, hid, vocab, chunk = _sizes(device)
    gen = torch.Generator().manual_seed(7)
    h_leaf = torch.randn(hid, n, generator=gen).to(device).requires_grad_()  # non-contiguous, as above
    weight = (torch.randn(vocab, hid, generator=gen) / hid**0.5).to(device).requires_grad_()
    labels = _labels(n, vocab, device, gen)
    loss = fused_linear_cross_entropy(h_leaf.t(), weight, labels, reduction=reduction, chunk_size=chunk)
    grads = torch.autograd.grad(loss * 1.3, [h_leaf, weight])
    ref_inputs = [t.detach().clone().requires_grad_() for t in (h_leaf, weight)]
    ref = fused_linear_cross_entropy_reference(ref_inputs[0].t(), ref_inputs[1], labels, reduction=reduction)
    ref_grads = torch.autograd.grad(ref * 1.3, ref_inputs)
    _assert_close(loss, ref, torch.float32, "loss")
    for name, g, rg in zip(("hidden", "weight"), grads, ref_grads):
        _assert_close(g, rg, torch.float32, f"grad {name}")
    ignored = torch.full((n,), IGNORE, device=device)
    assert torch.isnan(fused_linear_cross_entropy(h_leaf.t(), weight, ignored, chunk_size=chunk))


def test_fused_autocast_uses_autocast_dtype():
    """fp32 master weights under bf16 autocast: the matmuls run in bf16, as F.linear would under autocast."""
    n, hid, vocab, chunk = _sizes("cpu")
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, hid, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hid, generator=gen) / hid**0.5).requires_grad_()
    labels = _labels(n, vocab, "cpu", gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        ref = fused_linear_cross_entropy_reference(hidden, weight, labels)
    grads = torch.autograd.grad(loss, [hidden, weight])
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    _assert_close(loss, ref, torch.bfloat16, "loss")
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        _assert_close(g, rg, torch.bfloat16, "grad")


def test_default_chunk_bounds_logits_memory():
    rows = _default_chunk_rows(4096, 128256, torch.bfloat16)
    assert rows * 128256 * 2 <= _CHUNK_BYTES
    assert rows * 4 >= 4096  # 4 equal chunks, no small tail
    assert _default_chunk_rows(37, 301, torch.float32) == 37


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_cross_entropy_matches_reference(device, dtype, softcap, layout):
    n, _, vocab, _ = _sizes(device)
    gen = torch.Generator().manual_seed(4)
    labels = _labels(n, vocab, device, gen)
    if layout == "row_strided":  # rows padded wider than vocab: unit column stride, kernel gets the row stride
        base = (3 * torch.randn(n, vocab + 13, generator=gen)).to(device, dtype)
        make = lambda t: t[:, 5 : 5 + vocab]  # noqa: E731
    else:  # column stride != 1: the wrapper copies to a private buffer
        base = (3 * torch.randn(vocab, n, generator=gen)).to(device, dtype)
        make = lambda t: t.t()  # noqa: E731
    for reduction in ("mean", "sum"):
        leaf = base.clone().requires_grad_()
        logits = make(leaf.clone())  # a non-leaf the in-place kernel may overwrite
        loss = cross_entropy(logits, labels, reduction=reduction, softcap=softcap)
        (grad,) = torch.autograd.grad(loss * 0.5, [leaf])

        ref_leaf = base.detach().float().requires_grad_()
        ref = cross_entropy_reference(make(ref_leaf), labels, reduction=reduction, softcap=softcap)
        (ref_grad,) = torch.autograd.grad(ref * 0.5, [ref_leaf])
        _assert_close(loss, ref, dtype, f"{reduction} loss")
        assert grad.dtype == dtype
        _assert_close(grad, ref_grad, dtype, f"{reduction} grad")
        assert torch.count_nonzero(grad[:, 5 : 5 + vocab][8:16] if layout == "row_strided" else grad[:, 8:16]) == 0


def test_cross_entropy_inplace_contract():
    n, _, vocab, _ = _sizes("cpu")
    gen = torch.Generator().manual_seed(5)
    labels = _labels(n, vocab, "cpu", gen)
    x = torch.randn(n, vocab, generator=gen)

    # inplace=False leaves the logits alone
    logits = x.clone().requires_grad_()
    before = logits.detach().clone()
    loss = cross_entropy(logits, labels, inplace=False)
    loss.backward()
    assert torch.equal(logits.detach(), before)
    _assert_close(loss, cross_entropy_reference(before, labels), torch.float32, "loss")

    # inplace=True reuses the logits' storage for the grad: the result is the same
    logits = x.clone().requires_grad_()
    loss_inplace = cross_entropy(logits.view(n, vocab), labels)
    loss_inplace.backward()
    _assert_close(loss_inplace, loss, torch.float32, "in-place loss")
    assert not torch.equal(logits.detach(), before)

    # ...and autograd refuses a backward through an op that saved the overwritten logits
    src = x.clone().requires_grad_()
    capped = torch.tanh(src)  # tanh saves its output for the backward
    loss = cross_entropy(capped, labels)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_input_validation():
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="do not match"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(7, 5), torch.zeros(3, dtype=torch.long))
