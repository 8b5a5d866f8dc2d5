"""Encoded examples as one right-padded batch: shared by the training steps (`recipe`) and the gate's scoring
(`scoring`), which `recipe` imports (so this lives apart from both).

Contract: `collate_encoded(pairs, pad, device)` -> {input_ids, labels, attention_mask}, each int64 [B, T] on
`device` with T the longest pair; labels are IGNORE_INDEX (-100) on padding. `pad_id(tokenizer)` is the id padding
uses: the tokenizer's pad token, else its end-of-sequence token, else 0.
"""

from __future__ import annotations

from typing import Any

import torch

from ..prompting import IGNORE_INDEX


def pad_id(tokenizer: Any) -> int:
    """The padding id of `tokenizer` (module docstring)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def collate_encoded(pairs: list[tuple[list[int], list[int]]], pad: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Already encoded (input ids, labels) pairs as one right-padded batch (module docstring)."""
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
