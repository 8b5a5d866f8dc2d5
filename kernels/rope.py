"""Rotary position embedding on Q and K in one Triton launch, forward + backward, and its PyTorch reference.

Contract
--------
`rope_qk(q, k, cos, sin, position_ids=None) -> (q_rot, k_rot)` is Hugging Face's
`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` ("rotate_half" convention: the rotated pairs are
(i, i + rotary_dim/2), not interleaved):

- q: [batch, n_heads, seq, head_dim], k: [batch, n_kv_heads, seq, head_dim] (GQA: head counts may differ, head_dim
  may not). Any strides (HF hands in `view(...).transpose(1, 2)` views); outputs keep q/k's layout when it is dense.
- Without position_ids: cos/sin are [batch, seq, rotary_dim] (what HF's rotary module returns; batch may be 1 and is
  broadcast) or [seq, rotary_dim].
- With position_ids ([batch, seq] or [1, seq], integer): cos/sin are tables [max_pos, rotary_dim] and row
  `position_ids[b, s]` is read inside the kernel, so packed sequences whose positions restart mid-row need no gather.
  Positions are not bounds-checked on the Triton path (that would cost a host sync); keep them < max_pos.
- rotary_dim = cos.shape[-1] (even, <= head_dim). When it is smaller than head_dim (partial rotary, as in HF's Phi-3
  `apply_rotary_pos_emb`), only the first rotary_dim dims rotate and the rest pass through unchanged.
- Math: out = x * cos + rotate_half(x) * sin on the rotary part, computed in fp32 and rounded once to x's dtype
  (HF rounds after each bf16 op, so bf16 results differ from HF by about one bf16 ulp).
- Backward is the transpose of that map (for HF's duplicated-half cos/sin: the rotation by -theta). Gradients flow to
  q and k only; cos/sin/position_ids get none (HF computes them from a buffer without grad).

Dispatch: Triton when `use_triton(q, k)`; otherwise `rope_qk_reference`.
"""

import torch
import triton
import triton.language as tl

from sloth_kernels._dispatch import use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_qk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain differentiable torch with HF's exact op order (equals apply_rotary_pos_emb bit for bit)."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # [batch, seq, rotary_dim]
    # [seq, r] -> [1, seq, r] and [batch, seq, r] -> [batch, 1, seq, r]: broadcast over heads.
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    rotary_dim = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if rotary_dim == x.shape[-1]:
            return (x * cos) + (_rotate_half(x) * sin)
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat(((x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass), dim=-1)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(
    X, O, b, s,
    sxb, sxh, sxs, sxd, sob, soh, sos, sod,
    n_heads, half, n_pass,
    c1, c2, s1, s2,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Rotate all heads of one token of one tensor: a [heads, half] tile for each half of the rotary dims."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (d < half)
    x_base = X + b * sxb + s * sxs + h * sxh
    o_base = O + b * sob + s * sos + h * soh
    x1 = tl.load(x_base + d * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + (d + half) * sxd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the forward map below; with c1 == c2 and s1 == s2 it is the rotation by -theta.
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_base + d * sod, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(o_base + (d + half) * sod, o2.to(O.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        # Partial rotary: dims past rotary_dim are copied through (their gradient is the identity too).
        p = tl.arange(0, BLOCK_PASS)[None, :]
        pmask = (h < n_heads) & (p < n_pass)
        xp = tl.load(x_base + (2 * half + p) * sxd, mask=pmask, other=0.0)
        tl.store(o_base + (2 * half + p) * sod, xp.to(O.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_qk_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    seq_len,
    sqb, sqh, sqs, sqd, sqob, sqoh, sqos, sqod,
    skb, skh, sks, skd, skob, skoh, skos, skod,
    scb, scs, scd, ssb, sss, ssd, spb, sps,
    n_q_heads, n_k_heads, half, n_pass,
    HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # One program per (batch, token): cos/sin are read once and applied to every Q and K head of that token.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    if HAS_POS:
        row = tl.load(POS + b * spb + s * sps).to(tl.int64)
        cos_base = COS + row * scs
        sin_base = SIN + row * sss
    else:
        cos_base = COS + b * scb + s * scs
        sin_base = SIN + b * ssb + s * sss
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < half
    # Both halves are read: HF duplicates the frequencies, but the map stays exact for any cos/sin.
    c1 = tl.load(cos_base + d * scd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_base + (d + half) * scd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_base + d * ssd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_base + (d + half) * ssd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, QO, b, s, sqb, sqh, sqs, sqd, sqob, sqoh, sqos, sqod, n_q_heads, half, n_pass,
                  c1, c2, s1, s2, BACKWARD, BLOCK_QH, BLOCK_HALF, BLOCK_PASS)
    _rotate_heads(K, KO, b, s, skb, skh, sks, skd, skob, skoh, skos, skod, n_k_heads, half, n_pass,
                  c1, c2, s1, s2, BACKWARD, BLOCK_KH, BLOCK_HALF, BLOCK_PASS)


def _cos_sin_strides(
    cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, batch: int, seq: int
) -> tuple[tuple[int, int, int], tuple[int, int, int], torch.Tensor | None]:
    """Strides (batch, row, dim) of cos and sin as the kernel reads them, plus position ids broadcast to [batch, seq]."""
    if position_ids is not None:
        if cos.dim() != 2:
            raise ValueError("with position_ids, cos/sin must be tables [max_pos, rotary_dim]")
        pos = position_ids.expand(batch, seq)
        return (0, cos.stride(0), cos.stride(1)), (0, sin.stride(0), sin.stride(1)), pos
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.dim() != 3 or cos.shape[-2] != seq:
        raise ValueError(f"cos/sin must be [batch, seq, rotary_dim] or [seq, rotary_dim], got {tuple(cos.shape)}")
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)  # size-1 batch -> stride 0
    return cos.stride(), sin.stride(), None


def _launch(q, k, q_out, k_out, cos, sin, position_ids, backward: bool) -> None:
    batch, n_q_heads, seq, head_dim = q.shape
    n_k_heads = k.shape[1]
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    n_pass = head_dim - rotary_dim
    cos_st, sin_st, pos = _cos_sin_strides(cos, sin, position_ids, batch, seq)
    pos_arg = pos if pos is not None else cos  # unused pointer when HAS_POS is False
    pos_st = pos.stride() if pos is not None else (0, 0)
    block_qh = triton.next_power_of_2(n_q_heads)
    block_kh = triton.next_power_of_2(n_k_heads)
    block_half = triton.next_power_of_2(half)
    block_pass = triton.next_power_of_2(n_pass) if n_pass > 0 else 0
    # GPU notes: a Llama-8B token is a 32x64 Q tile + 8x64 K tile per half; 4 warps hold it without spilling.
    num_warps = 4 if block_qh * block_half <= 2048 else 8
    _rope_qk_kernel[(batch * seq,)](
        q, k, q_out, k_out, cos, sin, pos_arg,
        seq,
        *q.stride(), *q_out.stride(),
        *k.stride(), *k_out.stride(),
        *cos_st, *sin_st, *pos_st,
        n_q_heads, n_k_heads, half, n_pass,
        HAS_POS=pos is not None, BACKWARD=backward,
        BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        num_warps=num_warps,
    )


class _RopeQKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        # empty_like keeps q/k's strides when they are dense (HF's transposed views), else gives contiguous.
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _launch(q, k, q_out, k_out, cos, sin, position_ids, backward=False)
        ctx.save_for_backward(cos, sin, position_ids)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = torch.empty_like(dq_out), torch.empty_like(dk_out)
        _launch(dq_out, dk_out, dq, dk, cos, sin, position_ids, backward=True)
        return dq, dk, None, None, None


def _check_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("q and k must be [batch, heads, seq, head_dim]")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ outside the head dimension")
    rotary_dim = cos.shape[-1]
    if cos.shape != sin.shape or rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"cos/sin {tuple(cos.shape)} must match, with an even last dim <= head_dim {q.shape[-1]}")


def rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to q and k together; see the module docstring for shapes and conventions."""
    _check_shapes(q, k, cos, sin)
    if use_triton(q, k) and q.numel() > 0 and k.numel() > 0 and q.dtype == k.dtype:
        return _RopeQKFunction.apply(q, k, cos, sin, position_ids)
    return rope_qk_reference(q, k, cos, sin, position_ids)
