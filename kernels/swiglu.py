"""Gated MLP activations SwiGLU and GeGLU: Triton forward + recomputing backward, and their PyTorch references.

Contract
--------
- `swiglu(gate, up) = silu(gate) * up` (Llama, Mistral, Qwen, Phi-3: HF's `act_fn(gate_proj(x)) * up_proj(x)` with
  `hidden_act="silu"`).
- `geglu(gate, up, approximate="tanh") = gelu(gate, approximate) * up` (Gemma: `hidden_activation=
  "gelu_pytorch_tanh"` is approximate="tanh"; approximate="none" is the exact erf GELU).
- gate and up have the same shape [..., intermediate] and dtype; any strides (e.g. the two halves of Phi-3's fused
  gate_up projection from `chunk(2, -1)`). Output: contiguous, same shape and dtype.
- The activation is computed in fp32 and the product rounded once to the input dtype (HF rounds act(gate) to bf16
  before the product, so bf16 results differ from HF by about one bf16 ulp).
- Backward recomputes the activation and its derivative from gate; only gate and up are saved.

Dispatch: Triton when `use_triton(gate, up)` and shapes/dtypes match; otherwise the reference.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sloth_kernels._dispatch import use_triton

_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2
_GELU_MODES = {"tanh": _GELU_TANH, "none": _GELU_ERF}
_BLOCK_MAX = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """act(g) and act'(g) in fp32."""
    if ACT == 0:  # silu
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:  # gelu, tanh approximation
        k0: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        k1: tl.constexpr = 0.044715
        # 0.5 * (1 + tanh(z)) == sigmoid(2z): no tanh in the stable tl API, and no cancellation in 1 + tanh
        # where tanh(z) is close to -1.  d/dz sigmoid(2z) = 2 s (1 - s).
        s = tl.sigmoid(2.0 * k0 * (g + k1 * g * g * g))
        act = g * s
        dact = s + 2.0 * g * s * (1.0 - s) * k0 * (1.0 + 3.0 * k1 * g * g)
    else:  # gelu, exact
        inv_sqrt2: tl.constexpr = 0.7071067811865476
        inv_sqrt_2pi: tl.constexpr = 0.3989422804014327
        cdf = 0.5 * (1.0 + tl.math.erf(g * inv_sqrt2))
        act = g * cdf
        dact = cdf + g * inv_sqrt_2pi * tl.exp(-0.5 * g * g)
    return act, dact


@triton.jit
def _glu_fwd_kernel(
    G, U, O,
    n_cols, sg_row, sg_col, su_row, su_col, so_row,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * sg_row + cols * sg_col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su_row + cols * su_col, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(g, ACT)
    tl.store(O + row * so_row + cols, (act * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DO, G, U, DG, DU,
    n_cols, sdo_row, sdo_col, sg_row, sg_col, su_row, su_col, sd_row,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    do = tl.load(DO + row * sdo_row + cols * sdo_col, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * sg_row + cols * sg_col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su_row + cols * su_col, mask=mask, other=0.0).to(tl.float32)
    act, dact = _activation(g, ACT)  # recomputed: cheaper than storing act for a memory-bound op
    tl.store(DG + row * sd_row + cols, (do * u * dact).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * sd_row + cols, (do * act).to(DU.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    # GPU notes: 1024 elements per program with 4 warps = 8 per thread, enough in flight to saturate HBM;
    # the 2-D grid keeps strided rows (fused gate_up halves) addressable without a copy.
    block = min(triton.next_power_of_2(n_cols), _BLOCK_MAX)
    return (n_rows, triton.cdiv(n_cols, block)), block


class _GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
        shape = gate.shape
        n_cols = shape[-1]
        g2, u2 = gate.reshape(-1, n_cols), up.reshape(-1, n_cols)
        out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        grid, block = _grid(*g2.shape)
        _glu_fwd_kernel[grid](
            g2, u2, out, n_cols, *g2.stride(), *u2.stride(), out.stride(0), ACT=act, BLOCK=block, num_warps=4
        )
        ctx.save_for_backward(g2, u2)
        ctx.act, ctx.shape = act, shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        n_cols = g2.shape[-1]
        do2 = d_out.reshape(-1, n_cols)
        d_gate = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        d_up = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        grid, block = _grid(*g2.shape)
        _glu_bwd_kernel[grid](
            do2, g2, u2, d_gate, d_up, n_cols, *do2.stride(), *g2.stride(), *u2.stride(), d_gate.stride(0),
            ACT=ctx.act, BLOCK=block, num_warps=4,
        )
        return d_gate.view(ctx.shape), d_up.view(ctx.shape), None


def _kernel_applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype and gate.numel() > 0


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; see the module docstring."""
    if _kernel_applies(gate, up):
        return _GLUFunction.apply(gate, up, _SILU)
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate, approximate) * up; approximate is "tanh" (Gemma's gelu_pytorch_tanh) or "none" (erf)."""
    if approximate not in _GELU_MODES:
        raise ValueError(f'approximate must be "tanh" or "none", got {approximate!r}')
    if _kernel_applies(gate, up):
        return _GLUFunction.apply(gate, up, _GELU_MODES[approximate])
    return geglu_reference(gate, up, approximate)
