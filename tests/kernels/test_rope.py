"""RoPE-on-Q-and-K kernel vs its reference (outputs and both grads), and the reference vs HF's apply_rotary_pos_emb."""

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb

from sloth_kernels.rope import rope_qk, rope_qk_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def _sizes(device: str) -> dict:
    # Interpreter: odd seq, non-power-of-two heads and half-dim, GQA. GPU: Llama-8B attention shapes.
    if device == "cpu":
        return dict(batch=2, q_heads=3, kv_heads=1, seq=5, head_dim=18)
    return dict(batch=2, q_heads=32, kv_heads=8, seq=512, head_dim=128)


def _hf_layout(batch, heads, seq, head_dim, dtype, device) -> torch.Tensor:
    """What HF attention hands to apply_rotary_pos_emb: proj(x).view(b, s, h, d).transpose(1, 2)."""
    return torch.randn(batch, seq, heads, head_dim, device=device).to(dtype).transpose(1, 2)


def _check(q, k, cos, sin, position_ids=None, dq=None, dk=None) -> None:
    """Kernel in q's dtype vs the reference in fp32 on the same values; random upstream grads unless given."""
    dtype = q.dtype
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_out, k_out = rope_qk(q, k, cos, sin, position_ids)
    assert "_RopeQKFunction" in type(q_out.grad_fn).__name__, "the Triton path did not run"
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype and k_out.dtype == dtype
    dq = torch.randn_like(q_out) if dq is None else dq
    dk = torch.randn_like(k_out) if dk is None else dk
    torch.autograd.backward([q_out, k_out], [dq, dk])

    q_ref = q.detach().float().requires_grad_()
    k_ref = k.detach().float().requires_grad_()
    q_out_ref, k_out_ref = rope_qk_reference(q_ref, k_ref, cos.float(), sin.float(), position_ids)
    torch.autograd.backward([q_out_ref, k_out_ref], [dq.float(), dk.float()])

    _assert_close(q_out, q_out_ref.to(dtype), dtype)
    _assert_close(k_out, k_out_ref.to(dtype), dtype)
    _assert_close(q.grad, q_ref.grad, dtype)
    _assert_close(k.grad, k_ref.grad, dtype)


def _random_cos_sin(*shape, dtype, device):
    # Unrelated values in both halves (HF duplicates them): a kernel that mixes up the halves cannot pass.
    return torch.randn(*shape, device=device).to(dtype), torch.randn(*shape, device=device).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", ["per_batch", "batch_1", "no_batch"])
def test_hf_layout_gqa(device, dtype, cos_batch):
    torch.manual_seed(0)
    z = _sizes(device)
    b, s, d = z["batch"], z["seq"], z["head_dim"]
    q = _hf_layout(b, z["q_heads"], s, d, dtype, device)
    k = _hf_layout(b, z["kv_heads"], s, d, dtype, device)
    lead = {"per_batch": (b, s), "batch_1": (1, s), "no_batch": (s,)}[cos_batch]
    cos, sin = _random_cos_sin(*lead, d, dtype=dtype, device=device)
    _check(q, k, cos, sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_position_ids_packed_sequences(device, dtype):
    """Two rows, each packing several sequences whose positions restart at 0 mid-row; cos/sin are tables."""
    torch.manual_seed(1)
    z = _sizes(device)
    b, s, d = z["batch"], z["seq"], z["head_dim"]
    starts = [[0, 3], [0, 1, 4]] if device == "cpu" else [[0, 100, 300], [0, 7]]
    position_ids = torch.zeros(b, s, dtype=torch.long, device=device)
    for row, row_starts in enumerate(starts):
        for start, end in zip(row_starts, row_starts[1:] + [s]):
            position_ids[row, start:end] = torch.arange(end - start, device=device)
    q = _hf_layout(b, z["q_heads"], s, d, dtype, device)
    k = _hf_layout(b, z["kv_heads"], s, d, dtype, device)
    cos, sin = _random_cos_sin(s + 3, d, dtype=dtype, device=device)
    _check(q, k, cos, sin, position_ids)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_rows_equal_separate_sequences(device):
    """The point of position ids: a packed row rotates each sequence as if it were alone, starting at position 0."""
    torch.manual_seed(2)
    seq_a, seq_b, d = 3, 4, 16
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=4 * d, num_attention_heads=4, max_position_embeddings=16))
    table_pos = torch.arange(16, device=device)[None]
    cos_table, sin_table = (t[0] for t in rotary.to(device)(torch.zeros(1, device=device), table_pos))
    q = torch.randn(1, 2, seq_a + seq_b, d, device=device)
    k = torch.randn(1, 1, seq_a + seq_b, d, device=device)
    position_ids = torch.cat([torch.arange(seq_a), torch.arange(seq_b)]).to(device)[None]
    q_packed, k_packed = rope_qk(q, k, cos_table, sin_table, position_ids)
    for lo, hi in [(0, seq_a), (seq_a, seq_a + seq_b)]:
        q_alone, k_alone = rope_qk(q[:, :, lo:hi], k[:, :, lo:hi], cos_table[: hi - lo], sin_table[: hi - lo])
        _assert_close(q_packed[:, :, lo:hi], q_alone, torch.float32)
        _assert_close(k_packed[:, :, lo:hi], k_alone, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_positions", [False, True], ids=["cos_per_token", "position_ids"])
def test_partial_rotary(device, dtype, with_positions):
    """rotary_dim = cos.shape[-1] < head_dim: only the leading dims rotate (Phi-3's partial rotary)."""
    torch.manual_seed(3)
    z = _sizes(device)
    b, s, d = z["batch"], z["seq"], z["head_dim"]
    rotary_dim = 10 if device == "cpu" else 96
    q = _hf_layout(b, z["q_heads"], s, d, dtype, device)
    k = _hf_layout(b, z["kv_heads"], s, d, dtype, device)
    if with_positions:
        cos, sin = _random_cos_sin(s, rotary_dim, dtype=dtype, device=device)
        position_ids = torch.randint(0, s, (b, s), device=device)
    else:
        cos, sin = _random_cos_sin(b, s, rotary_dim, dtype=dtype, device=device)
        position_ids = None
    _check(q, k, cos, sin, position_ids)
    q_out, _ = rope_qk(q, k, cos, sin, position_ids)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views(device, dtype):
    """Q and K sliced out of one fused QKV projection (Phi-3), a strided cos/sin, transposed upstream grads."""
    torch.manual_seed(4)
    z = _sizes(device)
    b, s, d, hq, hk = z["batch"], z["seq"], z["head_dim"], z["q_heads"], z["kv_heads"]
    qkv = torch.randn(b, s, (hq + 2 * hk) * d, device=device).to(dtype)
    q = qkv[..., : hq * d].view(b, s, hq, d).transpose(1, 2)
    k = qkv[..., hq * d : (hq + hk) * d].view(b, s, hk, d).transpose(1, 2)
    cos_wide, sin_wide = _random_cos_sin(b, s, 2 * d, dtype=dtype, device=device)
    cos, sin = cos_wide[..., ::2], sin_wide[..., 1::2]
    dq = torch.randn(b, s, d, hq, device=device).to(dtype).permute(0, 3, 1, 2)
    dk = torch.randn(b, s, d, hk, device=device).to(dtype).permute(0, 3, 1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or cos.is_contiguous() or dq.is_contiguous())
    _check(q, k, cos, sin, dq=dq, dk=dk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_llama_apply_rotary_pos_emb(dtype):
    torch.manual_seed(5)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    q = _hf_layout(2, 4, 7, 16, dtype, "cpu")
    k = _hf_layout(2, 2, 7, 16, dtype, "cpu")
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 0, 1, 2, 3]])
    cos, sin = LlamaRotaryEmbedding(config)(q, position_ids)
    expected = llama_apply_rotary_pos_emb(q, k, cos, sin)
    got = rope_qk_reference(q, k, cos, sin)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # The same rotation from a table indexed by position ids.
    table_cos, table_sin = LlamaRotaryEmbedding(config)(q, torch.arange(32)[None])
    got = rope_qk_reference(q, k, table_cos[0], table_sin[0], position_ids)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_phi3_partial_rotary(dtype):
    torch.manual_seed(6)
    config = Phi3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        partial_rotary_factor=0.5, pad_token_id=0,
    )
    q = _hf_layout(2, 4, 7, 16, dtype, "cpu")
    k = _hf_layout(2, 2, 7, 16, dtype, "cpu")
    cos, sin = Phi3RotaryEmbedding(config)(q, torch.arange(7)[None])
    assert cos.shape[-1] == 8  # the rotary module itself yields the partial width
    expected = phi3_apply_rotary_pos_emb(q, k, cos, sin)
    got = rope_qk_reference(q, k, cos, sin)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
