"""Benchmark RoPE on Q and K: Triton kernel vs PyTorch reference vs torch.compile(reference), Llama-3.1-8B sizes.

GPU only. `run()` returns rows {op, impl, pass, dtype, ms, peak_mem_mb, bytes}: `ms` is the median of
`triton.testing.do_bench`, `peak_mem_mb` the peak CUDA memory allocated by one call above what was live before it.
Q/K are HF's transposed views ([batch, seq, heads, dim] storage seen as [batch, heads, seq, dim]) and cos/sin are
[1, seq, head_dim], as HF's attention passes them. Importing this module needs no GPU.
"""

import torch

from benchmarks.kernels.timing import measure as _measure

from sloth_kernels.rope import rope_qk, rope_qk_reference

BATCH, SEQ, Q_HEADS, KV_HEADS, HEAD_DIM, THETA = 2, 2048, 32, 8, 128, 500000.0
DTYPES = (torch.bfloat16, torch.float32)


def _cos_sin(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
    freqs = torch.arange(SEQ, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def run() -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench_rope needs a CUDA GPU")
    impls = {"triton": rope_qk, "torch": rope_qk_reference, "torch.compile": torch.compile(rope_qk_reference)}
    rows = []
    for dtype in DTYPES:
        q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        cos, sin = _cos_sin(dtype)

        def fwd_bwd(op):
            q_out, k_out = op(q, k, cos, sin)
            torch.autograd.backward([q_out, k_out], [dq, dk])

        for impl, op in impls.items():
            passes = {"fwd": lambda op=op: op(q, k, cos, sin), "fwd+bwd": lambda op=op: fwd_bwd(op)}
            for pass_name, fn in passes.items():
                ms, peak_mb = _measure(fn, [q, k])
                # HBM traffic: q and k read, rotated q and k written; the backward the same for their grads
                tensors = 2 if pass_name == "fwd" else 4
                rows.append({"op": "rope_qk", "impl": impl, "pass": pass_name,
                             "dtype": str(dtype).removeprefix("torch."), "ms": ms, "peak_mem_mb": peak_mb,
                             "bytes": tensors * (q.numel() + k.numel()) * q.element_size()})
    return rows
