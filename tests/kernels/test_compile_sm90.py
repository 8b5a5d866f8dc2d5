"""The NF4 dequantisation kernels compile for the H200 (sm_90) with Triton's real compiler, on a CPU-only machine.

Why: CI runs the kernels under Triton's CPU interpreter, which executes their Python and never runs Triton's code
generator, so a kernel can pass every interpreted test and still fail to compile on the GPU. Run 16
(docs/gpu-notes.md) lost its step benchmarks that way: a jit helper returned a 2-D tile from one constexpr branch and
a 1-D block from the other, which the interpreter ran and the compiler refused ("Inconsistent return types").

How: a subprocess without TRITON_INTERPRET (the interpreter replaces `@triton.jit` at definition time, so it cannot
be switched off in this process) imports `sloth_kernels.nf4` and compiles `_dequant_nf4_kernel` and
`_dequant_nf4_stacked_kernel` ahead of time for `GPUTarget("cuda", 90, 32)` through `triton.compile` (front end,
LLVM, and the ptxas the triton wheel ships; no GPU or driver needed), with the launchers' options (4 warps, no FMA
contraction) over the constexpr combinations they use: blocksize 64 (the default; the tiled path) and 4096 (more
than one program's bytes: the flat path), with and without double quantisation, bf16 and fp32 outputs.
"""

import os
import subprocess
import sys

_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sloth_kernels import nf4

options = {"num_warps": 4, "enable_fp_fusion": False}
target = GPUTarget("cuda", 90, 32)
block = nf4._bytes_per_program(False)


def compile_all(blocksize, nested, out_ty):
    absmax_ty = "*u8" if nested else "*fp32"
    common = {"BLOCKSIZE": blocksize, "BLOCKSIZE2": 256, "NESTED": nested, "RNE_BF16": False, "BLOCK": block}

    single = {"packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": absmax_ty, "code2_ptr": "*fp32",
              "absmax2_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": out_ty, "numel": "i64", "n_cols": "i32",
              "stride_on": "i32", "stride_ok": "i32"}
    for contiguous in (True, False):
        consts = dict(common, CONTIGUOUS=contiguous)
        sig = dict(single, **{name: "constexpr" for name in consts})
        compiled = triton.compile(ASTSource(nf4._dequant_nf4_kernel, sig, consts), target=target, options=options)
        assert compiled.asm["cubin"], "no cubin"

    stacked = {"code_ptr": "*fp32"}
    for j in range(3):
        stacked.update({f"p{j}": "*u8", f"a{j}": absmax_ty, f"c{j}": "*fp32", f"s{j}": "*fp32", f"o{j}": "*fp32",
                        f"out{j}": out_ty, f"n{j}": "i64"})
        if j < 2:
            stacked[f"end{j}"] = "i64"
    for three in (True, False):
        consts = dict(common, THREE=three)
        sig = dict(stacked, **{name: "constexpr" for name in consts})
        compiled = triton.compile(ASTSource(nf4._dequant_nf4_stacked_kernel, sig, consts), target=target,
                                  options=options)
        assert compiled.asm["cubin"], "no cubin"


for blocksize in (64, 4096):
    for nested in (True, False):
        for out_ty in ("*bf16", "*fp32"):
            compile_all(blocksize, nested, out_ty)
            print("compiled", blocksize, nested, out_ty, flush=True)
"""


def test_nf4_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 8, proc.stdout  # 2 blocksizes x 2 quantisations x 2 output dtypes
