"""The physical limits the per-kernel benchmarks are judged against, and each row's share of them.

A row of a `benchmarks/kernels/bench_*.py` module may carry the minimum work its pass needs:
- `bytes`: HBM traffic for memory-bound ops (each input read once, each output written once; the dominant tensors
  only, vectors such as norm weights or per-row statistics left out), or
- `flop`: floating-point operations for GEMM-bound ops (2 per multiply-add; the frozen base GEMMs and the LoRA
  products; dequantisation traffic not counted).
`add_limits(rows)` turns those into `pct_of_limit` (achieved bytes/s or FLOP/s over the limit, in percent) and
`limit` (which limit: "HBM" or "<dtype> peak"). A row without either keeps neither field.

Default limits: NVIDIA H200 SXM datasheet figures, the machine our GPU benchmarks run on: 4.8 TB/s of HBM3e
bandwidth, 989 TFLOP/s dense bf16/fp16 tensor-core throughput, 67 TFLOP/s fp32 without tensor cores (what torch's
fp32 matmul uses with TF32 off, its default). KINDS.md's measured bf16 GEMM rate on the machine is ~790 TFLOP/s, so
80% of the datasheet peak is about as far as a GEMM goes there. `bench_kernels --hbm-tbps/--bf16-tflops` override them.
"""

from __future__ import annotations

HBM_BYTES_PER_S = 4.8e12
PEAK_FLOPS = {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}


def add_limits(rows: list[dict], hbm_bytes_per_s: float = HBM_BYTES_PER_S,
               peak_flops: dict[str, float] | None = None) -> None:
    """Set row["pct_of_limit"] and row["limit"] for rows with `bytes` or `flop` and a finite, positive `ms`."""
    peaks = dict(PEAK_FLOPS, **(peak_flops or {}))
    for row in rows:
        ms = row.get("ms")
        if not ms or ms != ms or ms <= 0:  # missing, NaN (a failed row) or zero
            continue
        seconds = ms * 1e-3
        if row.get("bytes"):
            row["pct_of_limit"] = 100.0 * row["bytes"] / seconds / hbm_bytes_per_s
            row["limit"] = "HBM"
        elif row.get("flop") and row.get("dtype") in peaks:
            row["pct_of_limit"] = 100.0 * row["flop"] / seconds / peaks[row["dtype"]]
            row["limit"] = f"{row['dtype']} peak"
