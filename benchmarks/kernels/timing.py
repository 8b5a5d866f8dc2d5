"""Shared timing for the per-kernel benchmarks (GPU only): median time and the peak memory one call adds."""

import torch


def measure(fn, inputs: list[torch.Tensor] = ()) -> tuple[float, float]:
    """Return (median ms from `triton.testing.do_bench`, peak CUDA MB allocated by one call above what was live).

    `inputs` are tensors whose `.grad` is reset between calls, so backward passes don't accumulate."""
    from triton.testing import do_bench

    fn()  # compile / warm caches outside the measurements
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    return do_bench(fn, grad_to_none=list(inputs) or None, return_mode="median"), peak_mb
