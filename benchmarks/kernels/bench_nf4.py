"""Benchmark NF4 dequantisation: our Triton kernel vs bitsandbytes' dequantize_4bit vs the torch reference (eager
and torch.compile), at Llama-3.1-8B weight shapes.

GPU only. Weights are quantised by bitsandbytes with double quantisation (the QLoRA recipe), blocksize 64; dequantised
to bf16 (the compute dtype) and to fp32. `run()` returns rows {op, impl, pass, dtype, ms, peak_mem_mb, shape,
bytes}: `ms` is the median of `triton.testing.do_bench`, `peak_mem_mb` the peak CUDA memory of one call above what was live before
(the output weight itself is 2 B/elem in bf16: 112 MiB for 14336 x 4096). There is no backward ("fwd" only).
One more op, `nf4_dequant_stacked[gate+up]`, dequantises gate and up (two 14336 x 4096) into one [28672, 4096]
buffer: `dequantize_nf4_stacked` (one launch) against two `dequantize_nf4` calls and two bitsandbytes calls, bf16.
Importing this module needs no GPU.
"""

import torch

from benchmarks.kernels.timing import measure as _measure

from sloth_kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, dequantize_nf4_stacked

# (out_features, in_features): q/o, k/v, gate/up, down.
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
DTYPES = (torch.bfloat16, torch.float32)


def _quantised(out_f, in_f, seed):
    import bitsandbytes.functional as F

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")


def _row(rows, op, impl, dtype, fn, shape):
    try:
        ms, peak_mb = _measure(fn)
    except Exception as exc:  # a compile failure must not hide the other rows
        print(f"bench_nf4: {op} {impl} {dtype} failed: {exc!r}")
        ms, peak_mb = float("nan"), float("nan")
    numel = shape[0] * shape[1]
    # HBM traffic: 4 bits a weight and one uint8 absmax per 64 read, the weight written in `dtype`
    traffic = numel * (0.5 + 1 / 64 + torch.empty(0, dtype=dtype).element_size())
    rows.append({"op": op, "impl": impl, "pass": "fwd", "dtype": str(dtype).removeprefix("torch."), "ms": ms,
                 "peak_mem_mb": peak_mb, "shape": list(shape), "bytes": traffic})


def _stacked_rows(rows):
    """gate + up into one buffer, as the MLP's forward, re-run and backward do: one launch vs two."""
    import bitsandbytes.functional as F

    weights = [_quantised(14336, 4096, seed) for seed in (1, 2)]
    out = torch.empty(2 * 14336, 4096, device="cuda", dtype=torch.bfloat16)

    def two_bnb():
        out[:14336].copy_(F.dequantize_4bit(*weights[0]))
        out[14336:].copy_(F.dequantize_4bit(*weights[1]))

    impls = {
        "triton-stacked": lambda: dequantize_nf4_stacked(weights, out),
        "triton": lambda: (dequantize_nf4(*weights[0], out=out[:14336]), dequantize_nf4(*weights[1], out=out[14336:])),
        "bitsandbytes": two_bnb,
    }
    for impl, fn in impls.items():
        _row(rows, "nf4_dequant_stacked[gate+up]", impl, torch.bfloat16, fn, out.shape)


def run() -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench_nf4 needs a CUDA GPU")
    import bitsandbytes.functional as F

    compiled = torch.compile(dequantize_nf4_reference)
    rows = []
    for out_f, in_f in SHAPES:
        packed, qs = _quantised(out_f, in_f, 0)
        for dtype in DTYPES:
            impls = {
                "triton": lambda: dequantize_nf4(packed, qs, dtype=dtype),
                "bitsandbytes": lambda: F.dequantize_4bit(packed, qs).to(dtype),
                "torch": lambda: dequantize_nf4_reference(packed, qs, dtype=dtype),
                "torch.compile": lambda: compiled(packed, qs, dtype=dtype),
            }
            for impl, fn in impls.items():
                _row(rows, f"nf4_dequant[{out_f}x{in_f}]", impl, dtype, fn, (out_f, in_f))
    _stacked_rows(rows)
    return rows
