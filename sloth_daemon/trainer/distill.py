"""Anchor rows trained toward the base model's whole next-token distribution (distillation) instead of its answer.

Anchors are the base model's own greedy answers to general prompts (`sloth_daemon.anchors`). Trained with plain
cross-entropy, an anchor teaches only the argmax token at each position, more confidently than the base gave it; the
rest of the base's distribution is free to move, and with it the answers to general prompts that are not anchors
(bench_retention: built-in answers held out of training fell from 6/6 to 2/5 over 10 rounds). Here an anchor's answer
tokens are trained on KL(p_base || p_model) instead, where p_base is the same model with its LoRA disabled (peft's
`disable_adapter()`), computed in the same step: the update is pulled toward the base's full output on general
prompts, which is Learning without Forgetting's distillation term on the old task's outputs (Li & Hoiem, "Learning
without Forgetting", ECCV 2016 / TPAMI 2017, with the temperature at 1) applied to rehearsal examples, as in
replay-with-distillation methods (e.g. "Dark Experience for General Continual Learning", Buzzega et al., NeurIPS
2020, which replays stored logits; here the base model is at hand, so its logits are recomputed rather than stored).

Contract: `kl_to_base_sum(model, inputs)` -> (summed KL in nats over the answer tokens of `inputs`, a float32 scalar
tensor with grad; the number of those tokens). `inputs` is a batch of model inputs with `labels` (`recipe.collate`
or a packed batch's `model_inputs()`: [B, T] int64, IGNORE_INDEX where no answer token is predicted); positions are
shifted as for the causal-LM loss (logits at t predict labels at t + 1). Raises ValueError for a model without
`disable_adapter` (the base distribution comes from disabling the adapter).
"""

from __future__ import annotations

from typing import Any

import torch

from ..prompting import IGNORE_INDEX


def kl_to_base_sum(model: Any, inputs: dict) -> tuple[torch.Tensor, int]:
    if not hasattr(model, "disable_adapter"):
        raise ValueError("distillation toward the base needs a peft model (its adapter is disabled for the base)")
    labels = inputs["labels"]
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    sel = labels[:, 1:] != IGNORE_INDEX                                   # [B, T-1] bool
    n = int(sel.sum())
    logits = model(**forward).logits[:, :-1][sel].float()                 # [n, V]
    with torch.no_grad(), model.disable_adapter():
        base = model(**forward).logits[:, :-1][sel].float()               # [n, V]
    base_logp = torch.log_softmax(base, dim=-1)
    kl = (base_logp.exp() * (base_logp - torch.log_softmax(logits, dim=-1))).sum()
    return kl, n
