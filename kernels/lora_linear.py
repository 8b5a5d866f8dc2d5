"""LoRA-aware projections over frozen NF4 (or dense) weights, with hand-written backward passes.

Contract
--------
`lora_linear(x, base_weight, quant_state_or_None, lora_A, lora_B, scaling, bias=None, *, compute_dtype=None)`
computes

    y = x @ W^T + scaling * (x @ A^T) @ B^T (+ bias)          x [..., K], W [N, K], A [r, K], B [N, r]

where W is frozen: an NF4 `Params4bit` with its `QuantState` (dequantised on the fly, see `MATMUL_BACKEND`) or a
dense tensor (quant_state None). Gradients flow to x, A, B (and bias if it requires grad); W must not require grad.
Only x (in the compute dtype) and the small x @ A^T are saved; W is dequantised again in backward and never kept.

Fused groups (one autograd Function each, x saved once), on peft LoRA layers (`lora_parts` extracts what they hold):
- `lora_qkv(x, q_proj, k_proj, v_proj) -> (q, k, v)`
- `lora_o(x, o_proj) -> y`
- `lora_mlp(x, gate_proj, up_proj, down_proj, activation="silu" | "gelu_tanh") -> down(act(gate(x)) * up(x))`;
  backward recomputes gate/up outputs from the saved x (switch: `MLP_RECOMPUTE`). The gated activation is
  `sloth_kernels.swiglu` forward; its backward runs in place here (same activation math) to avoid two more
  [M, intermediate] buffers. `compute_output=False` builds the same autograd node (same saved tensors, same
  gradients) but skips the down projection's GEMM and returns zeros: for a checkpoint re-run
  whose output value nothing reads (see `sloth_kernels.checkpoint.recomputing`). Inside a checkpointed layer its
  backward overwrites the saved gate/up outputs instead of cloning them (`sloth_kernels.checkpoint.checkpointed`).
- All three take `cache_epoch=None | int`: with an int, each group's LoRA operands in the compute dtype (A stacked,
  B^T block-diagonal with the scaling folded in; one Triton launch per group, `_lora_operands_kernel`) are made
  once and reused by every call with the same epoch; the caller promises the
  weights do not change within an epoch (`patch_model` draws a new epoch at every forward of the model). The results
  on peft modules' `lora_parts` are cached on the module until its LoRA state or tensors change.
Outputs of a group may be non-contiguous column views of one [M, N_q + N_k + N_v] buffer (their last dimension is
dense, so `.view(..., heads, head_dim)` works).

Dtypes: the compute dtype is the autocast dtype when autocast is on; else `compute_dtype` (for the module functions:
the bnb Linear4bit's `compute_dtype`, i.e. bnb_4bit_compute_dtype); else x.dtype. x is cast to it, the base weight is
dequantised directly to it, A and B are cast to it; outputs are in the compute dtype (bnb would cast its output back
to x.dtype, e.g. fp32 after peft's prepare_model_for_kbit_training upcasts norms; we keep the cheaper compute
dtype); grads are returned in each input's own dtype. peft computes the LoRA branch in the adapter's dtype (often
fp32) instead, so in bf16 the results agree to bf16 rounding, not bit for bit. (A stacked group's LoRA
up-projection multiplies by s_i * B_i rounded once to the compute dtype: exact for power-of-two scalings.)

`MATMUL_BACKEND` (module switch, env `SLOTH_NF4_MATMUL`) picks how NF4 weights meet the matmul:
- "dequant": one Triton launch dequantises W into a temporary in the compute dtype, cuBLAS does the GEMM, the
  temporary is freed at once (it lives for one GEMM; a q/k/v or gate/up group is dequantised into one stacked buffer
  so the group runs as one GEMM).
- "fused": a Triton GEMM that loads packed NF4 tiles, decodes them in registers (16-entry table, per-block absmax) and
  feeds tl.dot, so no dequantised weight ever exists in memory.

Dispatch: the Triton paths run when `use_triton(x)` (CUDA, or TRITON_INTERPRET=1); otherwise the
`*_reference` functions (plain differentiable torch) run.
"""

import os
import threading

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from sloth_kernels._dispatch import use_triton
from sloth_kernels.checkpoint import checkpointed
from sloth_kernels.nf4 import (
    check_quant_state,
    dequantize_nf4,
    dequantize_nf4_reference,
    dequantize_nf4_stacked,
    interpreting,
    nf4_code,
    packed_bytes,
    resolve_absmax,
    round_bf16_rne,
)
from sloth_kernels.swiglu import _GELU_TANH as GLU_GELU_TANH
from sloth_kernels.swiglu import _SILU as GLU_SILU
from sloth_kernels.swiglu import _activation as glu_activation
from sloth_kernels.swiglu import geglu, swiglu

# GPU notes: "dequant" (Triton dequant + cuBLAS) is the default because at training sizes (M = 4096 tokens) cuBLAS on
# H200 runs the GEMM near peak and the dequant pass is ~5-10% on top; "fused" saves that pass and all weight
# temporaries but its in-loop decoding competes with tl.dot. The benchmark times both.
MATMUL_BACKEND = os.environ.get("SLOTH_NF4_MATMUL", "dequant")
# Recompute gate/up in lora_mlp's backward (saves 2 x [M, intermediate] per layer). Under gradient checkpointing the
# layer forward is recomputed anyway and the saved tensors live for one layer only, so False is faster there.
MLP_RECOMPUTE = os.environ.get("SLOTH_MLP_RECOMPUTE", "1") != "0"

ACTIVATIONS = ("silu", "gelu_tanh")


class LoraNotApplicable(ValueError):
    """A module or input this module's fast path does not handle; callers fall back to the module's own forward."""


# ----------------------------------------------------------------------------------------------------------------
# Extracting a peft LoRA layer
# ----------------------------------------------------------------------------------------------------------------
def lora_parts(module):
    """(base_weight, quant_state, A, B, scaling, bias) of a peft LoRA Linear / Linear4bit's active adapter.

    Raises LoraNotApplicable when the module is not plain LoRA over nn.Linear or bnb NF4 Linear4bit with exactly one
    active adapter: merged or disabled adapters, DoRA or other LoRA variants, LoRA bias, dropout > 0 while training,
    fan_in_fan_out, a trainable base weight, FP4 or CPU-repacked bnb weights. Cheap: call it on every forward, since
    train/eval mode changes what qualifies.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:  # pragma: no cover - peft is a hard dependency
        raise LoraNotApplicable("peft is not installed") from exc
    name = type(module).__name__
    if not isinstance(module, LoraLayer):
        raise LoraNotApplicable(f"{name} is not a peft LoRA layer")
    if getattr(module, "merged", False):
        raise LoraNotApplicable(f"{name}: adapter weights are merged into the base weight")
    if getattr(module, "disable_adapters", False):
        raise LoraNotApplicable(f"{name}: adapters are disabled")
    active = list(module.active_adapters)
    if len(active) != 1:
        raise LoraNotApplicable(f"{name}: needs exactly one active adapter, has {active}")
    adapter = active[0]
    if adapter not in module.lora_A:
        raise LoraNotApplicable(f"{name}: active adapter {adapter!r} has no LoRA weights here")
    if getattr(module, "use_dora", {}).get(adapter, False) or adapter in getattr(module, "lora_variant", {}):
        raise LoraNotApplicable(f"{name}: DoRA / LoRA variants are not supported")
    if getattr(module, "lora_bias", {}).get(adapter, False) or module.lora_B[adapter].bias is not None:
        raise LoraNotApplicable(f"{name}: lora_bias is not supported")
    if getattr(module, "fan_in_fan_out", False):
        raise LoraNotApplicable(f"{name}: fan_in_fan_out weights are not supported")
    dropout = module.lora_dropout[adapter]
    if not isinstance(dropout, torch.nn.Identity):
        if not isinstance(dropout, torch.nn.Dropout):
            raise LoraNotApplicable(f"{name}: unknown dropout module {type(dropout).__name__}")
        if dropout.p > 0 and dropout.training:
            raise LoraNotApplicable(f"{name}: lora_dropout={dropout.p} while training")
    lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
    if not (isinstance(lora_A, torch.nn.Linear) and isinstance(lora_B, torch.nn.Linear)):
        raise LoraNotApplicable(f"{name}: LoRA A/B are not nn.Linear")

    base = module.get_base_layer()
    quant_state = None
    try:
        import bitsandbytes as bnb

        linear4bit = bnb.nn.Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a hard dependency
        linear4bit = ()
    if linear4bit and isinstance(base, linear4bit):
        quant_state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        try:
            check_quant_state(quant_state)
        except ValueError as exc:
            raise LoraNotApplicable(f"{name}: {exc}") from exc
    elif type(base) is not torch.nn.Linear:
        raise LoraNotApplicable(f"{name}: base layer {type(base).__name__} is neither nn.Linear nor bnb Linear4bit")
    if base.weight.requires_grad:
        raise LoraNotApplicable(f"{name}: base weight requires grad (only frozen base weights are supported)")
    return base.weight, quant_state, lora_A.weight, lora_B.weight, float(module.scaling[adapter]), base.bias


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain differentiable torch)
# ----------------------------------------------------------------------------------------------------------------
def _compute_dtype(x: torch.Tensor, preferred: torch.dtype | None = None) -> torch.dtype:
    """The autocast dtype when autocast is on, else `preferred` (bnb's compute_dtype), else x.dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return preferred or x.dtype


def module_compute_dtype(module) -> torch.dtype | None:
    """bitsandbytes Linear4bit's compute_dtype (bnb_4bit_compute_dtype) of a peft LoRA layer, if it has one."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(base, "compute_dtype", None)


def _base_weight_reference(base_weight, quant_state, dtype):
    if quant_state is None:
        return base_weight.to(dtype)
    return dequantize_nf4_reference(base_weight, quant_state, dtype=dtype)


def lora_linear_reference(x, base_weight, quant_state, lora_A, lora_B, scaling, bias=None, *, compute_dtype=None):
    """y = x @ W^T + scaling * (x @ A^T) @ B^T (+ bias), in the compute dtype, differentiable in x, A, B, bias."""
    cd = _compute_dtype(x, compute_dtype)
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(cd)
        w = _base_weight_reference(base_weight, quant_state, cd).detach()
        y = torch.nn.functional.linear(xc, w, None if bias is None else bias.to(cd))
        return y + scaling * torch.nn.functional.linear(
            torch.nn.functional.linear(xc, lora_A.to(cd)), lora_B.to(cd)
        )


def _act_reference(g, activation):
    if activation == "silu":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh")


def lora_mlp_reference(x, gate_proj, up_proj, down_proj, activation="silu", *, compute_dtype=None):
    """down(act(gate(x)) * up(x)) with every projection as `lora_linear_reference` (gated activation in fp32).

    compute_dtype None means the modules' own (bnb compute_dtype or x.dtype), as `lora_mlp` does.
    """
    _check_activation(activation)
    cd = compute_dtype or module_compute_dtype(gate_proj)
    g = lora_linear_reference(x, *lora_parts(gate_proj), compute_dtype=cd)
    u = lora_linear_reference(x, *lora_parts(up_proj), compute_dtype=cd)
    h = (_act_reference(g.float(), activation) * u.float()).to(g.dtype)
    return lora_linear_reference(h, *lora_parts(down_proj), compute_dtype=cd)


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise LoraNotApplicable(f"activation {activation!r} not supported (one of {ACTIVATIONS})")


# ----------------------------------------------------------------------------------------------------------------
# Triton: GEMM with NF4 tiles decoded in registers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _nf4_matmul_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, c_ptr, la_ptr, lb_ptr, bias_ptr,
    M, P, R, W_COLS,
    stride_am, stride_ar, stride_cm, stride_cp, stride_lam, stride_lar, stride_lbr, stride_lbp,
    lora_rank, lora_scale,
    TRANS_W: tl.constexpr, BLOCKSIZE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, LORA_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, P] (+)= A[M, R] @ op(W) [+ lora_scale * LA[M, r] @ LB[r, P]] [+ bias[P]].

    W is the NF4 weight [N, W_COLS] (flat row-major in the packed bytes): op(W) = W^T (TRANS_W, forward: P = N,
    R = W_COLS) or W (backward: P = W_COLS, R = N). absmax_ptr holds fp32 per-block scales (double quant undone).
    """
    # Grouped program order so neighbouring programs share A rows and W tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_p = tl.cdiv(P, BLOCK_P)
    in_group = GROUP_M * num_p
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_p = (pid % in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_mask = offs_m < M
    p_mask = offs_p < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        # Flat index into W of each element of the [BLOCK_R, BLOCK_P] operand tile.
        if TRANS_W:
            flat = offs_p[None, :] * W_COLS + offs_r[:, None]
        else:
            flat = offs_r[:, None] * W_COLS + offs_p[None, :]
        w_mask = r_mask[:, None] & p_mask[None, :]
        byte = tl.load(packed_ptr + (flat >> 1), mask=w_mask, other=0).to(tl.int32)
        nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
        w = tl.load(code_ptr + nibble) * tl.load(absmax_ptr + flat // BLOCKSIZE, mask=w_mask, other=0.0)
        if DOT_FP32:
            # fp32 inputs, or the CPU interpreter (whose bf16 dot is wrong): round w as the GPU would, dot in fp32.
            if RNE_BF16:
                w = round_bf16_rne(w)
            else:
                w = w.to(a.dtype).to(tl.float32)
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    if HAS_LORA:
        offs_l = tl.arange(0, LORA_R)
        l_mask = offs_l < lora_rank
        la = tl.load(la_ptr + offs_m[:, None] * stride_lam + offs_l[None, :] * stride_lar,
                     mask=m_mask[:, None] & l_mask[None, :], other=0.0)
        lb = tl.load(lb_ptr + offs_l[:, None] * stride_lbr + offs_p[None, :] * stride_lbp,
                     mask=l_mask[:, None] & p_mask[None, :], other=0.0)
        if DOT_FP32:
            acc += lora_scale * tl.dot(la.to(tl.float32), lb.to(tl.float32), input_precision="ieee")
        else:
            acc += lora_scale * tl.dot(la, lb)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_p[None, :] * stride_cp
    c_mask = m_mask[:, None] & p_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    if RNE_BF16:
        acc = round_bf16_rne(acc)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _fused_nf4_mm(a, proj, trans, lora=None, bias=None, out=None):
    """out (+)= a @ op(W) [+ s * la @ lb] [+ bias] through `_nf4_matmul_kernel`."""
    m, r_dim = a.shape
    p_dim = proj.out_features if trans else proj.in_features
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, p_dim, dtype=a.dtype, device=a.device)
    absmax = resolve_absmax(proj.quant_state)
    if lora is not None:
        la, lb, scale = lora
        rank = la.shape[1]
    else:
        la = lb = a
        scale, rank = 0.0, 1
    if interpreting():
        bm, bp, br, warps, stages = 16, 32, 32, 4, 1
    else:
        # GPU notes: 128x128x64 tiles, 8 warps; decoding a 64x128 NF4 tile per step is ALU work next to the MMA, so
        # deeper pipelining buys little. Tune here if the benchmark says so.
        bm, bp, br, warps, stages = 128, 128, 64, 8, 3
    grid = (triton.cdiv(m, bm) * triton.cdiv(p_dim, bp),)
    _nf4_matmul_kernel[grid](
        a, proj.weight, absmax, nf4_code(a.device), out, la, lb, bias if bias is not None else a,
        m, p_dim, r_dim, proj.in_features,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1), la.stride(0), la.stride(1), lb.stride(0), lb.stride(1),
        rank, float(scale),
        TRANS_W=trans, BLOCKSIZE=int(proj.quant_state.blocksize), HAS_LORA=lora is not None,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        DOT_FP32=interpreting() or a.dtype == torch.float32, RNE_BF16=interpreting() and a.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, LORA_R=max(16, triton.next_power_of_2(rank)), GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton: gated activation, forward and in-place backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gated_act_bwd_inplace_kernel(g_ptr, u_ptr, dh_ptr, n_cols, stride_g, stride_u, stride_dh,
                                  ACT: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """In place: g <- dh * u * act'(g), u <- dh * act(g), dh <- act(g) * u (h, needed for down's dA)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    act, dact = glu_activation(g, ACT)  # sloth_kernels.swiglu's activation math, shared
    dg = dh * u * dact
    du = dh * act
    h = act * u
    if RNE_BF16:
        dg = round_bf16_rne(dg)
        du = round_bf16_rne(du)
        h = round_bf16_rne(h)
    tl.store(g_ptr + row * stride_g + cols, dg.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + row * stride_u + cols, du.to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * stride_dh + cols, h.to(dh_ptr.dtype.element_ty), mask=mask)


def _gated_act(g, u, activation):
    """h = act(g) * u through sloth_kernels.swiglu (a new contiguous tensor)."""
    return swiglu(g, u) if activation == "silu" else geglu(g, u, approximate="tanh")


def _gated_act_backward_(g, u, dh, activation):
    """Overwrites g, u, dh with dg, du, h: no [M, intermediate] buffer beyond the three that already exist.

    (sloth_kernels.swiglu's own backward allocates dg and du and does not return h; here g and u may be the two halves
    of one stacked buffer that then holds dg | du for a single dX GEMM.)
    """
    m, n = g.shape
    if g.stride(1) != 1 or u.stride(1) != 1 or dh.stride(1) != 1:
        raise ValueError("gated activation backward needs unit column stride")
    interp = interpreting()
    block = min(triton.next_power_of_2(n), 128 if interp else 1024)
    _gated_act_bwd_inplace_kernel[(m, triton.cdiv(n, block))](
        g, u, dh, n, g.stride(0), u.stride(0), dh.stride(0),
        ACT=GLU_SILU if activation == "silu" else GLU_GELU_TANH,
        RNE_BF16=interp and g.dtype == torch.bfloat16, BLOCK=block, num_warps=4,
    )
    return dh


# ----------------------------------------------------------------------------------------------------------------
# Host-side caches
# ----------------------------------------------------------------------------------------------------------------
# GPU notes: a QLoRA step of an 8B model makes ~1000 calls into this module. Measured on the H200 host at seq 16
# (where the GPU has nothing to do), our step cost ~0.4 s of host time against the ~0.32 s the GPU needed at seq
# 2048, so the host set the pace: every cast, check and launch per call counts.
#
# Compute-dtype copies of the LoRA weights (peft keeps them fp32) are cached per *cache epoch*: an int the caller
# hands in (`cache_epoch=`) and promises to change whenever the weights may have changed. patch_model draws a new one
# at every forward of the model, so a training step casts each weight once, in its forward, and the checkpoint
# re-run and the backward reuse it. (Version counters cannot do this: fused AdamW and `.data` writes do not bump
# them.) Without an epoch nothing is cached. The epoch of the running autograd Function is thread-local, since the
# backward runs on autograd's device threads.
_epoch = threading.local()
_operands = WeakIdKeyDictionary()  # first A -> (stamp, the other As and the Bs, (stacked A, block-diagonal s B^T))


class _CacheEpoch:
    """Sets the cast cache's epoch for the body of an autograd Function's forward or backward."""

    __slots__ = ("value", "saved")

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        self.saved = getattr(_epoch, "value", None)
        _epoch.value = self.value

    def __exit__(self, *exc):
        _epoch.value = self.saved


def _epoch_cached(store, ts, key, build):
    """build(), or what it returned for the same tensors ts and key within the current cache epoch."""
    epoch = getattr(_epoch, "value", None)
    if epoch is None:
        return build()
    stamp = (epoch, tuple(t._version for t in ts), tuple(t.data_ptr() for t in ts), key)
    hit = store.get(ts[0])
    if hit is not None and hit[0] == stamp and all(a is b for a, b in zip(hit[1], ts[1:])):
        return hit[2]
    value = build()
    store[ts[0]] = (stamp, tuple(ts[1:]), value)
    return value


@triton.jit
def _lora_operands_kernel(
    a0, a1, a2, b0, b1, b2, a_out, bt_out,
    K, R0, R1, N0, N1, N_TOTAL, r0, r1, r2, s0, s1, s2,
    RNE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row `row` of both outputs of a group of up to three projections (unused ones have rank 0):
    a_out[row, :K] = A_i[j, :] and bt_out[row, :N_TOTAL] = s_i * B_i[:, j] in projection i's column block, zeros
    elsewhere; projection i owns output rows [R_i-1, R_i) (R0, R1 the running rank sums), j is the row within it.
    A_i are [r_i, K] and B_i [N_i, r_i], contiguous."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows = row + tl.zeros([BLOCK], dtype=tl.int32)  # the row as a vector: masks stay block-shaped
    in0 = rows < R0
    in1 = (rows >= R0) & (rows < R1)
    in2 = rows >= R1
    j0, j1, j2 = row, row - R0, row - R1
    a_mask = cols < K
    a = tl.load(a0 + j0 * K + cols, mask=a_mask & in0, other=0.0).to(tl.float32)
    a += tl.load(a1 + j1 * K + cols, mask=a_mask & in1, other=0.0).to(tl.float32)
    a += tl.load(a2 + j2 * K + cols, mask=a_mask & in2, other=0.0).to(tl.float32)
    # column c of bt_out lies in projection 0's block (c < N0), 1's (N0 <= c < N1) or 2's (N1 <= c)
    b_mask = cols < N_TOTAL
    c0 = b_mask & in0 & (cols < N0)
    c1 = b_mask & in1 & (cols >= N0) & (cols < N1)
    c2 = b_mask & in2 & (cols >= N1)
    bt = tl.load(b0 + cols * r0 + j0, mask=c0, other=0.0).to(tl.float32) * s0
    bt += tl.load(b1 + (cols - N0) * r1 + j1, mask=c1, other=0.0).to(tl.float32) * s1
    bt += tl.load(b2 + (cols - N1) * r2 + j2, mask=c2, other=0.0).to(tl.float32) * s2
    if RNE_BF16:
        a = round_bf16_rne(a)
        bt = round_bf16_rne(bt)
    tl.store(a_out + row * K + cols, a.to(a_out.dtype.element_ty), mask=a_mask)
    tl.store(bt_out + row * N_TOTAL + cols, bt.to(bt_out.dtype.element_ty), mask=b_mask)


def _lora_operands_torch(As, Bs, scalings, dtype):
    a = torch.cat([A.detach().to(dtype) for A in As], dim=0) if len(As) > 1 else As[0].detach().to(dtype)
    rows, cols = sum(B.shape[1] for B in Bs), sum(B.shape[0] for B in Bs)
    bt = torch.zeros(rows, cols, dtype=dtype, device=Bs[0].device)
    r = c = 0
    for B, scale in zip(Bs, scalings):
        n, k = B.shape
        bt[r : r + k, c : c + n] = B.detach().t() * scale
        r, c = r + k, c + n
    return a, bt


def _lora_operands(As, Bs, scalings, dtype: torch.dtype):
    """(stacked A [sum r, K], block-diagonal B^T [sum r, sum N] whose block i is s_i * B_i^T), both in `dtype`
    (read-only), reused within one cache epoch: a group's LoRA down- and up-projections as one GEMM operand each
    (the zero blocks cost a few tiny extra flops; one launch instead of one per projection). Built by one Triton
    launch for groups of up to three projections with contiguous weights of one dtype (the fp32 weights peft keeps):
    the cast, the stacking, the scaling and the zero fill that took 2-11 launches per group.

    The scaling is folded into B, rounded once to `dtype`: exact for power-of-two scalings (r = alpha gives 1)."""
    As, Bs = tuple(As), tuple(Bs)

    def build():
        fits = (
            len(As) <= 3
            and use_triton(As[0])
            and all(t.is_contiguous() and t.dtype == As[0].dtype and t.device == As[0].device for t in As + Bs)
        )
        if not fits:
            return _lora_operands_torch(As, Bs, scalings, dtype)
        k = As[0].shape[1]
        ranks = [A.shape[0] for A in As] + [0] * (3 - len(As))
        ns = [B.shape[0] for B in Bs] + [0] * (3 - len(Bs))
        scales = list(scalings) + [0.0] * (3 - len(As))
        a_src = list(As) + [As[0]] * (3 - len(As))
        b_src = list(Bs) + [Bs[0]] * (3 - len(Bs))
        rows, n_total = sum(ranks), sum(ns)
        a = torch.empty(rows, k, dtype=dtype, device=As[0].device)
        bt = torch.empty(rows, n_total, dtype=dtype, device=As[0].device)
        interp = interpreting()
        block = min(triton.next_power_of_2(max(k, n_total)), 128 if interp else 2048)
        _lora_operands_kernel[(rows, triton.cdiv(max(k, n_total), block))](
            *a_src, *b_src, a, bt, k, ranks[0], ranks[0] + ranks[1], ns[0], ns[0] + ns[1], n_total,
            max(ranks[0], 1), max(ranks[1], 1), max(ranks[2], 1), *[float(x) for x in scales],
            RNE_BF16=interp and dtype == torch.bfloat16, BLOCK=block, num_warps=4,
        )
        return a, bt

    return _epoch_cached(_operands, As + Bs, (dtype, tuple(scalings)), build)


def _cached_parts(module):
    """(lora_parts(module), its _Proj), reused while the module's LoRA state and tensors are the ones seen last.

    The key holds everything lora_parts reads that can change between calls (train/eval, active adapter, merged,
    disabled, scaling), the identity of the tensors it returned, the base weight's storage (`.to()` and `.data =`
    keep the Parameter but swap its storage, which the cached _Proj views) and that it is still frozen; anything else
    means a new call.
    """
    d = module.__dict__
    active = d.get("_active_adapter")  # peft keeps a str or a list of names
    active = (active,) if isinstance(active, str) else tuple(active or ())
    key = (d.get("training"), active, len(d.get("merged_adapters") or ()), d.get("_disable_adapters"))
    hit = d.get("_sloth_lora_parts")
    if hit is not None and hit[0] == key and len(active) == 1:
        parts, proj, storage = hit[1], hit[2], hit[3]
        adapter = active[0]
        try:
            base_weight = module.get_base_layer().weight
            same = (
                module.scaling[adapter] == parts[4]
                and module.lora_A[adapter].weight is parts[2]
                and module.lora_B[adapter].weight is parts[3]
                and base_weight is parts[0]
                and base_weight.data_ptr() == storage
                and (parts[1] is None or getattr(base_weight, "quant_state", None) is parts[1])
                and not base_weight.requires_grad
            )
        except (KeyError, TypeError, AttributeError):
            same = False
        if same:
            return parts, proj
    parts = lora_parts(module)
    proj = _Proj(parts[0], parts[1], parts[4])
    d["_sloth_lora_parts"] = (key, parts, proj, parts[0].data_ptr())
    return parts, proj


# ----------------------------------------------------------------------------------------------------------------
# Projection groups: the GEMM plumbing shared by lora_linear / lora_qkv / lora_o / lora_mlp
# ----------------------------------------------------------------------------------------------------------------
class _Proj:
    """A frozen base weight: dense [N, K], or NF4 packed bytes + quant_state; plus the LoRA scaling."""

    __slots__ = ("weight", "quant_state", "scaling", "out_features", "in_features")

    def __init__(self, weight, quant_state, scaling):
        if quant_state is not None:
            self.out_features, self.in_features = check_quant_state(quant_state)
            if self.out_features * self.in_features >= 2**31:
                raise LoraNotApplicable("NF4 weight too large for 32-bit indexing")
            self.weight = packed_bytes(weight)
        else:
            if weight.dim() != 2:
                raise LoraNotApplicable(f"dense base weight must be 2-D, got {tuple(weight.shape)}")
            self.out_features, self.in_features = weight.shape
            self.weight = weight.detach()
        if weight.requires_grad:
            raise LoraNotApplicable("base weight requires grad (only frozen base weights are supported)")
        self.quant_state = quant_state
        self.scaling = float(scaling)


def _backend() -> str:
    if MATMUL_BACKEND not in ("dequant", "fused"):
        raise ValueError(f"MATMUL_BACKEND must be 'dequant' or 'fused', got {MATMUL_BACKEND!r}")
    return MATMUL_BACKEND


def _materialise(projs, dtype, device):
    """The base weights of `projs` stacked as one [sum N, K] tensor in `dtype` (a temporary for one GEMM)."""
    if len(projs) == 1 and projs[0].quant_state is None:
        return projs[0].weight.to(dtype)
    w = torch.empty(sum(p.out_features for p in projs), projs[0].in_features, dtype=dtype, device=device)
    if len(projs) in (2, 3) and all(p.quant_state is not None for p in projs):
        return dequantize_nf4_stacked([(p.weight, p.quant_state) for p in projs], w)  # one launch
    row = 0
    for p in projs:
        if p.quant_state is None:
            w[row : row + p.out_features].copy_(p.weight)
        else:
            dequantize_nf4(p.weight, p.quant_state, out=w[row : row + p.out_features])
        row += p.out_features
    return w


def _stackable(projs) -> bool:
    # One stacked dequant buffer + one GEMM; only for NF4 (stacking dense weights would copy them every call).
    return _backend() == "dequant" and len(projs) > 1 and all(p.quant_state is not None for p in projs)


def _mm(a, proj, trans, lora=None, bias=None, out=None):
    """out (+)= a @ (W^T if trans else W) [+ s * la @ lb] [+ bias], a 2-D in the compute dtype."""
    if proj.quant_state is not None and _backend() == "fused":
        return _fused_nf4_mm(a, proj, trans, lora, bias, out)
    w = _materialise([proj], a.dtype, a.device)
    w_op = w.t() if trans else w
    if out is None:
        out = torch.matmul(a, w_op) if bias is None else torch.addmm(bias.to(a.dtype), a, w_op)
    else:
        out.addmm_(a, w_op)
        if bias is not None:
            out.add_(bias.to(a.dtype))
    del w, w_op  # the dequantised temporary dies here, before the LoRA update
    if lora is not None:
        la, lb, scale = lora
        out.addmm_(la, lb, alpha=scale)
    return out


def _scaled_as(t: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """t * scaling in `dtype` in one launch (none when there is nothing to do): a LoRA B grad in its weight's dtype."""
    if scaling == 1.0:
        return t.to(dtype)
    if t.dtype == dtype:
        return t.mul_(scaling)
    return torch.mul(t, scaling, out=torch.empty_like(t, dtype=dtype))


def _slices(sizes):
    """Consecutive slices of the given sizes: a stacked buffer's blocks."""
    slices, start = [], 0
    for n in sizes:
        slices.append(slice(start, start + n))
        start += n
    return slices


def _col_slices(projs):
    return _slices(p.out_features for p in projs)


def _rank_slices(As):
    return _slices(A.shape[0] for A in As)


def _group_forward(x2, projs, As, Bs, biases, xa):
    """(outputs [M, N_i] of each projection of x2 [M, K], their shared [M, sum N] buffer or None).

    xa = x2 @ cat(A_i)^T [M, sum r] is given. When the group is stacked the outputs are column views of the buffer.
    """
    cd = x2.dtype
    ranks = _rank_slices(As)
    _, bt = _lora_operands(As, Bs, [p.scaling for p in projs], cd)
    if _stackable(projs):
        w = _materialise(projs, cd, x2.device)
        y_all = torch.matmul(x2, w.t())
        del w
        y_all.addmm_(xa, bt)
        outs = [y_all[:, cols] for cols in _col_slices(projs)]
        for y, bias in zip(outs, biases):
            if bias is not None:
                y.add_(bias.to(cd))
        return outs, y_all
    outs = [
        _mm(x2, p, True, lora=(xa[:, rs], bt[rs, cols], 1.0), bias=bias)
        for p, bias, rs, cols in zip(projs, biases, ranks, _col_slices(projs))
    ]
    return outs, None


def _group_backward(dys, x2, xa, projs, As, Bs, biases, need_x, need_A, need_B, need_bias, dy_stacked=None):
    """Grads of a projection group. dys[i] is [M, N_i] or None (output unused); dy_stacked, when given, is one
    [M, sum N] buffer whose column blocks are the dys, all live (dX is then one GEMM when the group is stackable)."""
    cd = x2.dtype
    ranks, cols = _rank_slices(As), _col_slices(projs)
    a_stacked, bt = _lora_operands(As, Bs, [p.scaling for p in projs], cd)
    live = [i for i, dy in enumerate(dys) if dy is not None]
    # (dY_i @ B_i) * s_i for all live projections, side by side: [M, sum r].
    if dy_stacked is not None:
        dyb = torch.matmul(dy_stacked, bt.t())
    else:
        dyb = torch.zeros(x2.shape[0], ranks[-1].stop, dtype=cd, device=x2.device) if len(live) < len(dys) else None
        parts = []
        for i in live:
            part = torch.matmul(dys[i], bt[ranks[i], cols[i]].t())
            if dyb is not None:
                dyb[:, ranks[i]] = part
            parts.append(part)
        if dyb is None:
            dyb = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        del parts

    dx = None
    if need_x and live:
        if dy_stacked is not None and _stackable(projs):
            w = _materialise(projs, cd, x2.device)
            dx = torch.matmul(dy_stacked, w)
            del w
        else:
            for i in live:
                dx = _mm(dys[i], projs[i], False, out=dx)
        dx.addmm_(dyb, a_stacked)
    elif need_x:
        dx = torch.zeros_like(x2)

    dAs, dBs, dbiases = [None] * len(As), [None] * len(Bs), [None] * len(biases)
    if any(need_A):
        dA_all = torch.matmul(dyb.t(), x2)
        if all(A.dtype == As[0].dtype for A in As):
            dA_all = dA_all.to(As[0].dtype)  # one cast for the group; each grad is a row block (contiguous) of it
        for i, A in enumerate(As):
            if need_A[i]:
                dAs[i] = dA_all[ranks[i]].to(A.dtype)
    for i in range(len(projs)):
        dy = dys[i]
        if need_B[i]:
            dBs[i] = (
                torch.zeros_like(Bs[i]) if dy is None
                else _scaled_as(torch.matmul(dy.t(), xa[:, ranks[i]]), projs[i].scaling, Bs[i].dtype)
            )
        if need_bias[i]:
            dbiases[i] = torch.zeros_like(biases[i]) if dy is None else dy.sum(0).to(biases[i].dtype)
    return dx, dAs, dBs, dbiases


class _Plan:
    """The non-tensor half of an autograd call: base projections, compute dtype; for the MLP its activation and
    whether its output is computed."""

    __slots__ = ("projs", "compute_dtype", "activation", "compute_output", "cache_epoch")

    def __init__(self, projs, compute_dtype, activation=None, compute_output=True, cache_epoch=None):
        self.projs, self.compute_dtype, self.activation = projs, compute_dtype, activation
        self.compute_output, self.cache_epoch = compute_output, cache_epoch


def _flat_params(parts):
    """[(A, B, bias), ...] -> [A0, B0, bias0, A1, ...] for autograd.Function.apply."""
    return [t for triple in parts for t in triple]


def _check_inputs(x, projs):
    """All projections read x's feature dimension."""
    k = projs[0].in_features
    for p in projs:
        if p.in_features != k or x.shape[-1] != k:
            raise LoraNotApplicable(f"input features {x.shape[-1]} do not match base weights ({p.in_features})")
    return projs


def _prepare(x, parts):
    """The frozen base projections of `parts` (lora_parts tuples), checked to all read x's feature dimension."""
    return _check_inputs(x, [_Proj(w, qs, s) for (w, qs, _, _, s, _) in parts])


def _versions(params):
    return tuple(None if p is None else p._version for p in params)


def _unchanged(params, versions):
    """params, after the check autograd makes for saved tensors (they are kept on ctx, see _LoraGroupFn)."""
    if _versions(params) != versions:
        raise RuntimeError("a LoRA weight or bias was modified in place between this op's forward and its backward")
    return params


class _LoraGroupFn(torch.autograd.Function):
    """Projections sharing one input x: y_i = x @ W_i^T + s_i (x @ A_i^T) @ B_i^T (+ b_i). Saves x and x @ A^T."""

    @staticmethod
    def forward(ctx, plan, x, *params):
        projs = plan.projs
        cd = _compute_dtype(x, plan.compute_dtype)
        with torch.autocast(x.device.type, enabled=False), _CacheEpoch(plan.cache_epoch):
            As, Bs, biases = params[0::3], params[1::3], params[2::3]
            x2 = x.reshape(-1, x.shape[-1]).to(cd)
            xa = torch.matmul(x2, _lora_operands(As, Bs, [p.scaling for p in projs], cd)[0].t())
            outs, _ = _group_forward(x2, projs, As, Bs, biases, xa)
        ctx.projs, ctx.cache_epoch = projs, plan.cache_epoch
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.set_materialize_grads(False)
        # The LoRA weights go on ctx, not through save_for_backward: they live anyway, and under torch's
        # checkpointing every saved tensor costs a Python pack hook in both runs and an unpack in the backward.
        ctx.save_for_backward(x2, xa)
        ctx.params, ctx.versions = params, _versions(params)
        lead = x.shape[:-1]
        return tuple(y.view(*lead, y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, xa = ctx.saved_tensors
        params = _unchanged(ctx.params, ctx.versions)
        As, Bs, biases = params[0::3], params[1::3], params[2::3]
        cd = x2.dtype
        with torch.autocast(x2.device.type, enabled=False), _CacheEpoch(ctx.cache_epoch):
            dys = [None if g is None else g.reshape(-1, g.shape[-1]).to(cd) for g in grads]
            need = ctx.needs_input_grad
            dy_stacked = None
            if need[1] and len(dys) > 1 and all(dy is not None for dy in dys) and _stackable(ctx.projs):
                # q/k/v grads side by side: dX is then one stacked dequant and one GEMM instead of three each
                # (the copy is [M, N_q + N_k + N_v], small next to that GEMM).
                dy_stacked = torch.cat(dys, dim=1)
                dys = [dy_stacked[:, r] for r in _col_slices(ctx.projs)]
            dx, dAs, dBs, dbiases = _group_backward(
                dys, x2, xa, ctx.projs, As, Bs, biases,
                need_x=need[1], need_A=need[2::3], need_B=need[3::3], need_bias=need[4::3], dy_stacked=dy_stacked,
            )
        if dx is not None:
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        out = [None, dx]
        for dA, dB, db in zip(dAs, dBs, dbiases):
            out += [dA, dB, db]
        return tuple(out)


def _run_group(x, parts, compute_dtype=None, projs=None, cache_epoch=None):
    projs = _prepare(x, parts) if projs is None else _check_inputs(x, projs)
    params = _flat_params([(A, B, bias) for (_, _, A, B, _, bias) in parts])
    return _LoraGroupFn.apply(_Plan(projs, compute_dtype, cache_epoch=cache_epoch), x, *params)


class _LoraMLPFn(torch.autograd.Function):
    """down(act(gate(x)) * up(x)), all three LoRA projections; saves x and the small x @ A^T / h @ A_down^T."""

    @staticmethod
    def forward(ctx, plan, x, *params):
        projs, activation = plan.projs, plan.activation
        cd = _compute_dtype(x, plan.compute_dtype)
        gate_up, down = projs[:2], projs[2]
        with torch.autocast(x.device.type, enabled=False), _CacheEpoch(plan.cache_epoch):
            As, Bs, biases = params[0::3], params[1::3], params[2::3]
            x2 = x.reshape(-1, x.shape[-1]).to(cd)
            xa = torch.matmul(x2, _lora_operands(As[:2], Bs[:2], [p.scaling for p in gate_up], cd)[0].t())
            (g, u), gu = _group_forward(x2, gate_up, As[:2], Bs[:2], biases[:2], xa)
            h = _gated_act(g, u, activation)
            saved_gu = () if MLP_RECOMPUTE else ((gu,) if gu is not None else (g, u))
            del g, u, gu
            xa_down = torch.matmul(h, _lora_operands(As[2:], Bs[2:], [down.scaling], cd)[0].t())
            if plan.compute_output:
                (y,), _ = _group_forward(h, [down], As[2:], Bs[2:], biases[2:], xa_down)
            else:  # a re-run whose output nobody reads: the backward needs only what is saved below (zeros, not
                # uninitialised memory: forward hooks, e.g. overflow detectors, may still look at it)
                y = torch.zeros(x2.shape[0], down.out_features, dtype=cd, device=x2.device)
            del h
        ctx.projs, ctx.activation, ctx.cache_epoch = projs, activation, plan.cache_epoch
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(x2, xa, xa_down, *saved_gu)
        ctx.params, ctx.versions = params, _versions(params)  # see _LoraGroupFn
        # Inside a checkpointed layer the saved g/u reach the backward from the re-run, once: overwrite them there
        # instead of cloning ([M, 2 x intermediate], the largest buffer of the layer's backward).
        ctx.owns_saved_gu = checkpointed()
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, xa_down, *saved_gu = ctx.saved_tensors
        params = _unchanged(ctx.params, ctx.versions)
        As, Bs, biases = params[0::3], params[1::3], params[2::3]
        gate_up, down = ctx.projs[:2], ctx.projs[2]
        need = ctx.needs_input_grad  # (plan, x, A0, B0, b0, A1, B1, b1, A2, B2, b2)
        cd = x2.dtype
        with torch.autocast(x2.device.type, enabled=False), _CacheEpoch(ctx.cache_epoch):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(cd)
            # g, u are overwritten in place below, so saved ones are cloned (backward may be retained), unless
            # they came from a checkpoint re-run for this backward alone.
            if len(saved_gu) == 1:
                gu = saved_gu[0] if ctx.owns_saved_gu else saved_gu[0].clone()
                g, u = gu[:, : gate_up[0].out_features], gu[:, gate_up[0].out_features :]
            elif saved_gu:
                (g, u), gu = [t if ctx.owns_saved_gu else t.clone() for t in saved_gu], None
            else:
                (g, u), gu = _group_forward(x2, gate_up, As[:2], Bs[:2], biases[:2], xa)
            # dh = dY @ W_down + s (dY @ B_down) @ A_down; then act backward turns (g, u, dh) into (dg, du, h).
            a_down, bt_down = _lora_operands(As[2:], Bs[2:], [down.scaling], cd)
            dyb = torch.matmul(dy2, bt_down.t())  # s folded into bt_down
            dh = _mm(dy2, down, False, lora=(dyb, a_down, 1.0))
            h = _gated_act_backward_(g, u, dh, ctx.activation)
            dg, du = g, u
            dA_down = torch.matmul(dyb.t(), h).to(As[2].dtype) if need[8] else None
            del h, dh
            dB_down = _scaled_as(torch.matmul(dy2.t(), xa_down), down.scaling, Bs[2].dtype) if need[9] else None
            db_down = dy2.sum(0).to(biases[2].dtype) if need[10] else None
            del dyb, dy2
            # When gate/up ran stacked, dg | du now fill their shared buffer in place: dX is then one GEMM.
            dx, dAs, dBs, dbs = _group_backward(
                [dg, du], x2, xa, gate_up, As[:2], Bs[:2], biases[:2],
                need_x=need[1], need_A=need[2:8:3], need_B=need[3:8:3], need_bias=need[4:8:3], dy_stacked=gu,
            )
        if dx is not None:
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (None, dx, dAs[0], dBs[0], dbs[0], dAs[1], dBs[1], dbs[1], dA_down, dB_down, db_down)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def lora_linear(x, base_weight, quant_state, lora_A, lora_B, scaling, bias=None, *, compute_dtype=None):
    """y = x @ W^T + scaling * (x @ A^T) @ B^T (+ bias); see the module docstring."""
    if not use_triton(x):
        return lora_linear_reference(x, base_weight, quant_state, lora_A, lora_B, scaling, bias,
                                     compute_dtype=compute_dtype)
    (y,) = _run_group(x, [(base_weight, quant_state, lora_A, lora_B, scaling, bias)], compute_dtype)
    return y


def lora_qkv(x, q_proj, k_proj, v_proj, *, cache_epoch=None):
    """(q_proj(x), k_proj(x), v_proj(x)) for peft LoRA layers, as one autograd node that saves x once.

    cache_epoch (also on lora_o / lora_mlp): see "Host-side caches"; None caches nothing.
    """
    parts, projs = zip(*(_cached_parts(m) for m in (q_proj, k_proj, v_proj)))
    cd = module_compute_dtype(q_proj)
    if not use_triton(x):
        return tuple(lora_linear_reference(x, *p, compute_dtype=cd) for p in parts)
    return _run_group(x, parts, cd, list(projs), cache_epoch)


def lora_o(x, o_proj, *, cache_epoch=None):
    """o_proj(x) for a peft LoRA layer (single projection, same machinery as lora_qkv)."""
    parts, proj = _cached_parts(o_proj)
    cd = module_compute_dtype(o_proj)
    if not use_triton(x):
        return lora_linear_reference(x, *parts, compute_dtype=cd)
    (y,) = _run_group(x, [parts], cd, [proj], cache_epoch)
    return y


def lora_mlp(x, gate_proj, up_proj, down_proj, activation="silu", *, compute_output=True, cache_epoch=None):
    """down_proj(act(gate_proj(x)) * up_proj(x)) for peft LoRA layers; activation "silu" (SwiGLU) or "gelu_tanh".

    compute_output=False: same autograd node and gradients, zeros as the output (Triton path only; the
    reference path always computes it).
    """
    _check_activation(activation)
    if not use_triton(x):
        return lora_mlp_reference(x, gate_proj, up_proj, down_proj, activation)
    parts, projs = zip(*(_cached_parts(m) for m in (gate_proj, up_proj, down_proj)))
    projs, down = _check_inputs(x, list(projs[:2])), projs[2]
    if down.in_features != projs[0].out_features or projs[1].out_features != projs[0].out_features:
        raise LoraNotApplicable("gate/up/down shapes do not chain")
    params = _flat_params([(A, B, bias) for (_, _, A, B, _, bias) in parts])
    plan = _Plan(projs + [down], module_compute_dtype(gate_proj), activation, compute_output, cache_epoch)
    return _LoraMLPFn.apply(plan, x, *params)
