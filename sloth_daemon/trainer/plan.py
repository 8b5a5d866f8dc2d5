"""How much one update trains: the number of mixed batches and the tokens per optimizer step, from the data.

Contract:
- `planned_steps(train, n_new, new_per_batch)`: `train.steps` when set (a fixed count); otherwise enough batches
  for `train.epochs` passes over the `n_new` new training examples, each batch carrying `new_per_batch` of them
  (the rest replay and anchors, `sloth_replay.batch_counts`), clamped to [`train.min_steps`, `train.max_steps`]:
  a handful of new facts still gets the repeats that exact recall needs, a large set gets epochs instead of a fixed
  120 steps that sample most examples once or never.
- `step_tokens(train, device)`: tokens per optimizer step when batches are packed (`train.step_tokens`; "auto" =
  4096 on CUDA, where a step of a few hundred tokens leaves the GPU waiting on the host, 0 on CPU, where a step
  costs in proportion to its tokens anyway); 0 when packing is off.
"""

from __future__ import annotations

import math

from ..config import TrainConfig

GPU_STEP_TOKENS = 4096


def planned_steps(train: TrainConfig, n_new: int, new_per_batch: int) -> int:
    if train.steps is not None:
        return train.steps
    wanted = math.ceil(train.epochs * n_new / max(1, new_per_batch))
    return max(train.min_steps, min(train.max_steps, wanted))


def step_tokens(train: TrainConfig, device: str) -> int:
    if not train.pack:
        return 0
    if train.step_tokens == "auto":
        return GPU_STEP_TOKENS if device.startswith("cuda") else 0
    return int(train.step_tokens)
