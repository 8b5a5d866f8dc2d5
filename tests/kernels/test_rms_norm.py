"""RMSNorm kernel vs its reference (forward, grad x, grad weight), and the reference vs HF's own norm modules."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sloth_kernels.rms_norm import rms_norm, rms_norm_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # atol scales with the magnitude of the tensor so reductions over many rows (weight grad) are judged fairly.
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def _hidden_size(device: str) -> int:
    return 67 if device == "cpu" else 4096  # odd on the interpreter, Llama-8B on the GPU


def _lead_shape(device: str) -> tuple[int, ...]:
    return (2, 5) if device == "cpu" else (2, 1024)


def _check(x: torch.Tensor, weight: torch.Tensor, offset: float, dy: torch.Tensor) -> None:
    """Kernel on (x, weight) in their dtype vs the reference in fp32 on the same values, then rounded."""
    dtype = x.dtype
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = rms_norm(x, weight, 1e-6, offset)
    assert "_RMSNormFunction" in type(y.grad_fn).__name__, "the Triton path did not run"
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(dy)

    x_ref = x.detach().float().requires_grad_()
    w_ref = weight.detach().float().requires_grad_()
    y_ref = rms_norm_reference(x_ref, w_ref, 1e-6, offset)
    y_ref.backward(dy.float())

    _assert_close(y, y_ref.to(dtype), dtype)
    _assert_close(x.grad, x_ref.grad, dtype)
    _assert_close(weight.grad, w_ref.grad, dtype)
    assert x.grad.dtype == x.dtype and weight.grad.dtype == weight.dtype


def _weight(hidden: int, offset: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    # Llama weights sit near 1; Gemma stores w with the scale being 1 + w, so near 0.
    return (torch.randn(hidden, device=device) * 0.1 + (1.0 - offset)).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_contiguous(device, dtype, offset):
    torch.manual_seed(0)
    hidden = _hidden_size(device)
    x = torch.randn(*_lead_shape(device), hidden, device=device).to(dtype)
    dy = torch.randn_like(x)
    _check(x, _weight(hidden, offset, dtype, device), offset, dy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views(device, dtype):
    """x sliced out of a wider buffer with transposed leading dims, a strided weight, a transposed upstream grad."""
    torch.manual_seed(1)
    hidden = _hidden_size(device)
    lead = _lead_shape(device)
    x = torch.randn(lead[1], lead[0], hidden + 13, device=device).to(dtype)[..., 3 : 3 + hidden].transpose(0, 1)
    weight = _weight(2 * hidden, 0.0, dtype, device)[::2]
    dy = torch.randn(hidden, *lead, device=device).to(dtype).permute(1, 2, 0)
    assert not x.is_contiguous() and not weight.is_contiguous() and not dy.is_contiguous()
    _check(x, weight, 0.0, dy)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_weight_with_bf16_input(device):
    """peft upcasts norm weights to fp32 for k-bit training; output stays in x's dtype, grads in their own."""
    torch.manual_seed(2)
    hidden = _hidden_size(device)
    x = torch.randn(3, hidden, device=device).to(torch.bfloat16)
    _check(x, _weight(hidden, 0.0, torch.float32, device), 0.0, torch.randn_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_weight_gets_no_grad(device):
    """LoRA freezes the norm weight: the kernel skips its reduction, and x's grad is unchanged by that."""
    torch.manual_seed(3)
    hidden = _hidden_size(device)
    x = torch.randn(7, hidden, device=device, requires_grad=True)
    weight = _weight(hidden, 0.0, torch.float32, device)
    dy = torch.randn_like(x)
    rms_norm(x, weight).backward(dy)
    x_ref = x.detach().clone().requires_grad_()
    rms_norm_reference(x_ref, weight).backward(dy)
    assert weight.grad is None
    _assert_close(x.grad, x_ref.grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_llama_rms_norm(dtype):
    torch.manual_seed(4)
    module = LlamaRMSNorm(67, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(67) * 0.1 + 1.0)
    x = torch.randn(2, 5, 67).to(dtype) * 3
    assert torch.equal(rms_norm_reference(x, module.weight, eps=1e-5), module(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_gemma3_rms_norm(dtype):
    torch.manual_seed(5)
    module = Gemma3RMSNorm(67, eps=1e-6).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(67) * 0.1)
    x = torch.randn(2, 5, 67).to(dtype) * 3
    assert torch.equal(rms_norm_reference(x, module.weight, eps=1e-6, offset=1.0), module(x))


def test_cpu_tensors_use_reference_without_interpreter(monkeypatch):
    """Dispatch contract: without CUDA tensors or TRITON_INTERPRET=1 the op is the plain reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 67, requires_grad=True)
    weight = torch.ones(67)
    y = rms_norm(x, weight)
    assert "_RMSNormFunction" not in type(y.grad_fn).__name__
    assert torch.equal(y, rms_norm_reference(x, weight))
