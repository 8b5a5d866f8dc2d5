"""Run every per-kernel benchmark (`benchmarks/kernels/bench_*.py`), print one table, write JSON. GPU only.

    python -m benchmarks.bench_kernels [--only rms_norm,rope] [--out benchmarks/results/kernels.json]

Each module's `run()` returns rows {op, impl, pass, dtype, ms, peak_mem_mb, ...}. The table adds, per row, the
speed-up over the plain PyTorch reference of the same (op, pass, dtype) (`torch` impl; for LoRA also `peft`), and
the share of the physical limit the row reaches (`% of limit`: HBM bandwidth for memory-bound ops, whose rows carry
the pass's minimum `bytes`; peak tensor-core FLOP/s of the dtype for GEMM-bound ones, whose rows carry `flop`; the
H200's datasheet figures by default, see `benchmarks/kernels/limits.py`; `--hbm-tbps`, `--bf16-tflops` override). A
module that fails is reported and skipped, so one broken benchmark does not hide the others. The JSON holds the
rows plus the GPU, library versions and the command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels.limits import HBM_BYTES_PER_S, PEAK_FLOPS, add_limits  # noqa: E402

BASELINE_IMPLS = ("torch", "peft")


def discover() -> list[str]:
    import benchmarks.kernels as pkg

    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules(pkg.__path__)
                  if m.name.startswith("bench_"))


def environment() -> dict:
    import torch
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
           "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - optional in the table only
            env[name] = None
    return env


def add_speedups(rows: list[dict]) -> None:
    """row["speedup"] = baseline ms / row ms, the baseline being the first of BASELINE_IMPLS present for its key."""
    for row in rows:
        key = (row["op"], row["pass"], row["dtype"])
        for impl in BASELINE_IMPLS:
            base = next((r for r in rows if (r["op"], r["pass"], r["dtype"]) == key and r["impl"] == impl), None)
            if base is not None:
                row["speedup"] = base["ms"] / row["ms"] if row["ms"] else None
                row["baseline"] = impl
                break


def print_table(rows: list[dict], env: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sloth_kernels on {env.get('gpu', 'no GPU')} (torch {env['torch']}, triton {env['triton']})")
    for col in ("op", "pass", "dtype", "impl", "ms", "peak MB", "vs baseline", "% of limit"):
        table.add_column(col, justify="right" if col in ("ms", "peak MB", "vs baseline", "% of limit") else "left")
    for r in rows:
        speed = f"{r['speedup']:.2f}x {r['baseline']}" if r.get("speedup") else ""
        limit = f"{r['pct_of_limit']:.0f}% {r['limit']}" if "pct_of_limit" in r else ""
        table.add_row(r["op"], r["pass"], r["dtype"], r["impl"], f"{r['ms']:.3f}", f"{r['peak_mem_mb']:.0f}", speed,
                      limit)
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated kernel names (default: all): " + ",".join(discover()))
    parser.add_argument("--out", type=Path, help="write the rows and environment as JSON here")
    parser.add_argument("--hbm-tbps", type=float, default=HBM_BYTES_PER_S / 1e12,
                        help="HBM bandwidth limit, TB/s (default: the H200's datasheet figure)")
    parser.add_argument("--bf16-tflops", type=float, default=PEAK_FLOPS["bfloat16"] / 1e12,
                        help="dense bf16/fp16 tensor-core peak, TFLOP/s (default: the H200's datasheet figure)")
    args = parser.parse_args(argv)
    limits = {"hbm_bytes_per_s": args.hbm_tbps * 1e12,
              "peak_flops": {"bfloat16": args.bf16_tflops * 1e12, "float16": args.bf16_tflops * 1e12}}

    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [n for n in args.only.split(",") if n] or discover()
    rows, failures = [], {}
    for name in names:
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.kernels.bench_{name}")
            got = module.run()
        except Exception:  # noqa: BLE001 - report and go on with the other kernels
            failures[name] = traceback.format_exc()
            print(f"bench_kernels: {name} failed:\n{failures[name]}", file=sys.stderr)
            continue
        finally:
            torch.cuda.empty_cache()
        for row in got:
            row.setdefault("bench", name)
        rows.extend(got)
        print(f"bench_kernels: {name}: {len(got)} rows in {time.perf_counter() - t0:.0f}s", flush=True)
        write(args.out, rows, failures, limits)  # after every kernel: a run cut short keeps what it measured
    add_speedups(rows)
    add_limits(rows, **limits)
    print_table(rows, environment())
    write(args.out, rows, failures, limits)
    return 1 if failures else 0


def write(path: Path | None, rows: list[dict], failures: dict, limits: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    add_speedups(rows)
    add_limits(rows, **limits)
    path.write_text(json.dumps({"environment": environment(), "limits": limits, "rows": rows, "failures": failures},
                               indent=1))


if __name__ == "__main__":
    sys.exit(main())
