"""Benchmark NF4 dequantisation: our Triton kernel vs bitsandbytes' dequantize_4bit vs the torch reference (eager
and torch.compile), at Llama-3.1-8B weight shapes.

GPU only. Weights are quantised by bitsandbytes with double quantisation (the QLoRA recipe), blocksize 64; dequantised
to bf16 (the compute dtype) and to fp32. `run()` returns rows {op, impl, pass, dtype, ms, peak_mem_mb, shape}: `ms`
is the median of `triton.testing.do_bench`, `peak_mem_mb` the peak CUDA memory of one call above what was live before
(the output weight itself is 2 B/elem in bf16: 112 MiB for 14336 x 4096). There is no backward ("fwd" only).
Importing this module needs no GPU.
"""

import torch

from benchmarks.kernels.timing import measure as _measure

from sloth_kernels.nf4 import dequantize_nf4, dequantize_nf4_reference

# (out_features, in_features): q/o, k/v, gate/up, down.
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
DTYPES = (torch.bfloat16, torch.float32)


def run() -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench_nf4 needs a CUDA GPU")
    import bitsandbytes.functional as F

    compiled = torch.compile(dequantize_nf4_reference)
    rows = []
    for out_f, in_f in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        del w
        for dtype in DTYPES:
            impls = {
                "triton": lambda: dequantize_nf4(packed, qs, dtype=dtype),
                "bitsandbytes": lambda: F.dequantize_4bit(packed, qs).to(dtype),
                "torch": lambda: dequantize_nf4_reference(packed, qs, dtype=dtype),
                "torch.compile": lambda: compiled(packed, qs, dtype=dtype),
            }
            for impl, fn in impls.items():
                try:
                    ms, peak_mb = _measure(fn)
                except Exception as exc:  # a compile failure must not hide the other rows
                    print(f"bench_nf4: {impl} {out_f}x{in_f} {dtype} failed: {exc!r}")
                    ms, peak_mb = float("nan"), float("nan")
                rows.append({"op": f"nf4_dequant[{out_f}x{in_f}]", "impl": impl, "pass": "fwd",
                             "dtype": str(dtype).removeprefix("torch."), "ms": ms, "peak_mem_mb": peak_mb,
                             "shape": [out_f, in_f]})
    return rows
