"""SwiGLU / GeGLU kernels vs their references (output, grad gate, grad up), and the references vs HF's activations."""

import pytest
import torch
from transformers.activations import ACT2FN

from sloth_kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
ACTIVATIONS = ["silu", "gelu_tanh", "gelu_erf"]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def _ops(activation: str):
    """(kernel op, reference op) for one activation name."""
    if activation == "silu":
        return swiglu, swiglu_reference
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return (lambda g, u: geglu(g, u, approximate)), (lambda g, u: geglu_reference(g, u, approximate))


def _shape(device: str) -> tuple[int, ...]:
    # Interpreter: small and odd (masked tail); GPU: Llama-8B MLP activations.
    return (3, 5, 37) if device == "cpu" else (2, 512, 14336)


def _check(gate: torch.Tensor, up: torch.Tensor, activation: str, d_out: torch.Tensor) -> None:
    """Kernel in the inputs' dtype vs the reference in fp32 on the same values."""
    op, reference = _ops(activation)
    dtype = gate.dtype
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    out = op(gate, up)
    assert "_GLUFunction" in type(out.grad_fn).__name__, "the Triton path did not run"
    assert out.shape == gate.shape and out.dtype == dtype
    out.backward(d_out)

    gate_ref = gate.detach().float().requires_grad_()
    up_ref = up.detach().float().requires_grad_()
    out_ref = reference(gate_ref, up_ref)
    out_ref.backward(d_out.float())

    _assert_close(out, out_ref.to(dtype), dtype)
    _assert_close(gate.grad, gate_ref.grad, dtype)
    _assert_close(up.grad, up_ref.grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_contiguous(device, dtype, activation):
    torch.manual_seed(0)
    shape = _shape(device)
    # Spread of 3 reaches the saturated tails of sigmoid/tanh/erf, where naive formulas lose precision.
    gate = (torch.randn(shape, device=device) * 3).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    _check(gate, up, activation, torch.randn(shape, device=device).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_gate_up_halves(device, dtype, activation):
    """Phi-3 style: gate and up are the two chunk(2, -1) halves of one projection; the upstream grad is transposed."""
    torch.manual_seed(1)
    *lead, width = _shape(device)
    gate_up = (torch.randn(*lead, 2 * width, device=device) * 2).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    d_out = torch.randn(width, *lead, device=device).to(dtype).permute(1, 2, 0)
    assert not (gate.is_contiguous() or up.is_contiguous() or d_out.is_contiguous())
    _check(gate, up, activation, d_out)


@pytest.mark.parametrize("device", DEVICES)
def test_large_width_spans_several_column_blocks(device):
    """Rows wider than one program's block (1024) are split over a second grid axis; the tail block is masked."""
    torch.manual_seed(2)
    gate = torch.randn(2, 1031, device=device)
    up = torch.randn(2, 1031, device=device)
    _check(gate, up, "silu", torch.randn(2, 1031, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_references_match_hf_activations(dtype):
    torch.manual_seed(3)
    gate = (torch.randn(4, 37) * 3).to(dtype)
    up = torch.randn(4, 37).to(dtype)
    assert torch.equal(swiglu_reference(gate, up), ACT2FN["silu"](gate) * up)
    assert torch.equal(geglu_reference(gate, up, "tanh"), ACT2FN["gelu_pytorch_tanh"](gate) * up)
    assert torch.equal(geglu_reference(gate, up, "none"), ACT2FN["gelu"](gate) * up)


def test_geglu_rejects_unknown_approximation():
    with pytest.raises(ValueError):
        geglu(torch.randn(2, 3), torch.randn(2, 3), approximate="sigmoid")
