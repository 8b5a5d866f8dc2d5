"""The eval gate: decides from a `TrainResult`'s before/after losses whether a candidate adapter may be served.

Rules (bounds from `GateConfig`):
- new:    loss on the new examples (held out when there were enough, else the training ones, and the verdict says
          which) must fall by more than `min_new_loss_improvement`.
- anchor: loss on the anchor set (the base model's own answers) may rise at most `max_anchor_loss_increase`
          (relative) plus `anchor_loss_tolerance` (absolute).
- recall: loss on earlier, already-learnt examples may rise at most `max_recall_loss_increase` plus the same slack.
A missing or non-finite score fails its check; an empty anchor/recall set is skipped and said so.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from .config import GateConfig
from .trainer.job import EvalScores


class Check(BaseModel):
    name: str
    passed: bool
    detail: str


class Verdict(BaseModel):
    promote: bool
    reason: str
    checks: list[Check]


def _finite(*xs: float | None) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def _bounded_rise(name: str, s: EvalScores | None, rel: float, tol: float) -> Check:
    if s is None or s.examples == 0:
        return Check(name=name, passed=True, detail="no examples: skipped")
    if not _finite(s.parent, s.candidate):
        return Check(name=name, passed=False, detail=f"non-finite loss ({s.parent} -> {s.candidate})")
    bound = s.parent * (1 + rel) + tol
    ok = s.candidate <= bound
    return Check(name=name, passed=ok, detail=f"loss {s.parent:.4f} -> {s.candidate:.4f} (bound {bound:.4f})")


def judge(scores: dict[str, EvalScores], cfg: GateConfig, *, new_is_heldout: bool) -> Verdict:
    checks = []
    new = scores.get("new")
    where = "held-out" if new_is_heldout else "training"
    if new is None or new.examples == 0:
        checks.append(Check(name="new", passed=False, detail="no new examples were scored"))
    elif not _finite(new.parent, new.candidate):
        checks.append(Check(name="new", passed=False, detail=f"non-finite loss ({new.parent} -> {new.candidate})"))
    else:
        target = new.parent - cfg.min_new_loss_improvement
        checks.append(Check(
            name="new", passed=new.candidate < target,
            detail=f"loss on {new.examples} {where} new examples {new.parent:.4f} -> {new.candidate:.4f} (must be < {target:.4f})",
        ))
    checks.append(_bounded_rise("anchor", scores.get("anchor"), cfg.max_anchor_loss_increase, cfg.anchor_loss_tolerance))
    checks.append(_bounded_rise("recall", scores.get("recall"), cfg.max_recall_loss_increase, cfg.anchor_loss_tolerance))
    failed = [c for c in checks if not c.passed]
    reason = "all checks passed" if not failed else "; ".join(f"{c.name}: {c.detail}" for c in failed)
    return Verdict(promote=not failed, reason=reason, checks=checks)
