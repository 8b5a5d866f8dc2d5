"""Per-kernel benchmarks: each `bench_<op>.py` exposes `run() -> list[dict]` for benchmarks/bench_kernels.py."""
