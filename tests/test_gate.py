"""The eval gate's rules on before/after losses."""

from sloth_daemon.config import GateConfig
from sloth_daemon.gate import judge
from sloth_daemon.trainer.job import EvalScores


def s(parent, candidate, n=4):
    return EvalScores(parent=parent, candidate=candidate, examples=n)


def test_promotes_when_new_improves_and_anchors_hold():
    v = judge({"new": s(2.0, 0.5), "anchor": s(1.0, 1.1), "recall": s(0.5, 0.6)}, GateConfig(), new_is_heldout=True)
    assert v.promote and v.reason == "all checks passed"


def test_rejects_when_new_does_not_improve():
    v = judge({"new": s(1.0, 1.0), "anchor": s(1.0, 1.0)}, GateConfig(), new_is_heldout=False)
    assert not v.promote and v.reason.startswith("new:") and "training new examples" in v.reason


def test_rejects_when_anchor_loss_rises_past_bound():
    cfg = GateConfig(max_anchor_loss_increase=0.25, anchor_loss_tolerance=0.05)
    assert judge({"new": s(2, 1), "anchor": s(1.0, 1.29)}, cfg, new_is_heldout=True).promote
    v = judge({"new": s(2, 1), "anchor": s(1.0, 1.31)}, cfg, new_is_heldout=True)
    assert not v.promote and v.reason.startswith("anchor:")


def test_recall_bound_and_non_finite_losses():
    cfg = GateConfig()
    assert not judge({"new": s(2, 1), "recall": s(0.2, 2.0)}, cfg, new_is_heldout=True).promote
    assert not judge({"new": s(2, float("nan"))}, cfg, new_is_heldout=True).promote
    assert not judge({}, cfg, new_is_heldout=True).promote


def test_empty_anchor_and_recall_sets_are_skipped():
    v = judge({"new": s(2, 1), "anchor": s(None, None, 0), "recall": s(None, None, 0)}, GateConfig(), new_is_heldout=True)
    assert v.promote
    assert [c.detail for c in v.checks[1:]] == ["no examples: skipped"] * 2
