"""Compile every Triton kernel of `sloth_kernels` for sm_90, as the ops launch them, on a machine without a GPU.

Run as a script (`python tests/kernels/sm90_compile.py`; `tests/kernels/test_compile_sm90.py` does) in a process
without TRITON_INTERPRET: the interpreter replaces `@triton.jit` when a kernel is defined, so it cannot be switched
off later in a process. Every op is forced onto its Triton path with CPU tensors (`use_triton` patched to True in each
module), and `JITFunction.run`, where `kernel[grid](...)` ends, is replaced by a compile-only stand-in: it binds the
launch's arguments to the kernel's parameters, derives Triton's signature (tensor -> pointer to its dtype, int ->
i32 or i64, float -> fp32, constexpr parameters as given) and compiles it ahead of time with `triton.compile` for
`GPUTarget("cuda", 90, 32)` (front end, LLVM and the ptxas of the triton wheel) with the launch's options
(num_warps, enable_fp_fusion, ...), then returns without running anything: the ops' outputs hold garbage, which is
fine, nothing reads them but other launches.

What is launched: one training step (forward and backward, checkpointing on) of the tiny patched NF4 Llama and of
its dense fp32 twin (`tiny_llama`), with both NF4 matmul backends, plus direct calls for what a Llama does not use:
GeGLU (tanh and erf), Gemma's RMSNorm offset, cross-entropy over given logits with and without soft-capping,
fused linear cross-entropy with soft-capping, and NF4 dequantisation with blocksize 4096 (the flat path) and
without double quantisation.

Prints one line per distinct compilation (`ok` or `FAILED` with the error) and `kernels: NAME,...` (every kernel
compiled at least once), and `uncovered: NAME,...` for `@triton.jit` kernels of the package that were never
launched (helpers called from kernels excluded: they compile inside them). Exit status 1 if anything failed.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: it replaces @triton.jit"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

MODULES = ["cross_entropy", "lora_linear", "nf4", "rms_norm", "rope", "swiglu"]
TARGET = GPUTarget("cuda", 90, 32)
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8", torch.int8: "i8",
          torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}

done: dict[tuple, str | None] = {}  # (kernel, signature, constants, options) -> None if compiled, else the error
compiled_names: set[str] = set()


def _arg_type(value) -> str | None:
    """Triton's signature type of a runtime argument; None: pass it as a constant (None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type launch argument {value!r}")


def _compile_only(self: JITFunction, *args, grid, warmup=False, **kwargs):
    names = [p.name for p in self.params]
    bound = dict(zip(names, args))
    options = {}
    for key, value in kwargs.items():
        (bound if key in names else options)[key] = value
    signature, constants = {}, {}
    for param in self.params:
        if param.name not in bound:
            continue  # left at its default
        value = bound[param.name]
        kind = None if param.is_constexpr else _arg_type(value)
        if kind is None:
            signature[param.name], constants[param.name] = "constexpr", value
        else:
            signature[param.name] = kind
    key = (self.fn.__name__, tuple(signature.items()), tuple(sorted(constants.items())), tuple(sorted(options.items())))
    if key not in done:
        try:
            triton.compile(ASTSource(self, signature, constants), target=TARGET, options=options)
            done[key] = None
            compiled_names.add(self.fn.__name__)
            print(f"ok {self.fn.__name__} {constants}", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported, and the exit status says it
            done[key] = f"{type(exc).__name__}: {exc}"
            print(f"FAILED {self.fn.__name__} {constants} {options}\n{done[key][-2000:]}", flush=True)
    return None


def _force_triton():
    for name in MODULES:
        module = importlib.import_module(f"sloth_kernels.{name}")
        if hasattr(module, "use_triton"):
            module.use_triton = lambda *tensors: True


def _training_steps():
    import importlib.util
    import tempfile

    from sloth_kernels import lora_linear
    from sloth_kernels.patch import patch_model

    # By file, not through sys.path: the repo root on sys.path would shadow the `kernels` package bitsandbytes looks
    # for with this repo's kernels/ folder.
    spec = importlib.util.spec_from_file_location("tiny_llama", Path(__file__).with_name("tiny_llama.py"))
    tiny_llama = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_llama)

    with tempfile.TemporaryDirectory() as tmp:
        tiny_llama.save(tmp, layers=1)
        ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        for quantized, backend in ((True, "dequant"), (True, "fused"), (False, "dequant")):
            lora_linear.MATMUL_BACKEND = backend
            model = tiny_llama.load(tmp, "cpu", quantized=quantized)
            patch_model(model, force=True)
            model(input_ids=ids, labels=ids).loss.backward()
        lora_linear.MATMUL_BACKEND = "dequant"


def _direct_calls():
    from sloth_kernels.cross_entropy import cross_entropy, fused_linear_cross_entropy
    from sloth_kernels.nf4 import dequantize_nf4, dequantize_nf4_stacked
    from sloth_kernels.rms_norm import rms_norm
    from sloth_kernels.swiglu import geglu

    for dtype in (torch.bfloat16, torch.float32):
        gate = torch.randn(4, 256, dtype=dtype, requires_grad=True)
        up = torch.randn(4, 256, dtype=dtype, requires_grad=True)
        for approximate in ("tanh", "none"):
            geglu(gate, up, approximate).sum().backward()
        x = torch.randn(4, 256, dtype=dtype, requires_grad=True)
        rms_norm(x, torch.zeros(256, dtype=dtype), 1e-6, 1.0).sum().backward()
        logits = torch.randn(6, 128, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, 128, (6,))
        for softcap in (None, 30.0):
            cross_entropy(logits.clone(), labels, softcap=softcap).backward()
            hidden = torch.randn(6, 64, dtype=dtype, requires_grad=True)
            head = torch.randn(128, 64, dtype=dtype, requires_grad=True)
            fused_linear_cross_entropy(hidden, head, labels, softcap=softcap).backward()

    import bitsandbytes.functional as bnbf

    for blocksize in (64, 4096):
        for nested in (True, False):
            packed, state = bnbf.quantize_4bit(torch.randn(16, 4096), blocksize=blocksize,
                                               compress_statistics=nested, quant_type="nf4")
            for dtype in (torch.bfloat16, torch.float32):
                dequantize_nf4(packed, state, dtype=dtype)
                dequantize_nf4(packed, state, out=torch.empty(4096, 16, dtype=dtype).t())  # strided output
                for count in (2, 3):
                    dequantize_nf4_stacked([(packed, state)] * count, torch.empty(16 * count, 4096, dtype=dtype))


def main() -> int:
    JITFunction.run = _compile_only
    _force_triton()
    try:
        _training_steps()
        _direct_calls()
    except Exception:  # noqa: BLE001 - a crash outside a compilation is a failure too
        traceback.print_exc()
        return 1
    kernels = set()
    for name in MODULES:
        module = importlib.import_module(f"sloth_kernels.{name}")
        kernels |= {obj.fn.__name__ for obj in vars(module).values()
                    if isinstance(obj, JITFunction) and obj.fn.__name__.endswith("_kernel")}
    print("kernels: " + ",".join(sorted(compiled_names)))
    print("uncovered: " + ",".join(sorted(kernels - compiled_names)))
    failed = [key for key, error in done.items() if error is not None]
    print(f"{len(done)} compilations, {len(failed)} failed")
    return 1 if failed or kernels - compiled_names else 0


if __name__ == "__main__":
    sys.exit(main())
