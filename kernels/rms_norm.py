"""RMSNorm: Triton forward + hand-written backward, and the PyTorch reference it must match.

Contract
--------
`rms_norm(x, weight, eps=1e-6, offset=0.0)` normalises the last dimension of `x` ([..., hidden]):

    y = x * rsqrt(mean(x**2, -1) + eps) * (offset + weight)

- `offset=0.0` is Llama/Mistral/Qwen/Phi-3 (`LlamaRMSNorm`); `offset=1.0` is Gemma (`Gemma3RMSNorm`, weight stored as
  w with the scale being 1 + w).
- Statistics are computed in fp32 whatever the input dtype. The output dtype is always `x.dtype`.
- Rounding follows the Hugging Face module of the matching family, chosen by `offset`:
  * `offset == 0.0` (Llama casting): the normalised x is rounded to `x.dtype` *before* it is multiplied by the weight
    (HF: `weight * hidden_states.to(input_dtype)`).
  * `offset != 0.0` (Gemma casting): everything stays fp32 and is rounded once at the end
    (HF: `(x_norm * (1.0 + weight.float())).type_as(x)`).
  With fp32 inputs both are the same math. One deliberate difference from HF: when `weight` is fp32 and `x` is bf16
  (e.g. after peft's `prepare_model_for_kbit_training` upcasts norms), `LlamaRMSNorm` returns fp32 (type promotion)
  while we return `x.dtype`.
- Backward gives grads for `x` and `weight` (the weight grad is skipped when the weight is frozen, as in LoRA).
  Only `x` and the per-row `rstd` (fp32) are saved, no normalised copy. The weight grad is reduced across rows as
  one fp32 partial sum per program, then a single sum over programs.

Dispatch: Triton when `use_triton(x, weight)` (CUDA tensors, or TRITON_INTERPRET=1) and hidden fits one block
(<= 65536); otherwise `rms_norm_reference`.
"""

import torch
import triton
import triton.language as tl

from sloth_kernels._dispatch import use_triton

# One row is normalised by one program holding the whole row in registers; beyond this, use the reference.
_MAX_HIDDEN = 65536


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> torch.Tensor:
    """Plain differentiable torch, the same math and rounding as HF's LlamaRMSNorm (offset 0) / Gemma3RMSNorm."""
    xf = x.float()
    x_norm = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return (weight * x_norm.to(x.dtype)).to(x.dtype)
    return (x_norm * (offset + weight.float())).to(x.dtype)


def _num_warps(block: int) -> int:
    # GPU notes: a row of 4096 bf16 is 8 KiB; 8 warps keep ~16 elements per thread; wider rows get more warps.
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    stride_x_row, stride_x_col, stride_w, stride_y_row,
    n_cols, eps, offset,
    GEMMA_CAST: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x_row + cols * stride_x_col, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols * stride_w, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    x_norm = x * rstd
    if not GEMMA_CAST:
        # Llama rounds the normalised activations to the input dtype before scaling (Y has the input dtype).
        x_norm = x_norm.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, (x_norm * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy_row, stride_dy_col, stride_x_row, stride_x_col, stride_w, stride_dx_row,
    n_rows, n_cols, rows_per_program, offset,
    GEMMA_CAST: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr,
):
    # Each program walks a contiguous band of rows, so the weight grad needs one partial row per program
    # instead of one per input row (or atomics).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols * stride_w, mask=mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    n_mine = tl.minimum(rows_per_program, n_rows - pid * rows_per_program)  # int32 loop bound
    for i in range(0, n_mine):
        row64 = row_start + i
        dy = tl.load(DY + row64 * stride_dy_row + cols * stride_dy_col, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row64 * stride_x_row + cols * stride_x_col, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        x_norm = x * rstd
        dx_norm = dy * w
        # d/dx of x*rstd: rstd * (g - x_norm * mean(g * x_norm))
        dx = rstd * (dx_norm - x_norm * (tl.sum(dx_norm * x_norm, axis=0) / n_cols))
        tl.store(DX + row64 * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if not GEMMA_CAST:
                # The weight multiplied the rounded normalised x in the forward pass.
                x_norm = x_norm.to(X.dtype.element_ty).to(tl.float32)
            dw_acc += dy * x_norm
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # GPU notes: about two bands per SM keeps every SM busy while the partial-sum buffer stays tiny
        # (264 x hidden fp32 on an H200).
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: programs run one after another, a few suffice to exercise the reduction
    return max(1, min(n_rows, target))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        shape = x.shape
        n_cols = shape[-1]
        x2 = x.reshape(-1, n_cols)  # a view when possible: row/column strides go to the kernel
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        gemma_cast = offset != 0.0
        _rms_norm_fwd_kernel[(n_rows,)](
            x2, weight, y, rstd,
            x2.stride(0), x2.stride(1), weight.stride(0), y.stride(0),
            n_cols, eps, offset,
            GEMMA_CAST=gemma_cast, BLOCK=block, num_warps=_num_warps(block),
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        ctx.gemma_cast = gemma_cast
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        compute_dw = ctx.needs_input_grad[1]
        n_programs = _backward_programs(n_rows, x2.device)
        rows_per_program = triton.cdiv(n_rows, n_programs)
        n_programs = triton.cdiv(n_rows, rows_per_program)
        dw_partial = torch.empty(
            (n_programs if compute_dw else 1, n_cols), dtype=torch.float32, device=x2.device
        )
        block = triton.next_power_of_2(n_cols)
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2, x2, weight, rstd, dx, dw_partial,
            dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), weight.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program, ctx.offset,
            GEMMA_CAST=ctx.gemma_cast, COMPUTE_DW=compute_dw, BLOCK=block, num_warps=_num_warps(block),
        )
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim of x; see the module docstring for dtype and rounding rules."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if use_triton(x, weight) and 0 < x.numel() and x.shape[-1] <= _MAX_HIDDEN:
        return _RMSNormFunction.apply(x, weight, float(eps), float(offset))
    return rms_norm_reference(x, weight, eps, offset)
