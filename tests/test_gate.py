"""The eval gate: its checks on per-example scores, the held-out anchor split, contradiction detection, and the
update plan (what is trained, held out and judged)."""

from sloth_daemon.config import GateConfig
from sloth_daemon.gate import find_conflicts, heldout_anchors, judge
from sloth_daemon.planning import plan_update
from sloth_daemon.trainer.job import EvalScores
from sloth_replay import make_example


def s(parent, candidate, n=4, *, before=None, after=None, kl=None):
    before = [True] * n if before is None else before
    after = [True] * n if after is None else after
    return EvalScores(parent=parent, candidate=candidate, examples=n, ids=[f"ex_{i}" for i in range(n)],
                      parent_exact=before, candidate_exact=after, candidate_kl=kl, parent_kl=0.0 if kl else None,
                      candidate_kls=[kl] * n if kl else [], parent_kls=[0.0] * n if kl else [])


def good(**over):
    scores = {"new": s(2.0, 0.5), "anchor": s(1.0, 1.1, kl=0.01), "recall": s(0.02, 0.03)}
    scores.update(over)
    return scores


def checks(v):
    return {c.name: c for c in v.checks}


def test_promotes_when_new_improves_and_nothing_regresses():
    v = judge(good(), GateConfig(), heldout_note="not held out: only 4 new example(s) wait")
    assert v.promote and v.reason == "all checks passed"
    c = checks(v)
    assert c["new_heldout"].detail.startswith("not held out: only 4")
    assert (c["anchor_kl"].measured, c["anchor_kl"].bound) == (0.01, GateConfig().max_anchor_kl)
    assert c["recall_answers"].measured == 0 and c["recall_answers"].examples == 4


def test_rejects_when_new_does_not_improve():
    v = judge(good(new=s(1.0, 1.0)), GateConfig(), heldout_note="x")
    assert not v.promote and v.reason.startswith("new:") and "trained on" in v.reason


def test_recall_judged_per_example_by_greedy_answers_not_the_mean_loss():
    # The mean loss barely moves (well inside its bound) but two learnt answers are now wrong: rejected, naming them.
    recall = s(0.01, 0.012, n=40, after=[True] * 38 + [False] * 2)
    v = judge(good(recall=recall), GateConfig(max_answers_lost=0.0), heldout_note="x")
    c = checks(v)
    assert not v.promote and not c["recall_answers"].passed and c["recall_loss"].passed
    assert c["recall_answers"].failing == ["ex_38", "ex_39"] and c["recall_answers"].measured == 2
    assert v.reason.startswith("recall_answers: 2 of the 40 earlier learnt examples")
    # An allowance as a share of what was right before: 5% of 40 = 2 may go.
    assert judge(good(recall=recall), GateConfig(max_answers_lost=0.05), heldout_note="x").promote
    # Answers the parent already got wrong do not count as lost.
    was_wrong = s(0.5, 0.6, n=4, before=[True, True, False, False], after=[True, True, False, False])
    assert checks(judge(good(recall=was_wrong), GateConfig(), heldout_note="x"))["recall_answers"].passed


def test_recall_loss_bound_is_relative_with_a_small_floor():
    cfg = GateConfig(max_recall_loss_increase=0.5, recall_loss_floor=0.05)
    assert judge(good(recall=s(0.01, 0.064)), cfg, heldout_note="x").promote        # 0.01*1.5+0.05 = 0.065
    v = judge(good(recall=s(0.01, 0.066)), cfg, heldout_note="x")
    assert not v.promote and v.reason.startswith("recall_loss:") and "above bound 0.0650" in v.reason


def test_anchor_kl_and_answers_on_held_out_probes():
    cfg = GateConfig(max_anchor_kl=0.1, max_anchor_answers_lost=0.0)
    v = judge(good(anchor=s(1.0, 1.0, kl=0.3)), cfg, heldout_note="x")
    assert not v.promote and "anchor_kl: KL(base || model) on 4 held-out anchors: 0.0000 -> 0.3000" in v.reason
    v = judge(good(anchor=s(1.0, 1.0, kl=0.01, after=[True, False, True, True])), cfg, heldout_note="x")
    assert not v.promote and checks(v)["anchor_answers"].failing == ["ex_1"]
    missing_kl = s(1.0, 1.0)
    assert not checks(judge(good(anchor=missing_kl), cfg, heldout_note="x"))["anchor_kl"].passed


def test_one_update_may_raise_the_anchor_kl_only_so_far():
    cfg = GateConfig(max_anchor_kl=0.25, max_anchor_kl_rise=0.06)
    def anchor(before, after):  # the whole rise on one of the 4 anchors: the median per-anchor rise stays 0
        return s(1.0, 1.0).model_copy(update={"parent_kl": before, "candidate_kl": after, "parent_kls": [before] * 4,
                                              "candidate_kls": [before] * 3 + [before + 4 * (after - before)]})

    assert judge(good(anchor=anchor(0.14, 0.19)), cfg, heldout_note="x").promote  # +0.05
    v = judge(good(anchor=anchor(0.142, 0.215)), cfg, heldout_note="x")  # bench_retention's garbage round
    c = checks(v)
    assert not v.promote and c["anchor_kl"].passed and not c["anchor_kl_rise"].passed
    assert v.reason.startswith("anchor_kl_rise: KL(base || model) on 4 held-out anchors rose 0.1420 -> 0.2150")
    assert abs(c["anchor_kl_rise"].measured - 0.073) < 1e-9 and c["anchor_kl_rise"].bound == 0.06
    # A rebuild starts from the base: its whole drift is judged by anchor_kl, not as one update's rise.
    v = judge(good(anchor=anchor(0.0, 0.2), forgotten=s(3.0, 2.0, before=[False] * 4, after=[False] * 4)), cfg,
              heldout_note="x", rebuild=True)
    assert v.promote and checks(v)["anchor_kl_rise"].detail.startswith("a rebuild")


def test_an_update_that_moves_most_held_out_anchors_is_refused_by_the_median_rise():
    # Per-anchor KL rises measured by bench_retention (kl anchors, weight decay 10): a round of 5 facts moves one
    # sensitive probe a lot and the rest hardly; 5 garbage answers to general prompts move most of them. The mean
    # rise (anchor_kl_rise) cannot tell them apart: 0.017 and 0.037, both under its bound.
    facts = [0.006, 0.161, 0.004, 0.013, 0.003, 0.006, 0.000, 0.001, 0.002, 0.001, 0.005, 0.003]
    garbage = [0.027, 0.232, 0.005, 0.025, 0.006, 0.010, 0.000, 0.041, 0.055, 0.008, 0.030, 0.002]
    base = [0.05 + i / 100 for i in range(12)]  # the parent's own per-anchor KL: rises are judged, not levels

    def anchor(rises):
        after = [b + r for b, r in zip(base, rises)]
        return EvalScores(parent=1.0, candidate=1.0, examples=12, ids=[f"an_{i}" for i in range(12)],
                          parent_exact=[True] * 12, candidate_exact=[True] * 12, parent_kl=sum(base) / 12,
                          candidate_kl=sum(after) / 12, parent_kls=base, candidate_kls=after)

    cfg = GateConfig(max_anchor_kl=0.25, max_anchor_kl_rise=0.06, max_anchor_kl_median_rise=0.01)
    v = judge(good(anchor=anchor(facts)), cfg, heldout_note="x")
    c = checks(v)["anchor_kl_median_rise"]
    assert v.promote and c.passed and abs(c.measured - 0.0035) < 1e-9 and c.failing == ["an_1", "an_3"]
    v = judge(good(anchor=anchor(garbage)), cfg, heldout_note="x")
    c = checks(v)
    assert not v.promote and c["anchor_kl_rise"].passed and not c["anchor_kl_median_rise"].passed
    assert abs(c["anchor_kl_median_rise"].measured - 0.0175) < 1e-9 and c["anchor_kl_median_rise"].bound == 0.01
    assert c["anchor_kl_median_rise"].failing[:3] == ["an_1", "an_8", "an_7"]
    assert v.reason.startswith("anchor_kl_median_rise: median per-anchor KL(base || model) rise on 12 held-out "
                               "anchors +0.0175 nats/token (above bound 0.0100); 6 of 12 rose more than the bound")
    assert "moved general behaviour broadly" in v.reason
    # The first update's parent is the base itself (no per-anchor KL measured): its rise is the candidate's KL.
    first = anchor(garbage).model_copy(update={"parent_kls": [], "parent_kl": 0.0})
    assert checks(judge(good(anchor=first), cfg, heldout_note="x"))["anchor_kl_median_rise"].measured > 0.06
    # Not measured (a candidate without per-anchor KL) fails; a rebuild is judged by anchor_kl alone.
    v = judge(good(anchor=anchor(garbage).model_copy(update={"candidate_kls": []})), cfg, heldout_note="x")
    assert not v.promote and "was not measured" in checks(v)["anchor_kl_median_rise"].detail
    v = judge(good(anchor=anchor(garbage)), cfg, heldout_note="x", rebuild=True)
    assert v.promote and checks(v)["anchor_kl_median_rise"].detail.startswith("a rebuild")


def test_forgotten_answers_must_not_come_back():
    back = s(3.0, 0.1, before=[False, True, False, False], after=[True, True, False, False])
    v = judge(good(forgotten=back), GateConfig(), heldout_note="x", rebuild=True)
    c = checks(v)["forgotten"]
    assert not v.promote and c.failing == ["ex_0"] and c.measured == 1  # ex_1: the base answers it so anyway
    assert "forgotten" not in checks(judge(good(), GateConfig(), heldout_note="x"))


def test_held_out_new_examples_and_non_finite_losses():
    cfg = GateConfig(max_anchor_loss_increase=0.25, anchor_loss_tolerance=0.05)
    assert judge(good(new_heldout=s(2.0, 2.5)), cfg).promote
    v = judge(good(new_heldout=s(2.0, 2.6)), cfg)
    assert not v.promote and v.reason.startswith("new_heldout: loss on 4 held-out new examples")
    assert not judge(good(new=s(2, float("nan"))), cfg, heldout_note="x").promote
    assert not judge({}, cfg, heldout_note="x").promote


def test_empty_sets_are_skipped_and_said_so():
    empty = EvalScores(parent=None, candidate=None, examples=0)
    v = judge({"new": s(2, 1), "anchor": empty, "recall": empty}, GateConfig(), heldout_note="none held out")
    assert v.promote
    assert [c.detail for c in v.checks[2:]] == ["no held-out anchors: skipped"] * 5 + [
        "no earlier learnt examples: skipped"] * 2


def chat(q, a, source="teach"):
    return make_example("chat", [{"role": "user", "content": q}], a, source)


def test_held_out_anchors_are_fixed_by_id():
    anchors = [chat(f"probe {i}?", f"answer {i}", "anchor") for i in range(16)]
    train, held = heldout_anchors(anchors, 0.25)
    assert len(held) == 4 and len(train) == 12 and not {a.id for a in held} & {a.id for a in train}
    assert heldout_anchors(list(reversed(anchors)), 0.25)[1] == [a for a in reversed(anchors) if a in held]
    assert heldout_anchors(anchors[:1], 0.25) == (anchors[:1], [])
    assert heldout_anchors(anchors, 0.0) == (anchors, [])


def test_contradictions_of_anchors_and_learnt_answers_are_found():
    learnt = [chat("What is my cat called?", "Biscuit.")]
    anchors = [chat("What is 2 + 2?", "4", "anchor")]
    new = [chat("what is my  CAT called?", "Rex."), chat("What is 2 + 2?", "5"), chat("What is 2 + 2?", "4"),
           chat("What is my dog called?", "Rex.")]
    found = find_conflicts(new, learnt, anchors)
    assert set(found) == {new[0].id, new[1].id}
    assert f"learnt example {learnt[0].id}" in found[new[0].id] and "'Biscuit.'" in found[new[0].id]
    assert "an anchor" in found[new[1].id]


def test_plan_holds_out_anchors_sets_aside_conflicts_and_says_why_nothing_new_is_held_out():
    anchors = [chat(f"probe {i}?", f"answer {i}", "anchor") for i in range(8)]
    learnt = [chat("What is my cat called?", "Biscuit.")]
    pending = [chat(f"fact {i}?", f"value {i}") for i in range(4)] + [chat("What is my cat called?", "Rex.")]
    plan = plan_update(pending, learnt, anchors, GateConfig(min_holdout_examples=10), seed=1)
    assert list(plan.conflicts) == [pending[4].id]
    assert plan.train_new == pending[:4] and plan.heldout_new == []
    assert plan.heldout_note.startswith("not held out: only 4 new example(s) wait")
    assert len(plan.heldout_anchors) == 2 and plan.eval_sets["anchor"] == plan.heldout_anchors
    assert not {a.id for a in plan.train_anchors} & {a.id for a in plan.heldout_anchors}
    assert plan.eval_sets["recall"] == learnt and plan.trained_ids == [e.id for e in pending[:4]]

    many = [chat(f"fact {i}?", f"value {i}") for i in range(12)]
    plan = plan_update(many, [], anchors, GateConfig(min_holdout_examples=10, holdout_fraction=0.25), seed=1)
    assert len(plan.heldout_new) == 3 and plan.heldout_note is None
    assert plan.eval_sets["new_heldout"] == plan.heldout_new and len(plan.train_new) == 9
