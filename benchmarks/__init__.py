"""Benchmarks run on the GPU machine; each module imports cleanly on CPU."""
