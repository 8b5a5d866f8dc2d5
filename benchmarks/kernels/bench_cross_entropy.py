"""Benchmark cross-entropy: fused LM head + loss (and plain CE over existing logits) vs reference vs torch.compile.

GPU only. Llama-3.1-8B sizes: 4096 tokens (batch 2 x seq 2048), hidden 4096, vocab 128256, bf16. `run()` returns rows
{op, impl, pass, dtype, ms, peak_mem_mb, flop or bytes}: `ms` is the median of `triton.testing.do_bench`,
`peak_mem_mb` the peak CUDA memory allocated by one call above what was live before it (inputs excluded).

Ops:
- `fused_linear_cross_entropy`: LM head weight trainable (grad_W [V, H] is part of every impl's memory).
- `fused_linear_cross_entropy[frozen_w]`: the LoRA case, the LM head is frozen; only grad_hidden is needed.
- `cross_entropy`: loss over logits that already exist ([4096, 128256] bf16), gradient written in place.
The reference materialises the fp32 logits (2 GB here) and their grad; the fused op holds one ~256 MB chunk.
For the fused op "fwd" already computes the grads (that is where its work is); its "fwd+bwd" adds only a scale.
Importing this module needs no GPU.
"""

import torch

from benchmarks.kernels.timing import measure as _measure

from sloth_kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

TOKENS, HIDDEN, VOCAB = 2 * 2048, 4096, 128256
DTYPE = torch.bfloat16


def _row(op: str, impl: str, pass_name: str, ms: float, peak_mb: float, **work) -> dict:
    return {"op": op, "impl": impl, "pass": pass_name, "dtype": str(DTYPE).removeprefix("torch."),
            "ms": ms, "peak_mem_mb": peak_mb, **work}


def _bench_fused(rows: list[dict]) -> None:
    impls = {
        "triton": fused_linear_cross_entropy,
        "torch": fused_linear_cross_entropy_reference,
        "torch.compile": torch.compile(fused_linear_cross_entropy_reference),
    }
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=gen)
    for op_name, weight_trainable in (("fused_linear_cross_entropy", True),
                                      ("fused_linear_cross_entropy[frozen_w]", False)):
        weight = (torch.randn(VOCAB, HIDDEN, device="cuda", dtype=DTYPE, generator=gen) / HIDDEN**0.5)
        weight.requires_grad_(weight_trainable)
        inputs = [hidden, weight] if weight_trainable else [hidden]
        for impl, op in impls.items():
            passes = {
                "fwd": lambda op=op: op(hidden, weight, labels),
                "fwd+bwd": lambda op=op: op(hidden, weight, labels).backward(),
            }
            for pass_name, fn in passes.items():
                # GEMMs: logits; the backward grad_hidden and, when the head trains, grad_W (each 2*T*H*V FLOP)
                gemms = 1 if pass_name == "fwd" else (3 if weight_trainable else 2)
                rows.append(_row(op_name, impl, pass_name, *_measure(fn, inputs),
                                 flop=gemms * 2 * TOKENS * HIDDEN * VOCAB))
        del weight
        torch.cuda.empty_cache()


def _bench_plain(rows: list[dict]) -> None:
    impls = {
        "triton": cross_entropy,
        "torch": cross_entropy_reference,
        "torch.compile": torch.compile(cross_entropy_reference),
    }
    gen = torch.Generator(device="cuda").manual_seed(1)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=gen)
    # The Triton op overwrites the logits with their gradient; the cost per call is the same whatever they hold.
    logits = torch.randn(TOKENS, VOCAB, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    for impl, op in impls.items():
        passes = {"fwd": lambda op=op: op(logits, labels), "fwd+bwd": lambda op=op: op(logits, labels).backward()}
        for pass_name, fn in passes.items():
            # HBM traffic: the logits read; with the backward their grad written too
            tensors = 1 if pass_name == "fwd" else 2
            rows.append(_row("cross_entropy", impl, pass_name, *_measure(fn, [logits]),
                             bytes=tensors * logits.numel() * logits.element_size()))


def run() -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench_cross_entropy needs a CUDA GPU")
    rows: list[dict] = []
    _bench_fused(rows)
    _bench_plain(rows)
    return rows
