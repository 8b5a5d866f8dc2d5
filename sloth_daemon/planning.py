"""What one update trains on and what its gate judges: `plan_update` turns the store's pools into a `Plan`.

Contract:
- New examples that contradict an anchor or an earlier learnt example (`gate.find_conflicts`) are not trained on;
  they are returned in `Plan.conflicts` ({id: reason}) for the updater to set aside.
- The rest are split into trained and held-out new examples (`sloth_replay.split_holdout`, only when at least
  `gate.min_holdout_examples` wait; otherwise `heldout_note` says why none were held out). Held-out new examples
  are not claimed by the update: they stay pending and are trained by a later one.
- Anchors are split by `gate.heldout_anchors`: the training part is mixed into batches, the held-out part is only
  judged.
- Eval sets (at most `gate.max_eval_examples` each, sampled with the seed): "new" (trained new examples),
  "new_heldout", "anchor" (held-out anchors), "recall" (earlier learnt examples, from the replay pool).
- A rebuild (`rebuild=True`: the served adapter was trained on forgotten data, so a fresh LoRA is trained on what
  remains) trains on every learnt example as well as the pending ones: the replay pool joins the trained new
  examples (never held out) and nothing is left to replay. Its "forgotten" eval set holds the forgotten examples
  (all of them: the gate checks that none of their answers came back).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from sloth_replay import Example, split_holdout

from .config import GateConfig
from .gate import find_conflicts, heldout_anchors


def _sample(examples: list[Any], n: int, seed: int) -> list[Any]:
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(examples, n)


@dataclass
class Plan:
    train_new: list[Example]
    heldout_new: list[Example]
    replay: list[Example]
    train_anchors: list[Example]
    heldout_anchors: list[Example]
    conflicts: dict[str, str]
    heldout_note: str | None
    eval_sets: dict[str, list[Example]] = field(default_factory=dict)
    rebuild: bool = False

    @property
    def trained_ids(self) -> list[str]:
        return [e.id for e in self.train_new]

    def summary(self) -> dict:
        """Counts and reasons for the update's record."""
        return {"new_trained": len(self.train_new), "new_heldout": len(self.heldout_new),
                "replay_pool": len(self.replay), "anchors_trained": len(self.train_anchors),
                "anchors_heldout": len(self.heldout_anchors), "conflicts": self.conflicts,
                "heldout_note": self.heldout_note, "rebuild": self.rebuild,
                "eval_examples": {k: len(v) for k, v in self.eval_sets.items()}}


def plan_update(pending: list[Example], replay: list[Example], anchors: list[Example], gate: GateConfig, *,
                seed: int, forgotten: list[Example] | None = None) -> Plan:
    """The plan for one update (see the module docstring); deterministic for a given seed. `forgotten` not None
    makes it a rebuild."""
    conflicts = find_conflicts(pending, replay, anchors)
    usable = [e for e in pending if e.id not in conflicts]
    train_new, heldout = split_holdout(usable, fraction=gate.holdout_fraction,
                                       min_examples=gate.min_holdout_examples, seed=seed)
    if forgotten is not None:
        train_new, replay = [*replay, *train_new], []
    note = None
    if not heldout:
        note = ("not held out: gate.holdout_fraction is 0, so new examples are judged only on what was trained"
                if gate.holdout_fraction == 0 else
                f"not held out: only {len(usable)} new example(s) wait and holding some out needs at least "
                f"{gate.min_holdout_examples}; the new examples are judged only on what was trained")
    train_anchors, held_anchors = heldout_anchors(anchors, gate.anchor_holdout_fraction)
    n = gate.max_eval_examples
    plan = Plan(train_new=train_new, heldout_new=heldout, replay=replay, train_anchors=train_anchors,
                heldout_anchors=held_anchors, conflicts=conflicts, heldout_note=note)
    plan.eval_sets = {
        "new": _sample(train_new, n, seed),
        "new_heldout": _sample(heldout, n, seed),
        "anchor": _sample(held_anchors, n, seed),
        "recall": _sample(replay, n, seed),
    }
    if forgotten is not None:
        plan.rebuild = True
        plan.eval_sets["recall"] = _sample([e for e in train_new if e.id not in {x.id for x in usable}], n, seed)
        plan.eval_sets["forgotten"] = list(forgotten)
    return plan
