"""One choice's decoding state for the embedded engine: the logits processors built once from its `SamplingParams`.

Contract:
- `ChoiceSampler(params, prompt_len, generator, guide=...)` holds everything that shapes one choice's next-token
  choice, built once per choice: a transformers `LogitsProcessorList` (OpenAI presence/frequency penalties, logit
  bias as transformers' `SequenceBiasLogitsProcessor` over one-token sequences, the structured-generation
  processor when the request has a `Guide`, then `TemperatureLogitsWarper` and `TopPLogitsWarper` when sampling)
  and the request's seeded `torch.Generator` (shared by its choices, so a seeded request repeats exactly).
- `choose(input_ids, logits)` takes the whole sequence so far (`input_ids`: LongTensor [1, L], prompt + generated)
  and the model's next-token logits (FloatTensor [1, V], float32) and returns `(token_id, logprob, top)`: the
  sampled token, its logprob in the model's raw distribution (log-softmax of `logits`, before any processor: what
  vLLM reports by default) and the `top_logprobs` best `(id, logprob)` pairs, or `(token_id, None, ())` when the
  request asked for no logprobs. Greedy (argmax of the processed logits) when `params.greedy`.
- Ranges are the schema's (`api/schemas.py`); temperatures below `GREEDY_BELOW_TEMPERATURE` decode greedily, and a
  top_p so small that no token reaches it keeps the single most likely token (transformers' `min_tokens_to_keep`).

Why one class of our own: transformers has no additive (OpenAI-style) presence/frequency penalty, only the
multiplicative CTRL repetition penalty; everything else here is transformers' own processors. The decode loop stays
in the engine because it pins adapters per request and cancels per token (`generate()` does neither).
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .base import SamplingParams


class OpenAIPenaltiesLogitsProcessor(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the generated tokens (not the prompt):
    `logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)` (OpenAI API reference,
    "Parameter details"; vLLM applies the same to output tokens)."""

    def __init__(self, presence_penalty: float, frequency_penalty: float, prompt_len: int):
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(scores.dtype)


class ChoiceSampler:
    """See the module docstring."""

    def __init__(self, params: SamplingParams, prompt_len: int, generator: torch.Generator,
                 guide: LogitsProcessor | None = None):
        self.params = params
        self.generator = generator
        processors = LogitsProcessorList()
        if params.presence_penalty or params.frequency_penalty:
            processors.append(OpenAIPenaltiesLogitsProcessor(params.presence_penalty, params.frequency_penalty,
                                                             prompt_len))
        if params.logit_bias:
            processors.append(SequenceBiasLogitsProcessor([[[tok], bias] for tok, bias in params.logit_bias]))
        if guide is not None:
            processors.append(guide)
        if not params.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(float(params.top_p)))
        self.processors = processors

    @property
    def plain_greedy(self) -> bool:
        """True when the choice is the argmax of the raw logits (greedy, no processor, no logprobs): a batch picks
        those rows' tokens with one batched argmax instead of calling `choose`."""
        return self.params.greedy and not self.processors and not self.params.logprobs

    def choose(self, input_ids: torch.LongTensor, logits: torch.FloatTensor
               ) -> tuple[int, float | None, list[tuple[int, float]]]:
        scores = self.processors(input_ids, logits) if self.processors else logits
        if self.params.greedy:
            token = int(torch.argmax(scores[0]))
        else:
            probs = torch.softmax(scores[0], dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if not self.params.logprobs:
            return token, None, []
        raw = torch.log_softmax(logits[0], dim=-1)
        top: list[tuple[int, float]] = []
        if self.params.top_logprobs:
            values, ids = torch.topk(raw, min(self.params.top_logprobs, raw.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist()))
        return token, float(raw[token]), top
