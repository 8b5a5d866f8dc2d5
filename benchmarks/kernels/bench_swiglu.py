"""Benchmark SwiGLU and GeGLU: Triton kernels vs PyTorch references vs torch.compile(reference), Llama-3.1-8B sizes.

GPU only. `run()` returns rows {op, impl, pass, dtype, ms, peak_mem_mb, bytes}: `ms` is the median of
`triton.testing.do_bench`, `peak_mem_mb` the peak CUDA memory allocated by one call above what was live before it.
gate/up are [batch, seq, intermediate] = [2, 2048, 14336]. Importing this module needs no GPU.
"""

import functools

import torch

from benchmarks.kernels.timing import measure as _measure

from sloth_kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference

BATCH, SEQ, INTERMEDIATE = 2, 2048, 14336
DTYPES = (torch.bfloat16, torch.float32)


def _ops() -> dict[str, dict]:
    gelu_ref = functools.partial(geglu_reference, approximate="tanh")  # Gemma's gelu_pytorch_tanh
    return {
        "swiglu": {"triton": swiglu, "torch": swiglu_reference, "torch.compile": torch.compile(swiglu_reference)},
        "geglu": {
            "triton": functools.partial(geglu, approximate="tanh"),
            "torch": gelu_ref,
            "torch.compile": torch.compile(gelu_ref),
        },
    }


def run() -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench_swiglu needs a CUDA GPU")
    rows = []
    for dtype in DTYPES:
        gate = torch.randn(BATCH, SEQ, INTERMEDIATE, device="cuda", dtype=dtype, requires_grad=True)
        up = torch.randn(BATCH, SEQ, INTERMEDIATE, device="cuda", dtype=dtype, requires_grad=True)
        d_out = torch.randn_like(gate)
        for op_name, impls in _ops().items():
            for impl, op in impls.items():
                passes = {"fwd": lambda op=op: op(gate, up), "fwd+bwd": lambda op=op: op(gate, up).backward(d_out)}
                for pass_name, fn in passes.items():
                    ms, peak_mb = _measure(fn, [gate, up])
                    # HBM traffic: gate, up read and h written; the backward reads gate, up, dh, writes dgate, dup
                    tensors = 3 if pass_name == "fwd" else 8
                    rows.append({"op": op_name, "impl": impl, "pass": pass_name,
                                 "dtype": str(dtype).removeprefix("torch."), "ms": ms, "peak_mem_mb": peak_mb,
                                 "bytes": tensors * gate.numel() * gate.element_size()})
    return rows
