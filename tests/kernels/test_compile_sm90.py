"""Every Triton kernel of `sloth_kernels` compiles for the H200 (sm_90) with Triton's real compiler, on CPU.

Why: CI runs the kernels under Triton's CPU interpreter, which executes their Python and never runs Triton's code
generator, so a kernel can pass every interpreted test and still fail to compile on the GPU. Run 16
(docs/gpu-notes.md) lost its step benchmarks that way: a jit helper returned a 2-D tile from one constexpr branch and
a 1-D block from the other, which the interpreter ran and the compiler refused ("Inconsistent return types").

How: `tests/kernels/sm90_compile.py`, in a subprocess without TRITON_INTERPRET, launches every kernel the way the
ops do (a training step of the tiny patched NF4 and dense Llama, both NF4 matmul backends, and direct calls for the
Gemma/soft-capping/blocksize variants) with each launch replaced by an ahead-of-time `triton.compile` for sm_90
(front end, LLVM and the triton wheel's ptxas; no GPU needed). It must compile every launch and launch every
`@triton.jit` kernel of the package at least once, so a new kernel without coverage fails here too.
"""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("sm90_compile.py")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset; launches pass their own
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    assert "uncovered: " in lines, report  # nothing left uncovered
    assert any(line.startswith("kernels: _") for line in lines), report
    assert any(line.endswith(" compilations, 0 failed") for line in lines), report
