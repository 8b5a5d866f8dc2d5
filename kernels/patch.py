"""Swap sloth_kernels into a Hugging Face causal LM (plain or peft-wrapped), and take them out again.

Contract
--------
`patch_model(model, *, force=False, offload=False, checkpointing=True) -> PatchReport` patches, in place, a
transformers 5.x decoder-only causal LM of the Llama, Mistral, Qwen2, Qwen3, Gemma (1, 2, 3 text) or Phi-3 family,
or a peft `PeftModel` around one. Every change is an instance-level `forward` override (plus one module-level
function per family, see RoPE below); no parameter, buffer or module is replaced, so `state_dict`, peft's
`save_pretrained` (the adapter format) and the optimizer see exactly the model they saw before.

What is swapped in, module by module:
- RMSNorm modules (every norm of the family's class: layer norms, final norm, Qwen3/Gemma3 q_norm/k_norm):
  `rms_norm` with offset 0 (Llama casting) or 1 (Gemma's 1 + w).
- Attention: the rotary step goes through `rope_qk`. Each family's attention calls its modeling module's
  `apply_rotary_pos_emb`; that function is replaced by a switch that runs `rope_qk` only inside a patched
  attention's forward (a context variable says so) and the original everywhere else, so unpatched models in the
  same process are untouched. When q/k/v_proj are peft LoRA layers that qualify (`lora_parts`), the three
  projections run as one `lora_qkv` before the original forward, which then receives those outputs when it calls
  `self.q_proj(hidden_states)` etc. (so the family's own attention code, caches, masks, soft-capping and sliding
  windows are kept as they are). o_proj goes through `lora_o`. Phi-3's fused qkv_proj goes through `lora_o` too.
- MLP: `lora_mlp` (gate, up, down and the gated activation in one autograd node) when gate/up/down qualify (with
  our checkpointing on, it keeps gate/up for its backward instead of recomputing them: the layer re-run already
  recomputed them; `SLOTH_MLP_RECOMPUTE` in the environment overrides; and in that re-run, where the family adds
  the MLP output straight to the residual, it skips the down projection, whose output nothing reads); otherwise
  the original projections with the `swiglu` (silu) / `geglu` (gelu tanh or erf) kernel between them. Phi-3's gate_up_proj / down_proj: each through `lora_o` when it qualifies, `swiglu` on the two halves.
- Loss: the CausalLM's forward. When labels are given and the model trains with grad enabled it runs the decoder
  and `fused_linear_cross_entropy` on the last hidden state (causal shift as HF's `ForCausalLMLoss`, mean over
  non-ignored tokens, or sum / `num_items_in_batch` when given, Gemma's final logit soft-capping) and returns a
  `CausalLMOutputWithPast` whose `logits` is None. Otherwise (no labels, eval, no grad, `return_dict=False`,
  `logits_to_keep`) it is the original forward. Needs lm_head to be a plain float `nn.Linear`.
- Checkpointing (`checkpointing=True`): `enable_checkpointing(model, offload)` on the decoder layers.
- A forward pre-hook on the decoder draws a new LoRA cast-cache epoch at every forward (see
  `sloth_kernels.lora_linear`, "Host-side caches"): weights changed by an optimizer step are re-cast at the next
  forward, whatever the optimizer (fused AdamW moves no version counter).

Fallbacks: where a kernel does not apply (a norm whose weight dtype differs from its input in Llama casting, an
activation without a kernel, a projection that is not a qualifying LoRA layer, LoRA dropout while training, ...) the
module keeps (or, at run time, calls) its original code. Each reason is logged once per patched model
(`logging.warning`, logger `sloth_kernels.patch`) and counted in the report.

CPU: `patch_model` is a no-op (an inactive report) unless `force=True`. Forced, the same patches go in and each op
dispatches as usual: Triton's interpreter when TRITON_INTERPRET=1 (how CPU CI tests the kernels in a model), the
ops' PyTorch references otherwise.

`unpatch_model(model)` removes every override and restores the checkpointing state; a family's module-level
`apply_rotary_pos_emb` is restored once no patched model of that family is left un-unpatched (a model dropped while
patched leaves the switch in place, where it passes every call through). Patching a patched model unpatches it
first.

`PatchReport`: `family`, `active`, `patched` (kind -> modules patched), `fallbacks` ("kind: reason" -> times seen),
`calls` (kind -> kernel calls made at run time, for tests and logs); `str()` is a one-line summary.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import sloth_kernels.lora_linear as lora_linear_module
from sloth_kernels._dispatch import use_triton
from sloth_kernels.checkpoint import enable_checkpointing, recomputing
from sloth_kernels.cross_entropy import fused_linear_cross_entropy
from sloth_kernels.lora_linear import LoraNotApplicable, lora_mlp, lora_o, lora_parts, lora_qkv
from sloth_kernels.rms_norm import rms_norm
from sloth_kernels.rope import rope_qk
from sloth_kernels.swiglu import geglu, swiglu

logger = logging.getLogger(__name__)

_STATE_ATTR = "_sloth_patch_state"


@dataclass(frozen=True)
class _Family:
    module: str  # the transformers modeling module of the family
    norm_class: str
    norm_offset: float  # 0: Llama casting, 1: Gemma's (1 + w)
    # The decoder layer adds the MLP output straight to the residual (no norm after it that would save it), so a
    # checkpoint re-run may skip computing it (lora_mlp's compute_output=False). Gemma 2/3 post-norm it: False.
    mlp_output_to_residual: bool = True


# Keyed by config.model_type. Gemma 3 is its text-only causal LM (Gemma3ForCausalLM, config Gemma3TextConfig).
FAMILIES: dict[str, _Family] = {
    "llama": _Family("transformers.models.llama.modeling_llama", "LlamaRMSNorm", 0.0),
    "mistral": _Family("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", 0.0),
    "qwen2": _Family("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", 0.0),
    "qwen3": _Family("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", 0.0),
    "phi3": _Family("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm", 0.0),
    "gemma": _Family("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", 1.0),
    "gemma2": _Family("transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm", 1.0, False),
    "gemma3_text": _Family("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm", 1.0, False),
}

# The act_fn modules transformers builds (ACT2FN), by class name, and the gated kernel each maps to.
_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "GELUActivation": "gelu",
}


_EPOCHS = itertools.count(1)


class _Epoch:
    """A patched model's current cache epoch; `advance` is its decoder's forward pre-hook."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = next(_EPOCHS)

    def advance(self, *_):
        self.value = next(_EPOCHS)


@dataclass
class PatchReport:
    family: str | None = None
    active: bool = False
    reason: str = ""  # why the patch is inactive
    patched: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def fallback(self, kind: str, reason: str) -> None:
        """Record that `kind` runs the original code for `reason`; the first time, log it."""
        key = f"{kind}: {reason}"
        if key not in self.fallbacks:
            logger.warning("sloth_kernels: %s falls back to the original code: %s", kind, reason)
        self.fallbacks[key] += 1

    def __str__(self) -> str:
        if not self.active:
            return f"sloth_kernels off ({self.reason})"
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.patched.items()))
        text = f"sloth_kernels on {self.family}: {kinds}"
        if self.fallbacks:
            text += f"; fallbacks: {'; '.join(sorted(self.fallbacks))}"
        return text


# ------------------------------------------------------------------------------------------------------------------
# RoPE: the module-level switch
# ------------------------------------------------------------------------------------------------------------------
# The report of the patched attention whose forward is running, or None: the switch's on/off.
_ROPE_REPORT: contextvars.ContextVar[PatchReport | None] = contextvars.ContextVar("sloth_rope", default=None)
_rope_installs: Counter = Counter()  # family module -> patched models using its switch


def _rope_applies(q, k, cos, sin) -> str | None:
    if q.dim() != 4 or k.dim() != 4 or cos.dim() not in (2, 3) or cos.shape != sin.shape:
        return f"unexpected shapes q {tuple(q.shape)} cos {tuple(cos.shape)}"
    if q.dtype != k.dtype or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} do not pair"
    if cos.shape[-1] % 2 or cos.shape[-1] > q.shape[-1] or cos.shape[-2] != q.shape[2]:
        return f"cos/sin {tuple(cos.shape)} do not fit q {tuple(q.shape)}"
    return None


def _rope_switch(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        report = _ROPE_REPORT.get()
        if report is None:
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = args[0] if len(args) == 1 else kwargs.get("unsqueeze_dim", 1)
        if len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or unsqueeze_dim != 1:
            report.fallback("rope", "apply_rotary_pos_emb called with arguments other than unsqueeze_dim=1")
            return original(q, k, cos, sin, *args, **kwargs)
        problem = _rope_applies(q, k, cos, sin)
        if problem:
            report.fallback("rope", problem)
            return original(q, k, cos, sin, *args, **kwargs)
        report.calls["rope"] += 1
        return rope_qk(q, k, cos, sin)

    apply_rotary_pos_emb._sloth_original = original
    return apply_rotary_pos_emb


def _install_rope(module) -> bool:
    current = getattr(module, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if not hasattr(current, "_sloth_original"):
        module.apply_rotary_pos_emb = _rope_switch(current)
    _rope_installs[module.__name__] += 1
    return True


def _uninstall_rope(module) -> None:
    _rope_installs[module.__name__] -= 1
    if _rope_installs[module.__name__] <= 0:
        del _rope_installs[module.__name__]
        current = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = getattr(current, "_sloth_original", current)


# ------------------------------------------------------------------------------------------------------------------
# q/k/v computed ahead, handed to the original attention forward
# ------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _feeding(x: torch.Tensor, outputs):
    """While active, `proj(x)` (this very tensor x) returns the precomputed output, once, for each (proj, output).

    Yields the set of projections whose output has not been taken yet (empty at exit when all were used).
    """
    pending = {id(proj): proj for proj, _ in outputs}
    saved = []
    for proj, out in outputs:
        had = "forward" in proj.__dict__
        previous = proj.__dict__.get("forward")
        plain = proj.forward

        def fed(inp, *args, _proj=proj, _out=out, _plain=plain, **kwargs):
            if inp is x and not args and not kwargs and id(_proj) in pending:
                del pending[id(_proj)]
                return _out
            return _plain(inp, *args, **kwargs)

        proj.forward = fed
        saved.append((proj, had, previous))
    try:
        yield pending
    finally:
        for proj, had, previous in saved:
            if had:
                proj.forward = previous
            else:
                del proj.forward


# ------------------------------------------------------------------------------------------------------------------
# The patcher
# ------------------------------------------------------------------------------------------------------------------
def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a peft PeftModel (LoRA layers injected), or the model itself."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _lora_problem(*modules) -> str | None:
    try:
        for m in modules:
            lora_parts(m)
    except LoraNotApplicable as exc:
        return str(exc)
    return None


def _activation(act) -> str | None:
    name = _ACTIVATIONS.get(type(act).__name__)
    if name == "gelu" and getattr(act, "act", None) is not F.gelu:
        return None  # GELUActivation(use_gelu_python=True): same math, but leave what we cannot see alone
    return name


def _glu(activation: str):
    if activation == "silu":
        return swiglu
    if activation == "gelu_tanh":
        return functools.partial(geglu, approximate="tanh")
    return functools.partial(geglu, approximate="none")


class _Patcher:
    def __init__(self, base: torch.nn.Module, family: _Family, report: PatchReport):
        self.base, self.family, self.report = base, family, report
        self.modeling = importlib.import_module(family.module)
        self.undo: list = []
        self.mlp_recompute: bool | None = None  # lora_mlp's MLP_RECOMPUTE during our calls; None: leave it
        # The LoRA ops' cast-cache epoch (see sloth_kernels.lora_linear): a new one at every decoder forward, the
        # only place the LoRA weights can have changed since the last (an optimizer step comes between forwards).
        self.epoch = _Epoch()

    # -- helpers ---------------------------------------------------------------------------------------------------
    def set_forward(self, module: torch.nn.Module, forward, kind: str | None) -> None:
        had = "forward" in module.__dict__
        previous = module.__dict__.get("forward")

        def restore():
            if had:
                module.forward = previous
            elif "forward" in module.__dict__:
                del module.forward

        module.forward = forward
        self.undo.append(restore)
        if kind is not None:
            self.report.patched[kind] += 1

    # -- norms -----------------------------------------------------------------------------------------------------
    def patch_norms(self) -> None:
        norm_cls = getattr(self.modeling, self.family.norm_class)
        offset, report = self.family.norm_offset, self.report
        for module in self.base.modules():
            if not isinstance(module, norm_cls):
                continue
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            weight = getattr(module, "weight", None)
            if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
                report.fallback("rms_norm", f"{type(module).__name__} has no 1-D weight / eps")
                continue
            original = module.forward

            def forward(x, _m=module, _orig=original, _eps=float(eps)):
                w = _m.weight
                if offset == 0.0 and w.dtype != x.dtype:
                    # Llama casting promotes to the weight's dtype; the kernel returns x's dtype.
                    report.fallback("rms_norm", f"weight {w.dtype} differs from input {x.dtype}")
                    return _orig(x)
                if x.shape[-1] != w.shape[0]:
                    report.fallback("rms_norm", f"weight {tuple(w.shape)} does not match input {tuple(x.shape)}")
                    return _orig(x)
                report.calls["rms_norm"] += 1
                return rms_norm(x, w, _eps, offset)

            self.set_forward(module, forward, "rms_norm")

    # -- attention -------------------------------------------------------------------------------------------------
    def patch_attention(self, attn: torch.nn.Module) -> None:
        report = self.report
        rope = self.rope_installed
        fuse_qkv = False
        if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
            problem = _lora_problem(attn.q_proj, attn.k_proj, attn.v_proj)
            if problem:
                report.fallback("qkv", problem)
            else:
                fuse_qkv = True
        elif hasattr(attn, "qkv_proj"):
            self.patch_projection(attn.qkv_proj)
        else:
            report.fallback("qkv", f"{type(attn).__name__} has no q/k/v_proj or qkv_proj")
        if hasattr(attn, "o_proj"):
            self.patch_projection(attn.o_proj, kind="o")
        if not (rope or fuse_qkv):
            return
        original, epoch = attn.forward, self.epoch

        def forward(*args, **kwargs):
            token = _ROPE_REPORT.set(report) if rope else None
            try:
                if not fuse_qkv:
                    return original(*args, **kwargs)
                x = args[0] if args else kwargs.get("hidden_states")
                try:
                    q, k, v = lora_qkv(x, attn.q_proj, attn.k_proj, attn.v_proj, cache_epoch=epoch.value)
                except LoraNotApplicable as exc:
                    report.fallback("qkv", str(exc))
                    return original(*args, **kwargs)
                report.calls["qkv"] += 1
                with _feeding(x, ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v))) as unused:
                    out = original(*args, **kwargs)
                if unused:
                    report.fallback("qkv", "the attention forward did not call q/k/v_proj on its input")
                return out
            finally:
                if token is not None:
                    _ROPE_REPORT.reset(token)

        self.set_forward(attn, forward, None)
        report.patched["rope"] += int(rope)
        report.patched["qkv"] += int(fuse_qkv)

    def patch_projection(self, proj: torch.nn.Module, kind: str = "proj") -> bool:
        """One LoRA projection through `lora_o` (o_proj; Phi-3's fused qkv_proj / gate_up_proj, its down_proj)."""
        problem = _lora_problem(proj)
        if problem:
            self.report.fallback(kind, problem)
            return False
        original, report, epoch = proj.forward, self.report, self.epoch

        def forward(x, *args, **kwargs):
            if not args and not kwargs:
                try:
                    out = lora_o(x, proj, cache_epoch=epoch.value)
                    report.calls[kind] += 1
                    return out
                except LoraNotApplicable as exc:
                    report.fallback(kind, str(exc))
            return original(x, *args, **kwargs)

        self.set_forward(proj, forward, kind)
        return True

    # -- MLP -------------------------------------------------------------------------------------------------------
    def patch_mlp(self, mlp: torch.nn.Module, output_to_residual: bool = False) -> None:
        report = self.report
        act_module = getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))
        activation = _activation(act_module)
        if activation is None:
            report.fallback("mlp", f"activation {type(act_module).__name__} has no kernel")
            return
        glu = _glu(activation)
        if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):  # Phi-3: one fused gate|up projection
            self.patch_projection(mlp.gate_up_proj)
            self.patch_projection(mlp.down_proj)

            def forward(x):
                gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
                report.calls["glu"] += 1
                return mlp.down_proj(glu(gate, up))

            self.set_forward(mlp, forward, "glu")
            return
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            report.fallback("mlp", f"{type(mlp).__name__} is not a gate/up/down MLP")
            return
        problem = _lora_problem(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if problem is None and activation == "gelu":
            problem = "lora_mlp has no exact (erf) GELU"
        if problem:
            report.fallback("mlp", problem)
        fused = problem is None

        recompute, epoch = self.mlp_recompute, self.epoch

        def forward(x):
            if fused:
                saved = lora_linear_module.MLP_RECOMPUTE
                if recompute is not None:
                    lora_linear_module.MLP_RECOMPUTE = recompute  # read when lora_mlp decides what to save
                try:
                    skip_output = output_to_residual and recomputing() and use_triton(x)
                    # counted before the call: torch's checkpoint stops a re-run (raises inside lora_mlp) once the
                    # last tensor the backward needs is saved, so in a re-run lora_mlp does not return.
                    report.calls["mlp_output_skipped"] += skip_output
                    out = lora_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation,
                                   compute_output=not skip_output, cache_epoch=epoch.value)
                    report.calls["mlp"] += 1
                    return out
                except LoraNotApplicable as exc:
                    report.fallback("mlp", str(exc))
                finally:
                    lora_linear_module.MLP_RECOMPUTE = saved
            report.calls["glu"] += 1
            return mlp.down_proj(glu(mlp.gate_proj(x), mlp.up_proj(x)))

        self.set_forward(mlp, forward, "mlp" if fused else "glu")

    # -- loss ------------------------------------------------------------------------------------------------------
    def patch_loss(self) -> None:
        base, report = self.base, self.report
        lm_head = getattr(base, "lm_head", None)
        decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
        if type(lm_head) is not torch.nn.Linear or not lm_head.weight.is_floating_point():
            kind = f"{type(lm_head).__module__}.{type(lm_head).__qualname__}"
            report.fallback("loss", f"lm_head is {kind}, not a plain float torch.nn.Linear")
            return
        if decoder is None:
            report.fallback("loss", "no decoder module at base_model_prefix")
            return
        original = base.forward
        signature = inspect.signature(original)
        softcap = getattr(base.config, "final_logit_softcapping", None)

        def forward(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return original(*args, **kwargs)
            kw = {}
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    kw.update(value)
                else:
                    kw[name] = value
            labels = kw.get("labels")
            if (
                labels is None
                or not (base.training and torch.is_grad_enabled())
                or kw.get("return_dict") is False
                or kw.get("logits_to_keep") not in (None, 0)
            ):
                return original(*args, **kwargs)
            for name in ("labels", "logits_to_keep"):
                kw.pop(name, None)
            num_items = kw.pop("num_items_in_batch", None)
            shift_labels = kw.pop("shift_labels", None)
            ignore_index = kw.pop("ignore_index", -100)
            outputs = decoder(**kw)
            hidden = outputs[0]
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            loss = fused_linear_cross_entropy(
                hidden, lm_head.weight, shift_labels.to(hidden.device), lm_head.bias,
                ignore_index=ignore_index, reduction="mean" if num_items is None else "sum", softcap=softcap,
            )
            if num_items is not None:
                loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
            report.calls["loss"] += 1
            return _causal_lm_output(loss, outputs)

        self.set_forward(base, forward, "loss")

    # -- checkpointing ---------------------------------------------------------------------------------------------
    def patch_checkpointing(self, layers, offload: bool) -> None:
        saved = [
            (layer, {k: layer.__dict__[k] for k in ("gradient_checkpointing", "_gradient_checkpointing_func",
                                                    "forward", "_sloth_plain_forward") if k in layer.__dict__})
            for layer in layers
        ]

        def restore():
            for layer, attrs in saved:
                for k in ("gradient_checkpointing", "_gradient_checkpointing_func", "forward",
                          "_sloth_plain_forward"):
                    if k in attrs:
                        setattr(layer, k, attrs[k])
                    elif k in layer.__dict__:
                        delattr(layer, k)

        self.report.patched["checkpoint"] += enable_checkpointing(self.base, offload=offload)
        self.undo.append(restore)

    # -- all -------------------------------------------------------------------------------------------------------
    def run(self, offload: bool, checkpointing: bool) -> None:
        decoder = getattr(self.base, getattr(self.base, "base_model_prefix", "model"), None)
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ValueError(f"{type(self.base).__name__} has no decoder layers at .model.layers")
        if checkpointing and "SLOTH_MLP_RECOMPUTE" not in os.environ:
            # The checkpointed layer is re-run before its backward anyway: lora_mlp then keeps gate/up for the
            # backward (one layer's worth at a time) instead of computing them a third time.
            self.mlp_recompute = False
        self.rope_installed = _install_rope(self.modeling)
        if self.rope_installed:
            self.undo.append(functools.partial(_uninstall_rope, self.modeling))
        else:
            self.report.fallback("rope", f"{self.family.module} has no apply_rotary_pos_emb")
        self.patch_norms()
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is not None:
                self.patch_attention(attn)
            else:
                self.report.fallback("attention", f"{type(layer).__name__} has no self_attn")
            mlp = getattr(layer, "mlp", None)
            if mlp is not None:
                to_residual = self.family.mlp_output_to_residual and not hasattr(layer, "post_feedforward_layernorm")
                self.patch_mlp(mlp, output_to_residual=to_residual)
            else:
                self.report.fallback("mlp", f"{type(layer).__name__} has no mlp")
        self.patch_loss()
        if checkpointing:
            self.patch_checkpointing(layers, offload)
        handle = decoder.register_forward_pre_hook(self.epoch.advance)
        self.undo.append(handle.remove)


def _causal_lm_output(loss: torch.Tensor, outputs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    extra = {}
    for name in ("cache", "past_key_values"):  # renamed to `cache` in transformers 5.2x
        if name in fields:
            extra[name] = getattr(outputs, name, None)
            break
    return CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None), **extra,
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class _PatchState:
    report: PatchReport
    undo: list


def patch_model(model: torch.nn.Module, *, force: bool = False, offload: bool = False,
                checkpointing: bool = True) -> PatchReport:
    """Swap sloth_kernels into `model` in place; see the module docstring. Returns what was patched."""
    base = _base_model(model)
    if _STATE_ATTR in base.__dict__:
        unpatch_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    report = PatchReport(family=model_type)
    device = _model_device(base)
    if device.type != "cuda" and not force:
        report.reason = f"model is on {device.type}; kernels are for CUDA (pass force=True to patch anyway)"
        logger.info("sloth_kernels: %s", report.reason)
        return report
    family = FAMILIES.get(model_type)
    if family is None:
        report.reason = f"model type {model_type!r} is not supported (one of {', '.join(FAMILIES)})"
        logger.warning("sloth_kernels: %s", report.reason)
        return report
    patcher = _Patcher(base, family, report)
    try:
        patcher.run(offload=offload, checkpointing=checkpointing)
    except Exception:
        for undo in reversed(patcher.undo):
            undo()
        raise
    report.active = True
    base.__dict__[_STATE_ATTR] = _PatchState(report, patcher.undo)
    logger.info("%s", report)
    return report


def unpatch_model(model: torch.nn.Module) -> bool:
    """Undo `patch_model`; returns False when the model was not patched."""
    base = _base_model(model)
    state = base.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return False
    for undo in reversed(state.undo):
        undo()
    return True


def patch_report(model: torch.nn.Module) -> PatchReport | None:
    """The live report of a patched model (its `calls` and `fallbacks` grow as it runs), or None."""
    state = _base_model(model).__dict__.get(_STATE_ATTR)
    return state.report if state is not None else None
