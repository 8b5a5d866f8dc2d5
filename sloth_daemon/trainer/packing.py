"""Sequence packing: many short examples in a few long rows, with no attention and no loss across examples.

Contract:
- `pack(examples, row_tokens, pad_id)` takes encoded examples (`(input_ids, labels)` pairs as `prompting.
  encode_example` makes them) and returns a `Packed` batch: `input_ids`, `labels` and `position_ids`, each a
  `torch.long` tensor of shape `[rows, width]`, and `spans` (for each example, in input order, its `(row, start,
  length)`). Examples go into rows first-fit by decreasing length (a row holds at most `max(row_tokens, longest
  example)` tokens); `width` is the fullest row's length, so no row is padded past it. Every example's position ids
  restart at 0, which is how transformers' masking (`masking_utils.find_packed_sequence_indices`, used when
  `attention_mask` is None and there is no cache) builds a block-diagonal causal mask: no token attends to another
  example. A row's padding tail is one more sequence of pad tokens (positions 0.., labels ignored). The first label
  of every example is ignored: unpacked, position 0 is never predicted, packed, it would be predicted from the end
  of the previous example. So the loss of a packed batch (mean over its non-ignored labels) equals the loss of the
  same examples padded one per row (tests/test_packing.py checks it on sloth-tiny).
- `token_losses(model, packed)` scores a packed batch under `torch.no_grad()` and returns, per example, the summed
  answer-token loss (float, nats) and the number of scored tokens (the eval gate's per-example figures).

Why our own: packing with per-example position ids is what transformers' `DataCollatorWithFlattening` does, but
that collator flattens a whole batch into one row (flash-attention's varlen format) and leaves row widths to the
caller; here rows have a token budget (a bounded attention cost, one optimizer step's worth of tokens in a few
rows), and labels come from our prompt/answer encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..prompting import IGNORE_INDEX

Encoded = tuple[list[int], list[int]]


@dataclass
class Packed:
    input_ids: torch.Tensor     # [rows, width] long
    labels: torch.Tensor        # [rows, width] long, IGNORE_INDEX where no loss is taken
    position_ids: torch.Tensor  # [rows, width] long, restarting at 0 for every example
    spans: list[tuple[int, int, int]]  # per input example: (row, start, length)

    @property
    def tokens(self) -> int:
        """Example tokens in the batch (padding excluded)."""
        return sum(length for _, _, length in self.spans)

    def to(self, device: torch.device | str) -> "Packed":
        return Packed(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device), self.spans)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a transformers causal LM's forward (no attention mask: the positions say it all)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "labels": self.labels,
                "use_cache": False}


def assign_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows, first fit by decreasing length, each row's sum <= the budget
    (`max(row_tokens, max(lengths))`)."""
    budget = max([row_tokens, *lengths])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def pack(examples: list[Encoded], row_tokens: int, pad_id: int) -> Packed:
    """Pack encoded examples into rows. See the module docstring."""
    if not examples:
        raise ValueError("nothing to pack")
    lengths = [len(ids) for ids, _ in examples]
    if min(lengths) < 1:
        raise ValueError("an example has no tokens")
    rows = assign_rows(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    spans: list[tuple[int, int, int] | None] = [None] * len(examples)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids, labs = examples[i]
            n = len(ids)
            input_ids[r, start:start + n] = torch.tensor(ids)
            labels[r, start + 1:start + n] = torch.tensor(labs[1:n])
            positions[r, start:start + n] = torch.arange(n)
            spans[i] = (r, start, n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the padding tail: a sequence of its own
    return Packed(input_ids, labels, positions, spans)  # type: ignore[arg-type]


@torch.no_grad()
def token_losses(model: Any, packed: Packed) -> list[tuple[float, int]]:
    """Per example of `packed` (input order): (summed answer-token cross-entropy in nats, scored tokens)."""
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = packed.labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none",
    ).view(targets.shape)
    scored = targets != IGNORE_INDEX
    results = []
    for row, start, length in packed.spans:
        # Labels of positions start+1 .. start+length-1 are predicted at start .. start+length-2.
        sl = slice(start, start + length - 1)
        results.append((float(per_token[row, sl].sum()), int(scored[row, sl].sum())))
    return results
