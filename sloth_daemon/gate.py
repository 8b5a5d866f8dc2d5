"""The eval gate: what an update may train on, and whether its candidate adapter may be served.

Before training (`heldout_anchors`, `find_conflicts`):
- Anchors are split once and for all into a training part and a held-out part (`gate.anchor_holdout_fraction`,
  chosen by a hash of each anchor's id, so the same probes stay held out in every update): held-out probes are never
  trained on, so the anchor checks measure general behaviour on data the update did not see.
- A new example whose prompt is the prompt of an anchor or of an earlier learnt example, with a different answer,
  contradicts it. It is not trained on: the update sets it aside with the reason (replacing an earlier answer is an
  explicit user action: forgetting the earlier example makes the new one pending again, `sloth_replay.forgetting`).

After training (`judge`, on `TrainResult.eval`, per example scores from `trainer.scoring`). Each check records its
measurement, its bound and its result:
- new:          loss on the new examples trained on must fall below parent loss - `min_new_loss_improvement`.
- new_heldout:  loss on held-out new examples may rise at most `max_anchor_loss_increase` (relative) plus
                `anchor_loss_tolerance`; when too few new examples wait to hold some out, the check says so.
- anchor_loss:  the same bound on the held-out anchors' loss.
- anchor_kl:    mean KL(base || candidate) per answer token on the held-out anchors <= `max_anchor_kl` (nats).
- anchor_kl_rise: that KL minus the parent's <= `max_anchor_kl_rise`: one update may move general behaviour only so
                far (the cumulative bound alone lets one bad update spend what many good ones would; garbage answers
                to general prompts are caught by their jump, bench_retention's poisoned round).
- anchor_kl_median_rise: the median over held-out anchors of each one's KL rise (candidate minus parent) <=
                `max_anchor_kl_median_rise`: how far the *typical* general prompt moved. An update of a few facts
                moves the one or two probes near what it taught and leaves the rest (median rise 0.000-0.006 on
                sloth-tiny), while garbage answers to general prompts, or training without anchors, move most of them
                (0.014-0.02, bench_retention); the mean alone mixes the two, as one sensitive probe can rise as much as
                many drifting ones. The anchors that rose more than the bound are listed.
- anchor_answers, recall_answers: of the held-out anchors (the base's own greedy answers) and of a sample of earlier
                learnt examples, those the parent answered exactly under greedy decoding and the candidate no longer
                does: at most `max_anchor_answers_lost` / `max_answers_lost` of them (a share, rounded down).
- recall_loss:  the recall sample's mean loss may rise at most `max_recall_loss_increase` (relative) plus
                `recall_loss_floor` (absolute: learnt examples have losses near zero, where a relative bound alone
                would trip on noise).
- forgotten:    (a rebuild only) of the forgotten examples, those the candidate answers exactly under greedy
                decoding and the base model does not: none allowed (what was forgotten must not come back; an
                answer the base model gives anyway is not the adapter's doing).
A missing or non-finite score fails its check; an empty set is skipped and said so.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
from typing import Any

from pydantic import BaseModel

from .config import GateConfig
from .trainer.job import EvalScores


class Check(BaseModel):
    """One gate check: what was measured, the bound it was held to, and the examples that failed it (ids)."""

    name: str
    passed: bool
    detail: str
    measured: float | None = None
    bound: float | None = None
    examples: int = 0
    failing: list[str] = []


class Verdict(BaseModel):
    promote: bool
    reason: str
    checks: list[Check]


# -- before training -------------------------------------------------------------------------------------------------

def heldout_anchors(anchors: list[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """Split anchors into (train, held_out): the `round(fraction * n)` anchors (at least 1 when n >= 2, never all)
    whose sha256(id) sort first. Depends only on the ids, so a probe stays held out in every update."""
    if fraction <= 0 or len(anchors) < 2:
        return list(anchors), []
    k = min(max(1, round(fraction * len(anchors))), len(anchors) - 1)
    held = {a.id for a in sorted(anchors, key=lambda a: hashlib.sha256(a.id.encode()).hexdigest())[:k]}
    return [a for a in anchors if a.id not in held], [a for a in anchors if a.id in held]


def prompt_key(kind: str, prompt: Any) -> str | None:
    """What makes two prompts 'the same' for contradiction checks: kind plus each message's role and content,
    case-folded with whitespace collapsed. None for documents (they have no prompt)."""
    if prompt is None:
        return None

    def norm(text: str) -> str:
        return re.sub(r"\s+", " ", text).strip().casefold()

    if isinstance(prompt, str):
        return f"{kind}\x00{norm(prompt)}"
    return kind + "".join(f"\x00{m['role']}\x01{norm(m['content'])}" for m in prompt)


def _offered_key(e: Any) -> str | None:
    """`prompt_key` plus the names of the tools offered (the same words with other tools are another prompt)."""
    key = prompt_key(e.kind, e.prompt)
    tools = getattr(e, "tools", None)
    if key is None or not tools:
        return key
    return key + "\x00tools\x01" + ",".join(sorted(t["function"]["name"] for t in tools))


def _answer_key(e: Any) -> tuple:
    """An answer as compared for contradictions: its text, and the calls it makes (name and arguments)."""
    calls = getattr(e, "tool_calls", None) or ()
    return e.answer.strip(), tuple((c["function"]["name"], c["function"]["arguments"]) for c in calls)


def find_conflicts(new: list[Any], learnt: list[Any], anchors: list[Any]) -> dict[str, str]:
    """New examples that contradict an anchor or an earlier learnt example (same `prompt_key`, different answer):
    {new example id: reason naming the earlier example and its answer}."""
    earlier: dict[str, Any] = {}
    for e in [*anchors, *learnt]:
        key = _offered_key(e)
        if key is not None:
            earlier.setdefault(key, e)
    out = {}
    for e in new:
        old = earlier.get(_offered_key(e) or "")
        if old is not None and _answer_key(old) != _answer_key(e):
            if old.source == "anchor":
                what, how = ("an anchor (the base model's own answer)",
                             "anchors are not replaced (forget this example to drop it)")
            else:
                what, how = f"learnt example {old.id}", f"to replace that answer, forget {old.id} (this one is then " \
                                                       "pending again)"
            out[e.id] = f"contradicts {what}, which answers the same prompt with {_clip(old.answer)!r}; {how}"
    return out


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# -- after training --------------------------------------------------------------------------------------------------

def _finite(*xs: float | None) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def _skip(name: str, why: str) -> Check:
    return Check(name=name, passed=True, detail=why)


def _loss_rise(name: str, s: EvalScores | None, what: str, rel: float, tol: float) -> Check:
    if s is None or s.examples == 0:
        return _skip(name, f"no {what}: skipped")
    if not _finite(s.parent, s.candidate):
        return Check(name=name, passed=False, detail=f"non-finite loss on {what} ({s.parent} -> {s.candidate})",
                     examples=s.examples)
    bound = s.parent * (1 + rel) + tol
    ok = s.candidate <= bound
    return Check(name=name, passed=ok, measured=s.candidate, bound=bound, examples=s.examples,
                 detail=f"loss on {s.examples} {what} {s.parent:.4f} -> {s.candidate:.4f} "
                        f"({'within' if ok else 'above'} bound {bound:.4f})")


def _answers_lost(name: str, s: EvalScores | None, what: str, max_share: float) -> Check:
    if s is None or s.examples == 0:
        return _skip(name, f"no {what}: skipped")
    if len(s.parent_exact) != s.examples or len(s.candidate_exact) != s.examples:
        return Check(name=name, passed=False, detail=f"greedy answers on {what} were not scored", examples=s.examples)
    kept_before = [i for i, ok in enumerate(s.parent_exact) if ok]
    lost = [s.ids[i] if i < len(s.ids) else str(i) for i in kept_before if not s.candidate_exact[i]]
    allowed = math.floor(max_share * len(kept_before))
    ok = len(lost) <= allowed
    now = sum(s.candidate_exact)
    return Check(name=name, passed=ok, measured=float(len(lost)), bound=float(allowed), examples=s.examples,
                 failing=lost,
                 detail=f"{len(lost)} of the {len(kept_before)} {what} answered exactly before are no longer "
                        f"(allowed {allowed}); exact now {now}/{s.examples}")


def _kl(name: str, s: EvalScores | None, what: str, bound: float) -> Check:
    if s is None or s.examples == 0:
        return _skip(name, f"no {what}: skipped")
    if not _finite(s.candidate_kl):
        return Check(name=name, passed=False, detail=f"KL to the base on {what} was not measured",
                     examples=s.examples)
    ok = s.candidate_kl <= bound
    before = f"{s.parent_kl:.4f} -> " if _finite(s.parent_kl) else ""
    return Check(name=name, passed=ok, measured=s.candidate_kl, bound=bound, examples=s.examples,
                 detail=f"KL(base || model) on {s.examples} {what}: {before}{s.candidate_kl:.4f} nats/token "
                        f"({'within' if ok else 'above'} bound {bound:.4f})")


def _forgotten(s: EvalScores) -> Check:
    if s.examples == 0:
        return _skip("forgotten", "no forgotten examples kept to check: skipped")
    if len(s.parent_exact) != s.examples or len(s.candidate_exact) != s.examples:
        return Check(name="forgotten", passed=False, detail="greedy answers on forgotten examples were not scored",
                     examples=s.examples)
    back = [s.ids[i] for i in range(s.examples) if s.candidate_exact[i] and not s.parent_exact[i]]
    return Check(name="forgotten", passed=not back, measured=float(len(back)), bound=0.0, examples=s.examples,
                 failing=back, detail=f"{len(back)} of {s.examples} forgotten examples are still answered exactly "
                                      f"(the base model does not answer them so; allowed 0)")


def _kl_rise(s: EvalScores | None, bound: float) -> Check:
    if s is None or s.examples == 0:
        return _skip("anchor_kl_rise", "no held-out anchors: skipped")
    if not _finite(s.candidate_kl):
        return Check(name="anchor_kl_rise", passed=False, examples=s.examples,
                     detail="KL to the base on held-out anchors was not measured")
    parent = s.parent_kl if _finite(s.parent_kl) else 0.0  # a fresh LoRA is the base: KL 0
    rise = s.candidate_kl - parent
    ok = rise <= bound
    return Check(name="anchor_kl_rise", passed=ok, measured=rise, bound=bound, examples=s.examples,
                 detail=f"KL(base || model) on {s.examples} held-out anchors rose {parent:.4f} -> "
                        f"{s.candidate_kl:.4f} (+{rise:.4f} nats/token, {'within' if ok else 'above'} the per-update "
                        f"bound {bound:.4f})")


def _kl_median_rise(s: EvalScores | None, bound: float) -> Check:
    name = "anchor_kl_median_rise"
    if s is None or s.examples == 0:
        return _skip(name, "no held-out anchors: skipped")
    if len(s.candidate_kls) != s.examples or s.parent_kls and len(s.parent_kls) != s.examples:
        return Check(name=name, passed=False, examples=s.examples,
                     detail="per-anchor KL to the base on held-out anchors was not measured")
    parent = s.parent_kls or [0.0] * s.examples  # a fresh LoRA is the base: KL 0
    rises = [c - p for c, p in zip(s.candidate_kls, parent)]
    if not _finite(*rises):
        return Check(name=name, passed=False, examples=s.examples, detail=f"non-finite per-anchor KL ({rises})")
    median = statistics.median(rises)
    ok = median <= bound
    moved = [s.ids[i] if i < len(s.ids) else str(i) for i in sorted(range(len(rises)), key=lambda i: -rises[i])
             if rises[i] > bound]
    return Check(name=name, passed=ok, measured=median, bound=bound, examples=s.examples, failing=moved,
                 detail=f"median per-anchor KL(base || model) rise on {s.examples} held-out anchors +{median:.4f} "
                        f"nats/token ({'within' if ok else 'above'} bound {bound:.4f}); {len(moved)} of "
                        f"{s.examples} rose more than the bound"
                        + ("" if ok else ": the update moved general behaviour broadly, not only near what it "
                                          "taught (garbage or off-topic answers, or too few anchors in the mix)"))


def judge(scores: dict[str, EvalScores], cfg: GateConfig, *, heldout_note: str | None = None,
          rebuild: bool = False) -> Verdict:
    """The verdict on a candidate from its eval scores (sets "new", "new_heldout", "anchor", "recall", and
    "forgotten" for a rebuild; see the module docstring). `heldout_note` explains why no new examples were held
    out (None when some were); `rebuild`: the candidate is a fresh LoRA trained on everything learnt."""
    checks = []
    new = scores.get("new")
    if new is None or new.examples == 0:
        checks.append(Check(name="new", passed=False, detail="no new examples were scored"))
    elif not _finite(new.parent, new.candidate):
        checks.append(Check(name="new", passed=False, examples=new.examples,
                            detail=f"non-finite loss ({new.parent} -> {new.candidate})"))
    else:
        target = new.parent - cfg.min_new_loss_improvement
        exact = f"; exact now {sum(new.candidate_exact)}/{new.examples}" if new.candidate_exact else ""
        checks.append(Check(
            name="new", passed=new.candidate < target, measured=new.candidate, bound=target, examples=new.examples,
            detail=f"loss on {new.examples} new examples trained on {new.parent:.4f} -> {new.candidate:.4f} "
                   f"(must be < {target:.4f}){exact}",
        ))
    if heldout_note is not None:
        checks.append(_skip("new_heldout", heldout_note))
    else:
        checks.append(_loss_rise("new_heldout", scores.get("new_heldout"), "held-out new examples",
                                 cfg.max_anchor_loss_increase, cfg.anchor_loss_tolerance))
    anchor = scores.get("anchor")
    checks.append(_loss_rise("anchor_loss", anchor, "held-out anchors", cfg.max_anchor_loss_increase,
                             cfg.anchor_loss_tolerance))
    checks.append(_kl("anchor_kl", anchor, "held-out anchors", cfg.max_anchor_kl))
    if rebuild:  # a fresh LoRA: its rise from the base is all that was learnt, which anchor_kl bounds
        checks.append(_skip("anchor_kl_rise", "a rebuild starts from the base model: judged by anchor_kl alone"))
        checks.append(_skip("anchor_kl_median_rise", "a rebuild starts from the base model: judged by anchor_kl "
                                                     "alone"))
    else:
        checks.append(_kl_rise(anchor, cfg.max_anchor_kl_rise))
        checks.append(_kl_median_rise(anchor, cfg.max_anchor_kl_median_rise))
    checks.append(_answers_lost("anchor_answers", anchor, "held-out anchors", cfg.max_anchor_answers_lost))
    recall = scores.get("recall")
    checks.append(_answers_lost("recall_answers", recall, "earlier learnt examples", cfg.max_answers_lost))
    checks.append(_loss_rise("recall_loss", recall, "earlier learnt examples", cfg.max_recall_loss_increase,
                             cfg.recall_loss_floor))
    if "forgotten" in scores:
        checks.append(_forgotten(scores["forgotten"]))
    failed = [c for c in checks if not c.passed]
    reason = "all checks passed" if not failed else "; ".join(f"{c.name}: {c.detail}" for c in failed)
    return Verdict(promote=not failed, reason=reason, checks=checks)
