"""Benchmark LoRA projections over NF4 weights: ours (both NF4 matmul backends) vs peft's Linear4bit over
bitsandbytes vs the torch reference (eager and torch.compile), at Llama-3.1-8B sizes.

GPU only. x is [2, 2048, in] bf16 (batch 2 x seq 2048), LoRA r=16, alpha=32, A/B fp32 parameters as peft keeps them;
base weights NF4 with double quantisation, bnb compute dtype bf16. Projections: 4096->4096 (q/o), 4096->14336
(gate/up), 14336->4096 (down). Impls:
- "triton-dequant": `lora_linear` with MATMUL_BACKEND="dequant" (Triton dequant to a temporary + cuBLAS)
- "triton-fused": `lora_linear` with MATMUL_BACKEND="fused" (NF4 decoded inside a Triton GEMM)
- "peft": `peft.tuners.lora.bnb.Linear4bit` forward (+ backward), the HF+PEFT QLoRA recipe
- "torch", "torch.compile": `lora_linear_reference`
Also one row per backend for the whole `lora_qkv` (q 4096->4096, k and v 4096->1024: one dequant launch, one
stacked GEMM) vs the three peft modules, and for the whole `lora_mlp` (gate/up/down, SwiGLU) vs peft modules + torch
SiLU.
`run()` returns rows {op, impl, pass, dtype, ms, peak_mem_mb, flop}: median of `triton.testing.do_bench`; peak CUDA
memory of one call above what was live before it. Importing this module needs no GPU.
"""

import torch

from benchmarks.kernels.timing import measure as _measure

import sloth_kernels.lora_linear as ll
from sloth_kernels.lora_linear import lora_linear, lora_linear_reference, lora_mlp, lora_qkv

BATCH, SEQ, RANK, ALPHA = 2, 2048, 16, 32
PROJECTIONS = {"q_proj": (4096, 4096), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
DTYPE = torch.bfloat16


def _peft_layers(names_shapes: dict[str, tuple[int, int]]):
    """A module holding NF4 Linear4bit layers, wrapped by peft exactly as for a 4-bit HF model."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Module()
    for name, (in_f, out_f) in names_shapes.items():
        w = torch.randn(out_f, in_f) * in_f**-0.5
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(w.to(DTYPE), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
        setattr(holder, name, layer)
    holder = holder.cuda()
    holder.is_loaded_in_4bit = True  # what peft reads to pick its bnb Linear4bit wrapper
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(names_shapes), lora_dropout=0.0,
                        init_lora_weights=False)
    model = get_peft_model(holder, config)
    return {name: getattr(model.base_model.model, name) for name in names_shapes}


def _with_backend(backend, fn):
    """fn run with ll.MATMUL_BACKEND = backend (None: leave it); covers the backward too when fn runs it."""
    if backend is None:
        return fn

    def run():
        saved = ll.MATMUL_BACKEND
        ll.MATMUL_BACKEND = backend
        try:
            return fn()
        finally:
            ll.MATMUL_BACKEND = saved
    return run


def _flop(tokens: int, shapes, pass_name: str) -> int:
    """GEMM FLOP of LoRA projections [(in, out), ...] over `tokens` rows, rank RANK: forward y = x W^T + (x A^T) B^T;
    the backward adds dX through the frozen W and the LoRA products, and the A and B grads."""
    base = sum(2 * tokens * k * n for k, n in shapes)
    lora = sum(2 * tokens * RANK * (k + n) for k, n in shapes)
    return base + lora if pass_name == "fwd" else 2 * base + 3 * lora


def _bench(rows, op, impls, x, params, shapes):
    """impls: name -> (forward, backend or None); shapes: the projections' (in, out), for the FLOP count."""
    d_out = None
    for impl, (forward, backend) in impls.items():
        try:
            with torch.no_grad():
                d_out = torch.randn_like(forward()) if d_out is None else d_out
            passes = {
                "fwd": _with_backend(backend, forward),
                "fwd+bwd": _with_backend(backend, lambda forward=forward: forward().backward(d_out)),
            }
            for pass_name, fn in passes.items():
                ms, peak_mb = _measure(fn, [x, *params])
                rows.append({"op": op, "impl": impl, "pass": pass_name, "dtype": str(DTYPE).removeprefix("torch."),
                             "ms": ms, "peak_mem_mb": peak_mb, "flop": _flop(BATCH * SEQ, shapes, pass_name)})
        except Exception as exc:  # a compile failure or OOM must not hide the other rows
            print(f"bench_lora_linear: {op} {impl} failed: {exc!r}")
            torch.cuda.empty_cache()


def run() -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench_lora_linear needs a CUDA GPU")
    torch.manual_seed(0)
    compiled_ref = torch.compile(lora_linear_reference)
    rows: list[dict] = []
    for name, module in _peft_layers(PROJECTIONS).items():
        in_f, out_f = PROJECTIONS[name]
        parts = ll.lora_parts(module)
        weight, qs, A, B, scaling, bias = parts
        x = torch.randn(BATCH, SEQ, in_f, device="cuda", dtype=DTYPE, requires_grad=True)
        impls = {
            "triton-dequant": (lambda: lora_linear(x, *parts), "dequant"),
            "triton-fused": (lambda: lora_linear(x, *parts), "fused"),
            "peft": (lambda module=module: module(x), None),
            "torch": (lambda: lora_linear_reference(x, *parts), None),
            "torch.compile": (lambda: compiled_ref(x, *parts), None),
        }
        _bench(rows, f"lora_linear[{in_f}->{out_f}]", impls, x, [A, B], [(in_f, out_f)])
        del x

    qkv = _peft_layers({"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024)})
    params = [p for m in qkv.values() for p in m.parameters() if p.requires_grad]
    x = torch.randn(BATCH, SEQ, 4096, device="cuda", dtype=DTYPE, requires_grad=True)

    def joined(outs):  # one tensor to call backward on; the same copy for both impls
        return torch.cat([o.flatten() for o in outs])

    impls = {
        "triton-dequant": (lambda: joined(lora_qkv(x, *qkv.values())), "dequant"),
        "peft": (lambda: joined([m(x) for m in qkv.values()]), None),
    }
    _bench(rows, "lora_qkv[4096->4096+1024+1024]", impls, x, params, [(4096, 4096), (4096, 1024), (4096, 1024)])
    del x

    mlp = _peft_layers({"gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)})
    params = [p for m in mlp.values() for p in m.parameters() if p.requires_grad]
    x = torch.randn(BATCH, SEQ, 4096, device="cuda", dtype=DTYPE, requires_grad=True)

    def peft_mlp():
        return mlp["down_proj"](torch.nn.functional.silu(mlp["gate_proj"](x)) * mlp["up_proj"](x))

    impls = {
        "triton-dequant": (lambda: lora_mlp(x, *mlp.values()), "dequant"),
        "triton-fused": (lambda: lora_mlp(x, *mlp.values()), "fused"),
        "peft": (peft_mlp, None),
    }
    _bench(rows, "lora_mlp[4096-14336-4096]", impls, x, params, [(4096, 14336), (4096, 14336), (14336, 4096)])
    return rows
