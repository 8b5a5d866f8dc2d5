"""The CUDA caching-allocator setting that training with these kernels runs under.

Contract: `with_expandable_segments(environ)` returns a copy of the environment mapping `environ` with
`PYTORCH_ALLOC_CONF=expandable_segments:True` added, unless `environ` already configures the allocator
(`PYTORCH_ALLOC_CONF`, or its older name `PYTORCH_CUDA_ALLOC_CONF`): a user's setting wins. Torch reads it when CUDA
first allocates, so it is meant for a child process's environment (the daemon's trainer, the benchmark's workers).

Why: a step allocates and frees blocks of many sizes (the per-call dequantised weights, the checkpoint re-runs);
with fixed segments the allocator fragments and stalls on cudaFree in later steps (docs/kernels.md, runs 8-9).
Unsloth sets the same at import.
"""

from collections.abc import Mapping

ALLOC_CONF = "expandable_segments:True"


def with_expandable_segments(environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    if "PYTORCH_ALLOC_CONF" not in env and "PYTORCH_CUDA_ALLOC_CONF" not in env:
        env["PYTORCH_ALLOC_CONF"] = ALLOC_CONF
    return env
