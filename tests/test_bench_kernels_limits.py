"""bench_kernels' "% of limit" column: each row's minimum bytes or FLOP over its time, against the H200's limits."""

import math

import pytest

from benchmarks.bench_kernels import print_table
from benchmarks.kernels.bench_lora_linear import RANK, _flop
from benchmarks.kernels.limits import HBM_BYTES_PER_S, PEAK_FLOPS, add_limits


def _row(**fields):
    return {"op": "op", "impl": "triton", "pass": "fwd", "dtype": "bfloat16", "peak_mem_mb": 1.0, **fields}


def test_memory_and_gemm_rows_get_their_share_of_the_limit():
    rows = [
        _row(ms=1.0, bytes=HBM_BYTES_PER_S * 1e-3),  # the whole bandwidth for 1 ms
        _row(ms=2.0, flop=PEAK_FLOPS["bfloat16"] * 1e-3),  # half the bf16 peak
        _row(ms=1.0, flop=PEAK_FLOPS["float32"] * 0.25e-3, dtype="float32"),  # a quarter of fp32's
        _row(ms=float("nan"), bytes=1e9),  # a failed measurement
        _row(ms=1.0),  # no work given
    ]
    add_limits(rows)
    assert rows[0]["pct_of_limit"] == pytest.approx(100.0) and rows[0]["limit"] == "HBM"
    assert rows[1]["pct_of_limit"] == pytest.approx(50.0) and rows[1]["limit"] == "bfloat16 peak"
    assert rows[2]["pct_of_limit"] == pytest.approx(25.0) and rows[2]["limit"] == "float32 peak"
    assert "pct_of_limit" not in rows[3] and "pct_of_limit" not in rows[4]


def test_limits_can_be_overridden():
    rows = [_row(ms=1.0, bytes=2e9), _row(ms=1.0, flop=4e11)]
    add_limits(rows, hbm_bytes_per_s=4e12, peak_flops={"bfloat16": 8e14})
    assert rows[0]["pct_of_limit"] == pytest.approx(50.0)
    assert rows[1]["pct_of_limit"] == pytest.approx(50.0)


def test_lora_flop_count():
    tokens, k, n = 4096, 4096, 14336
    base, lora = 2 * tokens * k * n, 2 * tokens * RANK * (k + n)
    assert _flop(tokens, [(k, n)], "fwd") == base + lora
    assert _flop(tokens, [(k, n), (k, n)], "fwd+bwd") == 2 * (2 * base + 3 * lora)


def test_table_shows_the_share(capsys):
    rows = [_row(ms=0.5, bytes=HBM_BYTES_PER_S * 0.3e-3, speedup=2.0, baseline="torch")]
    add_limits(rows)
    assert math.isclose(rows[0]["pct_of_limit"], 60.0)
    print_table(rows, {"torch": "x", "triton": "y", "gpu": "H200"})
    out = capsys.readouterr().out
    assert "% of limit" in out and "60% HBM" in out
