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
Batching: the examples are sorted by length and cut into right-padded batches of at most `batch_tokens` tokens
(padding included) each, so a forward carries as many examples as fit (about 40 short question/answer pairs instead
of a fixed 8) and examples of like length share one (little padding). The per-example sums are taken on the device
and read back once per forward (one host sync per forward, not several per example); the log-softmax, argmax and KL
are taken at answer positions only (a [answer tokens, vocab] tensor, not [batch, width, vocab]). Scores equal
scoring each example alone up to floating-point rounding (tests/test_scoring.py). Packed rows (`packing.pack`)
were tried too: on CPU their block-diagonal attention over 512-token rows cost more than the padding they saved
(benchmarks/bench_train_host.py).
`score_eval_sets` scores all of a job's eval sets with one packing for the sets judged with KL and one for the rest.
Why our own code: transformers' `generate` would decode token by token (one pass per answer token); the loss that
`model(labels=...)` returns is a batch mean, not per example.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from ..prompting import IGNORE_INDEX, encode_example
from .collate import collate_encoded, pad_id
from .job import EvalScores, TrainJob

BATCH_TOKENS = 4096  # padded tokens per forward: the worst case of the 8-example batches of 512 tokens before


class ExampleScore(BaseModel):
    """One example's scores under one model (see the module docstring for what each means)."""

    loss: float
    exact: bool
    tokens: int
    kl: float | None = None


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` (tokens per example) sorted by decreasing length and cut into batches whose padded size
    (examples x longest) stays within `batch_tokens` (a longer example gets a batch of its own)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)  # the batch's first example is its longest
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def score_examples(model: Any, tokenizer: Any, examples: list[Any], max_len: int, device: torch.device, *,
                   kl_to_base: bool = False, batch_tokens: int = BATCH_TOKENS) -> list[ExampleScore]:
    """Score `examples` (objects with kind, prompt, answer, tools, tool_calls) under `model`, encoded to at most
    `max_len` tokens each, in batches of at most `batch_tokens` padded tokens; see the module docstring.

    Raises ValueError when `kl_to_base` is asked of a model that has no adapter to disable."""
    if kl_to_base and not hasattr(model, "disable_adapter"):
        raise ValueError("KL to the base needs a peft model (its adapters are disabled to get the base)")
    if not examples:
        return []
    encoded = [encode_example(tokenizer, e.kind, e.prompt, e.answer, max_len, getattr(e, "tools", None),
                              getattr(e, "tool_calls", None)) for e in examples]
    pad = pad_id(tokenizer)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, len(examples), dtype=torch.float64)  # per example: nll, scored tokens, misses, kl
    try:
        for batch in length_batches([len(ids) for ids, _ in encoded], batch_tokens):
            padded = collate_encoded([encoded[i] for i in batch], pad, device)
            ids, mask = padded["input_ids"], padded["attention_mask"]
            targets = padded["labels"][:, 1:]                            # [B, T-1]: label t+1 is predicted at t
            scored = targets != IGNORE_INDEX
            who = torch.tensor(batch, device=device).unsqueeze(1).expand_as(targets)[scored]  # [N] example index
            tgt = targets[scored]                                        # [N]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float()  # [N, V]
            logp = torch.log_softmax(logits, dim=-1)
            part = torch.zeros(4, len(examples), dtype=torch.float64, device=device)
            part[0].index_add_(0, who, -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double())
            part[1].index_add_(0, who, torch.ones_like(tgt, dtype=torch.float64))
            part[2].index_add_(0, who, (logits.argmax(-1) != tgt).double())
            if kl_to_base:
                with model.disable_adapter():
                    base = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored]
                base_logp = torch.log_softmax(base.float(), dim=-1)
                part[3].index_add_(0, who, (base_logp.exp() * (base_logp - logp)).sum(-1).double())
            sums += part.cpu()  # the one host sync of this forward
    finally:
        model.train(was_training)
    out = []
    for nll, n, misses, kl in sums.T.tolist():
        n = int(n)
        out.append(ExampleScore(loss=nll / max(n, 1), exact=n > 0 and misses == 0, tokens=n,
                                kl=kl / max(n, 1) if kl_to_base else None))
    return out


def score_eval_sets(model: Any, tokenizer: Any, job: TrainJob, scores: dict[str, EvalScores], which: str) -> None:
    """Fill `scores[name]`'s `which` ("parent" or "candidate") fields for every eval set of `job`, in place."""
    device = torch.device(job.device)
    sets = {name: examples for name, examples in job.eval_examples().items() if examples}
    can_kl = hasattr(model, "disable_adapter")
    per: dict[str, list[ExampleScore]] = {}
    for with_kl in (False, True):  # one packing (and forward series) per kind: KL costs a second forward
        names = [n for n in sets if (n in job.kl_sets and can_kl) == with_kl]
        together = score_examples(model, tokenizer, [e for n in names for e in sets[n]], job.max_seq_len, device,
                                  kl_to_base=with_kl)
        for n in names:
            per[n], together = together[:len(sets[n])], together[len(sets[n]):]
    for name in sets:
        tokens = sum(p.tokens for p in per[name])
        mean = sum(p.loss * p.tokens for p in per[name]) / max(tokens, 1)
        kls = [p.kl for p in per[name] if p.kl is not None]
        setattr(scores[name], which, mean)
        setattr(scores[name], f"{which}_losses", [p.loss for p in per[name]])
        setattr(scores[name], f"{which}_exact", [p.exact for p in per[name]])
        setattr(scores[name], f"{which}_kl", sum(kls) / len(kls) if kls else None)
        setattr(scores[name], f"{which}_kls", kls if len(kls) == len(per[name]) else [])
