"""NF4 dequantisation: Triton kernel and torch reference against bitsandbytes' own dequantize_4bit.

Weights are quantised by bitsandbytes itself (functional.quantize_4bit and nn.Linear4bit on CPU), with and without
double quantisation, blocksizes 64 and 128, odd row counts, and more than 256 absmax blocks (several nested blocks,
the last one partial). The result must equal bnb's bit for bit in every dtype.

Shapes whose rows are not a whole number of blocks (in_features % blocksize != 0; no real LLM has them) are checked
against the reference and the original weight instead: bitsandbytes 0.50's native CPU dequantize_4bit misreads them
(its result is ~4x further from the original weight than the blockwise math its own quantizer used).
"""

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

from sloth_kernels.nf4 import (
    NF4_CODE,
    absmax_reference,
    dequantize_nf4,
    dequantize_nf4_reference,
    dequantize_nf4_stacked,
    resolve_absmax,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (out, in) with whole blocks per row: odd rows, 390 blocks (two nested blocks, the last partial), 3 blocks per row.
CPU_SHAPES = [(65, 384), (37, 192)]
CUDA_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096)]
# Rows shorter than a block, and rows of 1.5 blocks: blocks straddle rows.
STRADDLING_SHAPES = [(96, 40), (48, 96)]


def _quantize(shape, dtype, device, blocksize, nested, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.02).to(dtype).to(device)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    return w, packed, qs


def _shapes(device, blocksize):
    shapes = CPU_SHAPES if device == "cpu" else CUDA_SHAPES
    return [s for s in shapes if (s[0] * s[1]) % blocksize == 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_matches_bitsandbytes(device, dtype, nested, blocksize):
    for shape in _shapes(device, blocksize):
        _, packed, qs = _quantize(shape, dtype, device, blocksize, nested)
        expected = F.dequantize_4bit(packed, qs)
        got = dequantize_nf4(packed, qs)
        ref = dequantize_nf4_reference(packed, qs)
        assert got.shape == shape and got.dtype == dtype
        # Same fp32 product rounded once to dtype: bit-exact.
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"triton {shape}: {m}")
        torch.testing.assert_close(ref, expected, rtol=0, atol=0, msg=lambda m: f"reference {shape}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_blocks_straddling_rows(device, dtype, nested):
    for shape in STRADDLING_SHAPES:
        w, packed, qs = _quantize(shape, dtype, device, 64, nested)
        ref = dequantize_nf4_reference(packed, qs)
        torch.testing.assert_close(dequantize_nf4(packed, qs), ref, rtol=0, atol=0)
        _assert_within_4bit_error(ref, w, blocksize=64)
        if device == "cuda":
            torch.testing.assert_close(ref, F.dequantize_4bit(packed, qs), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("count", [2, 3])
def test_stacked_equals_one_by_one(device, dtype, nested, count):
    """q/k/v- or gate/up-style stacks (different row counts, one in_features) in one launch: bit-exact per weight."""
    rows = [65, 37, 128][:count] if device == "cpu" else [4096, 1024, 1024][:count]
    cols = 384 if device == "cpu" else 4096
    weights = [_quantize((n, cols), dtype, device, 64, nested, seed=i)[1:] for i, n in enumerate(rows)]
    out = torch.full((sum(rows), cols), float("nan"), dtype=dtype, device=device)
    assert dequantize_nf4_stacked(weights, out) is out
    expected = torch.cat([F.dequantize_4bit(packed, qs) for packed, qs in weights])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_falls_back_when_weights_differ(device):
    """Different block sizes (or double quantisation) cannot share one launch: one launch each, same result."""
    a = _quantize((64, 128), torch.float32, device, 64, True, seed=1)[1:]
    b = _quantize((32, 128), torch.float32, device, 128, False, seed=2)[1:]
    out = torch.empty(96, 128, device=device)
    dequantize_nf4_stacked([a, b], out)
    torch.testing.assert_close(out, torch.cat([F.dequantize_4bit(*a), F.dequantize_4bit(*b)]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="stack"):
        dequantize_nf4_stacked([a, b], torch.empty(95, 128, device=device))


def _assert_within_4bit_error(deq, original, blocksize):
    """deq is `original` up to 4-bit resolution, same orientation: |w - q| <= (half the widest NF4 gap + slack for
    the 8-bit absmax and output rounding) * block absmax, and far less on average."""
    gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2
    orig = original.float().reshape(-1, blocksize)
    blocks = orig.abs().amax(1, keepdim=True)
    err = (deq.float().reshape(-1, blocksize) - orig).abs()
    assert bool((err <= (gap + 0.05) * blocks).all())
    assert (err.mean() / blocks.mean()).item() < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_resolve_absmax_undoes_double_quant(device):
    shape = _shapes(device, 64)[0]
    _, packed, qs_nested = _quantize(shape, torch.float32, device, 64, nested=True)
    _, _, qs_plain = _quantize(shape, torch.float32, device, 64, nested=False)
    assert qs_nested.absmax.dtype == torch.uint8 and qs_nested.absmax.numel() > 256
    expected = F.dequantize_blockwise(qs_nested.absmax, qs_nested.state2) + qs_nested.offset
    torch.testing.assert_close(resolve_absmax(qs_nested), expected, rtol=0, atol=0)
    torch.testing.assert_close(absmax_reference(qs_nested), expected, rtol=0, atol=0)
    # The 8-bit absmax is an approximation of the true per-block absmax (within the dynamic map's resolution).
    torch.testing.assert_close(resolve_absmax(qs_nested), qs_plain.absmax, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_params(device, dtype):
    """A weight quantised the way models load: bnb.nn.Linear4bit (Params4bit + QuantState, double quant on)."""
    out_f, in_f = (48, 128) if device == "cpu" else (4096, 4096)
    torch.manual_seed(1)
    dense = torch.nn.Linear(in_f, out_f).to(dtype)
    layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    layer = layer.to(device)
    weight, qs = layer.weight, layer.weight.quant_state
    assert isinstance(weight, bnb.nn.Params4bit) and qs.nested and tuple(qs.shape) == (out_f, in_f)
    got = dequantize_nf4(weight, qs)
    torch.testing.assert_close(got, F.dequantize_4bit(weight, qs), rtol=0, atol=0)
    torch.testing.assert_close(dequantize_nf4_reference(weight, qs), got, rtol=0, atol=0)
    _assert_within_4bit_error(got, dense.weight.detach().to(device), blocksize=64)


@pytest.mark.parametrize("device", DEVICES)
def test_out_views_and_dtype(device):
    """`out` may be rows of a larger buffer or a transposed (non-contiguous) view; `dtype` overrides qs.dtype."""
    shape = _shapes(device, 64)[0]
    _, packed, qs = _quantize(shape, torch.float32, device, 64, nested=True)
    expected = F.dequantize_4bit(packed, qs)

    buf = torch.full((shape[0] + 5, shape[1]), 7.0, device=device)
    res = dequantize_nf4(packed, qs, out=buf[2 : 2 + shape[0]])
    assert res.data_ptr() == buf[2].data_ptr()
    torch.testing.assert_close(buf[2 : 2 + shape[0]], expected, rtol=0, atol=0)
    assert bool((buf[:2] == 7).all() and (buf[2 + shape[0] :] == 7).all())

    transposed = torch.zeros(shape[1], shape[0], device=device).t()
    dequantize_nf4(packed, qs, out=transposed)
    torch.testing.assert_close(transposed, expected, rtol=0, atol=0)

    as_bf16 = dequantize_nf4(packed, qs, dtype=torch.bfloat16)
    torch.testing.assert_close(as_bf16, expected.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_quant_storage_other_than_uint8(device):
    """FSDP-style QLoRA stores packed bytes in a float dtype; they are the same bytes."""
    w = (torch.randn(40, 128) * 0.02).to(device)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    torch.testing.assert_close(dequantize_nf4(packed, qs), F.dequantize_4bit(packed, qs), rtol=0, atol=0)


def test_rejects_what_it_cannot_read():
    w = torch.randn(16, 64)
    packed, qs = F.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="NF4"):
        dequantize_nf4(packed, qs)
    packed, qs = F.quantize_4bit(w, quant_type="nf4")
    qs.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing"):
        dequantize_nf4(packed, qs)
    qs.packing_format_for_cpu = False
    with pytest.raises(ValueError, match="shape"):
        dequantize_nf4(packed, qs, out=torch.empty(64, 16))
