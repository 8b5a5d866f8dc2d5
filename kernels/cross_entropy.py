"""Cross-entropy for causal LMs: a fused LM-head + loss that never materialises the full logits, and a plain one.

Contract
--------
`fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", softcap=None,
chunk_size=None)` returns the fp32 scalar

    F.cross_entropy(softcap(F.linear(hidden, weight, bias).float()), labels, ignore_index, reduction)

where softcap(z) = softcap * tanh(z / softcap) (Gemma 2's final logit soft-capping) or the identity when None.

- Inputs are already shifted: `hidden` is [N, H] (or [..., H], flattened) and `labels` [N] (or [...]) holds, for each
  row, the token that row must predict, or `ignore_index`. The caller does the causal shift.
- `reduction`: "mean" divides by the number of non-ignored rows (all ignored gives NaN, as torch does; the grads
  are then zero), "sum" does not divide. To mean over a whole gradient-accumulation step (HF's `num_items_in_batch`)
  use "sum" and divide the result: the division flows through the backward as an ordinary scale.
- How: ignored rows are dropped first (prompt tokens masked in SFT cost nothing; under CUDA graph capture, where
  that host sync is not allowed, they stay and the kernel gives them zero loss and gradient), the valid rows are
  processed in chunks; per chunk the logits come from one cuBLAS matmul in the compute dtype, then a Triton kernel computes, in
  fp32, the logsumexp and the row loss and overwrites the logits with their gradient (softmax - onehot, times the
  soft-cap derivative, times 1/n_valid for "mean"). Still in the forward, that chunk's gradient goes straight into
  grad_hidden (dlogits @ W) and grad_W (+= dlogits^T @ h) and the logits buffer is reused by the next chunk. The
  backward only multiplies the stored grads by grad_output.
- Memory: one chunk of logits ([chunk, V], about `_CHUNK_BYTES`) + grad_hidden [N, H] + grad_W [V, H] when the
  weight requires grad (skipped when it is frozen, the LoRA case) + grad_bias [V] fp32. The full [N, V] logits never
  exist. grad_W is accumulated across chunks in the weight's dtype (rounded once per chunk).
- Compute dtype: the autocast dtype when autocast is on for the device, else the weight's dtype (hidden is cast to
  it chunk by chunk). Grads come back in each input's own dtype.
- Gradients are computed in the forward only for the inputs that require grad; under no_grad only the loss is
  computed. Backward can run once (no retain_graph double backward: the grads are handed over, not copied).
- Labels must lie in [0, V) or equal `ignore_index` (not checked on the device, as that would cost a sync).

`cross_entropy(logits, labels, ignore_index=-100, reduction="mean", softcap=None, inplace=True)` is the same loss when
the logits already exist ([..., V], any float dtype): one Triton pass computes loss and gradient. With `inplace=True`
(default) the gradient is written over `logits` (their storage is reused, so read nothing from `logits` afterwards;
the version counter is bumped, so autograd raises if some other op saved them for its backward).

Dispatch: Triton when `use_triton(...)` (CUDA tensors, or TRITON_INTERPRET=1), else the `*_reference` functions.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sloth_kernels._dispatch import use_triton

# One chunk of logits stays around this size: big enough that the matmuls run at full speed, small enough to be a
# rounding error next to the 2 GB fp32 logits a Llama-3 vocabulary costs at 4096 tokens.
_CHUNK_BYTES = 256 * 2**20
# GPU notes: 8192 columns per block -> 16 fp32 values per thread at 16 warps; a 128256-wide row takes 16 blocks per
# pass, and a chunk of ~1000 rows gives each of the 132 SMs several programs.
_MAX_BLOCK = 8192


def _softcap_reference(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    inplace: bool = True,
) -> torch.Tensor:
    """Plain torch: fp32 (soft-capped) logits into F.cross_entropy. `inplace` is accepted for signature parity."""
    z = _softcap_reference(logits.float(), softcap)
    return F.cross_entropy(
        z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain torch: full logits = F.linear(...).float(), then cross-entropy. `chunk_size` is ignored."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    return cross_entropy_reference(logits, labels, ignore_index, reduction, softcap)


# ----------------------------------------------------------------------------------------------------------- Triton


@triton.jit
def _tanh(u):
    # tanh from exp of a non-positive argument: never overflows, exact sign.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _load_row_block(ptr, cols, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    z = tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_SOFTCAP:
        # masked lanes would turn into -softcap: put them back to -inf so they add nothing to the sum
        z = tl.where(mask, softcap * _tanh(z / softcap), float("-inf"))
    return z


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS, GRAD, LABELS, LOSS, SCALE,
    stride_logits_row, stride_grad_row, stride_labels,
    n_cols, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per row. Pass 1: online max / sum-exp -> logsumexp and the row loss. Pass 2: the gradient,
    # written to GRAD (which may be LOGITS itself: each block is read before it is overwritten).
    row = tl.program_id(0).to(tl.int64)
    logits_row = LOGITS + row * stride_logits_row
    grad_row = GRAD + row * stride_grad_row
    label = tl.load(LABELS + row * stride_labels).to(tl.int64)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(grad_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(GRAD.dtype.element_ty),
                         mask=cols < n_cols)
    else:
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = _load_row_block(logits_row, cols, cols < n_cols, softcap, HAS_SOFTCAP)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_label = tl.load(logits_row + label).to(tl.float32)
        if HAS_SOFTCAP:
            z_label = softcap * _tanh(z_label / softcap)
        tl.store(LOSS + row, lse - z_label)
        if WRITE_GRAD:
            scale = tl.load(SCALE).to(tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                z = _load_row_block(logits_row, cols, mask, softcap, HAS_SOFTCAP)
                g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
                if HAS_SOFTCAP:
                    # z / softcap = tanh(raw / softcap) and d softcap(raw) / d raw = 1 - tanh^2 (0 on masked lanes)
                    t = tl.where(mask, z / softcap, 0.0)
                    g = g * (1.0 - t * t)
                tl.store(grad_row + cols, (g * scale).to(GRAD.dtype.element_ty), mask=mask)


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    return block, (16 if block >= 8192 else 8 if block >= 2048 else 4)


def _launch_loss_grad(
    logits: torch.Tensor,
    grad: torch.Tensor | None,
    labels: torch.Tensor,
    loss_rows: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
) -> None:
    """logits/grad: [rows, V] with unit column stride (grad may alias logits); loss_rows: [rows] fp32."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block, warps = _block_and_warps(n_cols)
    write_grad = grad is not None
    grad = grad if write_grad else logits
    _ce_loss_grad_kernel[(n_rows,)](
        logits, grad, labels, loss_rows, scale,
        logits.stride(0), grad.stride(0), labels.stride(0),
        n_cols, ignore_index, 1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, BLOCK=block, num_warps=warps,
    )


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, softcap, inplace):
        shape = logits.shape
        logits2 = logits.reshape(-1, shape[-1])
        if logits2.stride(-1) != 1:
            logits2 = logits2.contiguous()  # a private copy: writing the grad into it is then always allowed
        labels1 = labels.reshape(-1)
        n_valid = (labels1 != ignore_index).sum()
        scale = (1.0 / n_valid.clamp(min=1).float()) if reduction == "mean" else torch.ones((), device=logits.device)
        loss_rows = torch.empty(logits2.shape[0], dtype=torch.float32, device=logits.device)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits2 if inplace else torch.empty_like(logits2)
        _launch_loss_grad(logits2, grad, labels1, loss_rows, scale.reshape(1), ignore_index, softcap)
        if grad is not None and grad.data_ptr() == logits.data_ptr():
            torch.autograd.graph.increment_version(logits)  # the values changed under autograd's feet: say so
        ctx.dlogits = grad
        ctx.shape = shape
        loss = loss_rows.sum()
        return loss / n_valid if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.dlogits
        if grad is None:
            raise RuntimeError("cross_entropy: backward ran twice; the stored gradient was already handed over")
        ctx.dlogits = None
        return grad.mul_(grad_output).view(ctx.shape), None, None, None, None, None


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    inplace: bool = True,
) -> torch.Tensor:
    """Cross-entropy over existing logits [..., V] vs labels [...]; see the module docstring (in-place contract)."""
    _check_reduction(reduction)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    if use_triton(logits, labels) and logits.numel() > 0:
        return _CrossEntropyFunction.apply(logits, labels, ignore_index, reduction, softcap, inplace)
    return cross_entropy_reference(logits, labels, ignore_index, reduction, softcap)


def _static_rows(hidden: torch.Tensor) -> bool:
    """True when the loss must not drop ignored rows (that costs a host sync): under CUDA graph capture."""
    return hidden.is_cuda and torch.cuda.is_current_stream_capturing()


def _default_chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    max_rows = max(1, _CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8))
    n_chunks = math.ceil(n_rows / max_rows)
    return max(1, math.ceil(n_rows / max(n_chunks, 1)))  # equal chunks: no tiny tail matmul


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, softcap, chunk_size, compute_dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        shape = hidden.shape
        h_all = hidden.reshape(-1, shape[-1])
        labels1 = labels.reshape(-1)
        n_rows, n_hidden = h_all.shape
        vocab = weight.shape[0]
        device = hidden.device

        if _static_rows(hidden):
            # Under CUDA graph capture nothing may wait for the device: every row goes through the kernel (ignored
            # rows give zero loss and zero gradient there) and the mean's divisor stays a device tensor.
            valid_idx, n_valid, all_valid = None, n_rows, True
            count = (labels1 != ignore_index).sum()
            scale = (1.0 / count.clamp(min=1).float()).reshape(1) if reduction == "mean" else \
                torch.ones(1, dtype=torch.float32, device=device)
        else:
            # Drop ignored rows up front (one host sync): in SFT most prompt tokens are masked and cost nothing.
            valid_idx = (labels1 != ignore_index).nonzero().squeeze(1)
            n_valid = valid_idx.numel()
            all_valid = n_valid == n_rows
            count = None
            scale = torch.full((1,), 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0,
                               dtype=torch.float32, device=device)
        h = h_all if all_valid else h_all.index_select(0, valid_idx)
        y = labels1 if all_valid else labels1.index_select(0, valid_idx)

        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        loss_rows = torch.empty(n_valid, dtype=torch.float32, device=device)
        grad_h = torch.empty((n_valid, n_hidden), dtype=compute_dtype, device=device) if need_h else None
        grad_w = torch.zeros((vocab, n_hidden), dtype=compute_dtype, device=device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
        write_grad = need_h or need_w or need_b

        chunk = chunk_size or _default_chunk_rows(max(n_valid, 1), vocab, compute_dtype)
        for start in range(0, n_valid, chunk):
            end = min(start + chunk, n_valid)
            h_c = h[start:end].to(compute_dtype)
            logits = torch.mm(h_c, w.t()) if b is None else torch.addmm(b, h_c, w.t())
            _launch_loss_grad(logits, logits if write_grad else None, y[start:end], loss_rows[start:end], scale,
                              ignore_index, softcap)
            # `logits` now holds d loss / d logits for this chunk.
            if need_h:
                torch.mm(logits, w, out=grad_h[start:end])
            if need_w:
                grad_w.addmm_(logits.t(), h_c)
            if need_b:
                grad_b += logits.sum(0, dtype=torch.float32)

        if need_h:
            if all_valid:
                grad_h = grad_h.to(hidden.dtype)
            else:
                full = torch.zeros((n_rows, n_hidden), dtype=hidden.dtype, device=device)
                grad_h = full.index_copy_(0, valid_idx, grad_h.to(hidden.dtype))
            grad_h = grad_h.view(shape)
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        loss = loss_rows.sum()
        if reduction == "mean":
            if count is not None:
                loss = loss / count  # 0 / 0 = NaN when every row is ignored, as below
            else:
                loss = loss / n_valid if n_valid > 0 else torch.full((), float("nan"), device=device)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice; the stored gradients were already handed over"
            )
        ctx.grads = None
        grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_output) for g in grads)
        return grad_h, grad_w, None, grad_b, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """LM head + cross-entropy without the full logits; see the module docstring for the contract."""
    _check_reduction(reduction)
    if hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)} do not match"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not use_triton(hidden, weight):
        return fused_linear_cross_entropy_reference(
            hidden, weight, labels, bias, ignore_index, reduction, softcap, chunk_size
        )
    device_type = hidden.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    )
    # Our matmuls pick their dtype explicitly; autocast must not re-cast them inside.
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropyFunction.apply(
            hidden, weight, labels, bias, ignore_index, reduction, softcap, chunk_size, compute_dtype
        )
