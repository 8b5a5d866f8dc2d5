"""Benchmark RMSNorm: Triton kernel vs PyTorch reference vs torch.compile(reference), Llama-3.1-8B sizes, GPU only.

`run()` returns rows {op, impl, pass, dtype, ms, peak_mem_mb, bytes}: `ms` is the median of `triton.testing.do_bench`,
`peak_mem_mb` the peak CUDA memory allocated by one call above what was live before it (inputs excluded).
The table/JSON driver is benchmarks/bench_kernels.py. Importing this module needs no GPU; running it does.
"""

import torch

from benchmarks.kernels.timing import measure as _measure

from sloth_kernels.rms_norm import rms_norm, rms_norm_reference

BATCH, SEQ, HIDDEN = 2, 2048, 4096
DTYPES = (torch.bfloat16, torch.float32)


def run() -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench_rms_norm needs a CUDA GPU")
    impls = {"triton": rms_norm, "torch": rms_norm_reference, "torch.compile": torch.compile(rms_norm_reference)}
    rows = []
    for dtype in DTYPES:
        x = torch.randn(BATCH, SEQ, HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
        weight = (1.0 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(dtype).requires_grad_()
        dy = torch.randn_like(x)
        for impl, op in impls.items():
            passes = {"fwd": lambda op=op: op(x, weight), "fwd+bwd": lambda op=op: op(x, weight).backward(dy)}
            for pass_name, fn in passes.items():
                ms, peak_mb = _measure(fn, [x, weight])
                # HBM traffic: x read, y written; the backward reads dy and x again and writes dx
                tensors = 2 if pass_name == "fwd" else 5
                rows.append({"op": "rms_norm", "impl": impl, "pass": pass_name,
                             "dtype": str(dtype).removeprefix("torch."), "ms": ms, "peak_mem_mb": peak_mb,
                             "bytes": tensors * x.numel() * x.element_size()})
    return rows
