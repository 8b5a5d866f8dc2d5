"""Per-example scores of a model on eval examples: answer-token loss, greedy exactness and KL to the base model.

Contract: `score_examples(model, tokenizer, examples, max_len, device, kl_to_base=...)` returns one `ExampleScore`
per example, in order, from batched forward passes (no generation):
- `loss`: mean cross-entropy (nats/token) over the answer tokens (labels of `prompting.encode_example`).
- `exact`: whether greedy decoding would give the answer exactly, end-of-turn token included. Measured by teacher
  forcing: greedy decoding reproduces a token sequence iff at every answer position the most likely next token is
  the answer's own token, so one forward pass per batch tells what generating each answer would (ties aside), at a
  fraction of the cost. This is what makes judging recall "by greedy answers" cheap enough for every update.
- `kl` (only with `kl_to_base=True` on a peft model): mean over answer positions of KL(p_base || p_model), nats per
  token, where p_base comes from the same model with its adapters disabled (peft's `disable_adapter()`).
Why our own code: transformers' `generate` would decode token by token (one pass per answer token); the loss that
`model(labels=...)` returns is a batch mean, not per example.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from pydantic import BaseModel

from ..prompting import IGNORE_INDEX
from .job import EvalScores, TrainJob


Collate = Callable[[Any, list[Any], int, torch.device], dict[str, torch.Tensor]]


class ExampleScore(BaseModel):
    """One example's scores under one model (see the module docstring for what each means)."""

    loss: float
    exact: bool
    tokens: int
    kl: float | None = None


@torch.no_grad()
def score_examples(model: Any, tokenizer: Any, examples: list[Any], collate: Collate, max_len: int,
                   device: torch.device, *, kl_to_base: bool = False, batch_size: int = 8) -> list[ExampleScore]:
    """Score `examples` (objects with kind, prompt, answer) under `model`; see the module docstring. `collate` is
    the recipe's (tokenizer, examples, max_len, device) -> {input_ids, labels, attention_mask} of [B, T] int64.

    Raises ValueError when `kl_to_base` is asked of a model that has no adapter to disable."""
    if kl_to_base and not hasattr(model, "disable_adapter"):
        raise ValueError("KL to the base needs a peft model (its adapters are disabled to get the base)")
    was_training = model.training
    model.eval()
    out: list[ExampleScore] = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(tokenizer, examples[i : i + batch_size], max_len, device)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            answer = labels != IGNORE_INDEX                         # [B, T-1] bool
            safe = labels.clamp_min(0)
            logp = torch.log_softmax(logits, dim=-1)                 # [B, T-1, V] fp32
            nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)   # [B, T-1]
            hit = logits.argmax(-1) == labels
            kl = None
            if kl_to_base:
                with model.disable_adapter():
                    base = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                base_logp = torch.log_softmax(base, dim=-1)
                kl = (base_logp.exp() * (base_logp - logp)).sum(-1)  # [B, T-1] nats
            for row in range(ids.size(0)):
                sel = answer[row]
                n = int(sel.sum())
                out.append(ExampleScore(
                    loss=float(nll[row][sel].sum()) / max(n, 1),
                    exact=bool(n > 0 and hit[row][sel].all()),
                    tokens=n,
                    kl=None if kl is None else float(kl[row][sel].sum()) / max(n, 1),
                ))
    finally:
        model.train(was_training)
    return out


def score_eval_sets(model: Any, tokenizer: Any, job: TrainJob, scores: dict[str, EvalScores], which: str,
                    collate: Collate) -> None:
    """Fill `scores[name]`'s `which` ("parent" or "candidate") fields for every eval set of `job`, in place."""
    device = torch.device(job.device)
    for name, examples in job.eval_examples().items():
        if not examples:
            continue
        kl = name in job.kl_sets and hasattr(model, "disable_adapter")
        per = score_examples(model, tokenizer, examples, collate, job.max_seq_len, device, kl_to_base=kl)
        tokens = sum(p.tokens for p in per)
        mean = sum(p.loss * p.tokens for p in per) / max(tokens, 1)
        kls = [p.kl for p in per if p.kl is not None]
        setattr(scores[name], which, mean)
        setattr(scores[name], f"{which}_losses", [p.loss for p in per])
        setattr(scores[name], f"{which}_exact", [p.exact for p in per])
        setattr(scores[name], f"{which}_kl", sum(kls) / len(kls) if kls else None)
