"""NF4 dequantisation of bitsandbytes 4-bit weights: one Triton launch, and the PyTorch reference it must match.

Contract
--------
`dequantize_nf4(weight_packed, quant_state, out=None, *, dtype=None) -> Tensor[out_features, in_features]`
undoes `bitsandbytes.functional.quantize_4bit(W, quant_type="nf4")` for a 2-D weight W of shape
`quant_state.shape == (N, K)` (a `bnb.nn.Params4bit` and its `QuantState`). The layout, read from bitsandbytes 0.50:

- W is flattened row-major; element i lives in byte i // 2 of the packed tensor (shape [(N*K+1)//2, 1], uint8, or
  another `quant_storage` dtype that we view as bytes): even i in the HIGH nibble, odd i in the LOW nibble.
- The nibble indexes the 16-entry NF4 table (`NF4_CODE`, the QLoRA normal-float quantiles, sorted, in [-1, 1]).
- Element i is scaled by absmax[i // blocksize] (fp32), blocksize in {32, ..., 4096} (64 by default).
- Double quantisation (`compress_statistics=True`, `quant_state.nested`): absmax is itself uint8, blockwise
  quantised with its own state: absmax[b] = state2.code[qabsmax[b]] * state2.absmax[b // state2.blocksize] + offset,
  computed in fp32 (state2.code is the 256-entry dynamic map, state2.blocksize is 256).
- value = fp32(code[nibble] * absmax) rounded once to the output dtype; this is exactly what bitsandbytes computes,
  so results equal `bnb.functional.dequantize_4bit` bit for bit (GPU FMA contraction is switched off for that reason).

Output dtype: `out.dtype` if `out` is given, else `dtype`, else `quant_state.dtype` (what bnb returns). `out` may be
any [N, K] view (e.g. rows of a larger buffer); strides are honoured.

Not supported (raise ValueError, callers fall back): FP4, non-2-D weights, bnb's AVX512 CPU repacked inference format
(`quant_state.packing_format_for_cpu`).

Dispatch: Triton when `use_triton(weight)` (CUDA, or TRITON_INTERPRET=1); otherwise `dequantize_nf4_reference`.
`resolve_absmax(quant_state)` returns the fp32 per-block scales (undoing double quantisation) in one small launch, for
kernels that dequantise tiles themselves (see `sloth_kernels.lora_linear`).
"""

import os

import torch
import triton
import triton.language as tl

from sloth_kernels._dispatch import use_triton

# QLoRA's NormalFloat4 table (bitsandbytes `get_4bit_type("nf4")`), indexed by the 4-bit code.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_code_cache: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device) -> torch.Tensor:
    """The NF4 table as an fp32 tensor on `device` (cached: kernels gather from it)."""
    device = torch.device(device)
    code = _code_cache.get(device)
    if code is None:
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
        _code_cache[device] = code
    return code


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_quant_state(quant_state) -> tuple[int, int]:
    """Validate that `quant_state` describes a 2-D NF4 weight we can read; return (out_features, in_features)."""
    if quant_state is None:
        raise ValueError("NF4 weight without a quant_state")
    if getattr(quant_state, "quant_type", None) != "nf4":
        raise ValueError(f"only NF4 is supported, got quant_type={getattr(quant_state, 'quant_type', None)!r}")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("bitsandbytes' AVX512 CPU inference packing (packing_format_for_cpu) is not supported")
    shape = quant_state.shape
    if shape is None or len(shape) != 2:
        raise ValueError(f"NF4 weight must be 2-D, quant_state.shape={shape}")
    if quant_state.blocksize <= 0 or quant_state.blocksize % 2:
        raise ValueError(f"invalid NF4 blocksize {quant_state.blocksize}")
    if quant_state.nested and quant_state.state2 is None:
        raise ValueError("nested quant_state without state2")
    return int(shape[0]), int(shape[1])


def packed_bytes(weight_packed: torch.Tensor) -> torch.Tensor:
    """The packed weight as a flat, plain uint8 tensor (drops the Params4bit subclass and any quant_storage dtype)."""
    w = weight_packed.data if isinstance(weight_packed, torch.nn.Parameter) else weight_packed
    if w.dtype != torch.uint8:
        w = w.view(torch.uint8)
    return w.reshape(-1)


def _out_tensor(shape, quant_state, out, dtype, device) -> torch.Tensor:
    if out is not None:
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
        return out
    return torch.empty(shape, dtype=dtype or quant_state.dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain torch, no bitsandbytes calls)
# ----------------------------------------------------------------------------------------------------------------
def absmax_reference(quant_state) -> torch.Tensor:
    """fp32 per-block scales, undoing double quantisation when `quant_state.nested`."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    nb = quant_state.absmax.numel()
    blocks2 = torch.arange(nb, device=quant_state.absmax.device) // s2.blocksize
    am = s2.code.float()[quant_state.absmax.reshape(-1).long()] * s2.absmax.float()[blocks2]
    return am + quant_state.offset.float()


def dequantize_nf4_reference(weight_packed, quant_state, out=None, *, dtype=None) -> torch.Tensor:
    """Same contract as `dequantize_nf4`, in plain torch from the math above."""
    n, k = check_quant_state(quant_state)
    b = packed_bytes(weight_packed)
    numel = n * k
    idx = torch.stack([b >> 4, b & 15], dim=-1).reshape(-1)[:numel].long()
    scale = absmax_reference(quant_state)[torch.arange(numel, device=b.device) // quant_state.blocksize]
    w = (nf4_code(b.device)[idx] * scale).reshape(n, k)
    res = _out_tensor((n, k), quant_state, out, dtype, b.device)
    res.copy_(w.to(res.dtype))
    return res


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def round_bf16_rne(x):
    """Round fp32 `x` to the nearest-even bf16 value, still held in fp32.

    Only used under the CPU interpreter, whose fp32->bf16 cast truncates; on GPU the cast itself rounds to nearest.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr,
                 BLOCKSIZE2: tl.constexpr):
    """fp32 scale of absmax block(s) `blk`; undoes double quantisation in-register when NESTED."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        s = s + tl.load(offset_ptr)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _dequant_nf4_values(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, numel, pid,
                        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                        RNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """(fp32 values, flat indices) of program `pid`'s 2*BLOCK weights: it reads BLOCK packed bytes."""
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    first = byte * 2  # flat index of the high-nibble element
    bmask = first < numel
    b = tl.load(packed_ptr + byte, mask=bmask, other=0).to(tl.int32)
    # blocksize is even, so both nibbles of a byte share one absmax block.
    scale = _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, first // BLOCKSIZE, bmask, NESTED, BLOCKSIZE2)
    hi = tl.load(code_ptr + (b >> 4)) * scale
    lo = tl.load(code_ptr + (b & 15)) * scale
    if RNE_BF16:
        hi = round_bf16_rne(hi)
        lo = round_bf16_rne(lo)
    return tl.interleave(hi, lo), pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)


@triton.jit
def _dequant_nf4_kernel(
    packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
    numel, n_cols, stride_on, stride_ok,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, CONTIGUOUS: tl.constexpr,
    RNE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    vals, flat = _dequant_nf4_values(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, numel, pid,
                                     BLOCKSIZE, BLOCKSIZE2, NESTED, RNE_BF16, BLOCK)
    vals = vals.to(out_ptr.dtype.element_ty)
    mask = flat < numel
    if CONTIGUOUS:
        tl.store(out_ptr + flat, vals, mask=mask)
    else:
        tl.store(out_ptr + (flat // n_cols) * stride_on + (flat % n_cols) * stride_ok, vals, mask=mask)


@triton.jit
def _dequant_nf4_part(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, numel, pid,
                      BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                      RNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Program `pid` of one weight inside a stacked launch (contiguous output)."""
    vals, flat = _dequant_nf4_values(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, numel, pid,
                                     BLOCKSIZE, BLOCKSIZE2, NESTED, RNE_BF16, BLOCK)
    tl.store(out_ptr + flat, vals.to(out_ptr.dtype.element_ty), mask=flat < numel)


@triton.jit
def _dequant_nf4_stacked_kernel(
    code_ptr,
    p0, a0, c0, s0, o0, out0, n0, end0,
    p1, a1, c1, s1, o1, out1, n1, end1,
    p2, a2, c2, s2, o2, out2, n2,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, THREE: tl.constexpr,
    RNE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Two or three NF4 weights in one launch: programs [0, end0) do weight 0, [end0, end1) weight 1, the rest 2."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < end0:
        _dequant_nf4_part(p0, code_ptr, a0, c0, s0, o0, out0, n0, pid, BLOCKSIZE, BLOCKSIZE2, NESTED, RNE_BF16, BLOCK)
    elif pid < end1:
        _dequant_nf4_part(p1, code_ptr, a1, c1, s1, o1, out1, n1, pid - end0, BLOCKSIZE, BLOCKSIZE2, NESTED,
                          RNE_BF16, BLOCK)
    elif THREE:
        _dequant_nf4_part(p2, code_ptr, a2, c2, s2, o2, out2, n2, pid - end1, BLOCKSIZE, BLOCKSIZE2, NESTED,
                          RNE_BF16, BLOCK)


@triton.jit
def _absmax_kernel(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n_blocks,
                   BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_blocks
    s = _block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, offs, mask, NESTED, BLOCKSIZE2)
    tl.store(out_ptr + offs, s, mask=mask)


def _nested_args(quant_state):
    """(absmax, code2, absmax2, offset, blocksize2) pointers for the kernels; dummies when not nested."""
    if quant_state.nested:
        s2 = quant_state.state2
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), device=quant_state.absmax.device)
        # A 0-d tensor read in-kernel: no .item(), so no host sync on GPU.
        return (quant_state.absmax, s2.code.float(), s2.absmax.float(), offset.float().reshape(1), int(s2.blocksize))
    a = quant_state.absmax
    return a, a, a, a, 1


def resolve_absmax(quant_state) -> torch.Tensor:
    """fp32 per-block scales of an NF4 weight (double quantisation undone), [n_blocks]; Triton when it applies."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    if not use_triton(quant_state.absmax):
        return absmax_reference(quant_state)
    absmax, code2, absmax2, offset, bs2 = _nested_args(quant_state)
    n_blocks = absmax.numel()
    out = torch.empty(n_blocks, dtype=torch.float32, device=absmax.device)
    block = 1024
    _absmax_kernel[(triton.cdiv(n_blocks, block),)](
        absmax, code2, absmax2, offset, out, n_blocks, BLOCKSIZE2=bs2, NESTED=True, BLOCK=block,
        enable_fp_fusion=False,
    )
    return out


def _bytes_per_program(interp: bool) -> int:
    """Packed bytes each dequantisation program reads (it writes twice as many weights)."""
    # GPU notes: memory bound (reads 0.5 B, writes 2 B per weight); 1024 bytes -> 2048 outputs per program with 4
    # warps keeps 16 contiguous bf16 per thread for wide stores. The interpreter pays per program, not per element.
    return 4096 if interp else 1024


def dequantize_nf4(weight_packed, quant_state, out=None, *, dtype=None) -> torch.Tensor:
    """Dequantise an NF4 weight to [out_features, in_features]; see the module docstring for the contract."""
    n, k = check_quant_state(quant_state)
    b = packed_bytes(weight_packed)
    if not use_triton(b):
        return dequantize_nf4_reference(weight_packed, quant_state, out, dtype=dtype)
    numel = n * k
    if b.numel() * 2 < numel:
        raise ValueError(f"packed weight holds {b.numel() * 2} nibbles, quant_state.shape needs {numel}")
    res = _out_tensor((n, k), quant_state, out, dtype, b.device)
    absmax, code2, absmax2, offset, bs2 = _nested_args(quant_state)
    interp = interpreting()
    block = _bytes_per_program(interp)
    _dequant_nf4_kernel[(triton.cdiv(numel, 2 * block),)](
        b, nf4_code(b.device), absmax, code2, absmax2, offset, res,
        numel, k, res.stride(0), res.stride(1),
        BLOCKSIZE=int(quant_state.blocksize), BLOCKSIZE2=bs2, NESTED=bool(quant_state.nested),
        CONTIGUOUS=res.is_contiguous(), RNE_BF16=interp and res.dtype == torch.bfloat16, BLOCK=block,
        num_warps=4,
        # bnb computes code2*absmax2 and then adds the offset as two roundings; an FMA would differ in the last bit.
        enable_fp_fusion=False,
    )
    return res


def dequantize_nf4_stacked(weights, out: torch.Tensor) -> torch.Tensor:
    """Dequantise 2 or 3 NF4 weights with the same in_features into the row blocks of `out` [sum N, K], in order.

    `weights` is a list of (weight_packed, quant_state). One launch when they share blocksize and double
    quantisation and `out` is contiguous (GPU notes: each launch costs tens of microseconds of host time, and a
    step dequantises q/k/v and gate/up together several times per layer); otherwise one `dequantize_nf4` each.
    """
    shapes = [check_quant_state(qs) for _, qs in weights]
    if sum(n for n, _ in shapes) != out.shape[0] or any(k != out.shape[1] for _, k in shapes):
        raise ValueError(f"out has shape {tuple(out.shape)}, the weights stack to {shapes}")
    states = [qs for _, qs in weights]
    first = states[0]
    single = (
        len(weights) not in (2, 3)
        or not use_triton(out)
        or not out.is_contiguous()
        or any(qs.blocksize != first.blocksize or bool(qs.nested) != bool(first.nested) for qs in states)
        or (first.nested and any(qs.state2.blocksize != first.state2.blocksize for qs in states))
    )
    if single:
        row = 0
        for (packed, qs), (n, _) in zip(weights, shapes):
            dequantize_nf4(packed, qs, out=out[row : row + n])
            row += n
        return out
    interp = interpreting()
    block = _bytes_per_program(interp)
    args, end, row, bs2 = [], 0, 0, 1
    for (packed, qs), (n, k) in zip(weights, shapes):
        b = packed_bytes(packed)
        numel = n * k
        if b.numel() * 2 < numel:
            raise ValueError(f"packed weight holds {b.numel() * 2} nibbles, quant_state.shape needs {numel}")
        absmax, code2, absmax2, offset, bs2 = _nested_args(qs)
        end += triton.cdiv(numel, 2 * block)
        args += [b, absmax, code2, absmax2, offset, out[row : row + n], numel, end]
        row += n
    if len(weights) == 2:
        args += args[:7]  # an unused third slot (THREE=False), same types
    else:
        args.pop()  # the last weight's end is the grid
    _dequant_nf4_stacked_kernel[(end,)](
        nf4_code(out.device), *args,
        BLOCKSIZE=int(first.blocksize), BLOCKSIZE2=bs2, NESTED=bool(first.nested), THREE=len(weights) == 3,
        RNE_BF16=interp and out.dtype == torch.bfloat16, BLOCK=block, num_warps=4, enable_fp_fusion=False,
    )
    return out
