"""Choosing what one update trains and evaluates on: the held-out split and the mixed batches.

Contract:
- `MixRatios`: shares of each batch taken from new, replayed and anchor examples; non-negative, not all zero,
  normalised to sum to 1 on construction.
- `split_holdout`: holds out ``round(fraction * n)`` (at least 1, at most n - 1) of the new examples for the eval
  gate, but only when there are at least `min_examples` of them; otherwise returns ``(new, [])`` and the caller
  evaluates on the training examples (and must say so). The choice depends only on the seed and the example ids,
  not on list order.
- `build_batches`: `steps` batches of exactly `batch_size` examples. Every batch has the same make-up:
  ``round(ratio * batch_size)`` replay and anchor examples, the rest new (at least one new example per batch);
  an empty pool's share goes to new. Each pool is drawn by walking a seeded permutation and reshuffling when it
  runs out, so draws are uniform over the pool and every example of a pool is used equally often (counts differ
  by at most one). Deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .examples import Example


class MixRatios(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    new: float = Field(default=0.5, ge=0)
    replay: float = Field(default=0.3, ge=0)
    anchor: float = Field(default=0.2, ge=0)

    @model_validator(mode="after")
    def _normalise(self) -> "MixRatios":
        total = self.new + self.replay + self.anchor
        if total <= 0:
            raise ValueError("mix ratios must not all be zero")
        self.new, self.replay, self.anchor = self.new / total, self.replay / total, self.anchor / total
        return self


def split_holdout(
    new: list[Example], *, fraction: float, min_examples: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split new examples into (train, held_out); both keep the input order. See the module docstring."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), not {fraction}")
    n = len(new)
    if fraction == 0.0 or n < min_examples:
        return list(new), []
    k = min(max(1, round(fraction * n)), n - 1)  # never hold out everything: something must be trained on
    if k <= 0:
        return list(new), []
    order = sorted(range(n), key=lambda i: new[i].id)
    random.Random(f"holdout/{seed}").shuffle(order)
    held = set(order[:k])
    return [e for i, e in enumerate(new) if i not in held], [e for i, e in enumerate(new) if i in held]


class _Cycler:
    """Draws from a pool by walking seeded permutations, reshuffling at the end of each pass."""

    def __init__(self, pool: Sequence[Example], rng: random.Random):
        self._pool = pool
        self._rng = rng
        self._order: list[int] = []

    def take(self, k: int) -> list[Example]:
        out = []
        while len(out) < k:
            if not self._order:
                self._order = list(range(len(self._pool)))
                self._rng.shuffle(self._order)
            out.append(self._pool[self._order.pop()])
        return out


def batch_counts(
    ratios: MixRatios, batch_size: int, *, has_replay: bool, has_anchors: bool
) -> tuple[int, int, int]:
    """(new, replay, anchor) examples per batch; empty pools give their share to new; at least one new."""
    n_replay = round(ratios.replay * batch_size) if has_replay else 0
    n_anchor = round(ratios.anchor * batch_size) if has_anchors else 0
    while n_replay + n_anchor > batch_size - 1:
        if n_replay >= n_anchor:
            n_replay -= 1
        else:
            n_anchor -= 1
    return batch_size - n_replay - n_anchor, n_replay, n_anchor


def build_batches(
    new: list[Example],
    replay: list[Example],
    anchors: list[Example],
    *,
    ratios: MixRatios,
    steps: int,
    batch_size: int,
    seed: int,
) -> list[list[Example]]:
    """`steps` mixed batches of `batch_size` examples. See the module docstring."""
    if not new:
        raise ValueError("an update needs at least one new example")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1 (got steps={steps}, batch_size={batch_size})")
    n_new, n_replay, n_anchor = batch_counts(
        ratios, batch_size, has_replay=bool(replay), has_anchors=bool(anchors)
    )
    # One stream per pool, so changing one pool's size does not change what is drawn from the others.
    pools = [
        (_Cycler(new, random.Random(f"new/{seed}")), n_new),
        (_Cycler(replay, random.Random(f"replay/{seed}")), n_replay),
        (_Cycler(anchors, random.Random(f"anchor/{seed}")), n_anchor),
    ]
    return [[ex for cycler, k in pools for ex in cycler.take(k)] for _ in range(steps)]
