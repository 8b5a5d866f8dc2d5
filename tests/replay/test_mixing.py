"""Holdout split and batch mixing: ratios, determinism, empty-pool redistribution, even coverage of new examples."""

from collections import Counter

import pytest
from pydantic import ValidationError

from sloth_replay import MixRatios, build_batches, make_example, split_holdout


def pool(source, n, kind="completion"):
    return [make_example(kind, f"{source} prompt {i}", f"{source} answer {i}", source) for i in range(n)]


NEW, REPLAY, ANCHORS = pool("teach", 7), pool("correction", 30), pool("anchor", 12)
NEW_IDS, REPLAY_IDS, ANCHOR_IDS = ({e.id for e in p} for p in (NEW, REPLAY, ANCHORS))


def make_up(batch):
    return (
        sum(e.id in NEW_IDS for e in batch),
        sum(e.id in REPLAY_IDS for e in batch),
        sum(e.id in ANCHOR_IDS for e in batch),
    )


def test_ratios_validate_and_normalise():
    r = MixRatios(new=2, replay=1, anchor=1)
    assert (r.new, r.replay, r.anchor) == (0.5, 0.25, 0.25)
    d = MixRatios()
    assert (d.new, d.replay, d.anchor) == pytest.approx((0.5, 0.3, 0.2))
    for bad in [dict(new=-0.1), dict(new=0, replay=0, anchor=0), dict(replay=float("nan")), dict(anchor=float("inf"))]:
        with pytest.raises(ValidationError):
            MixRatios(**bad)


def test_batches_follow_ratios():
    batches = build_batches(NEW, REPLAY, ANCHORS, ratios=MixRatios(), steps=6, batch_size=10, seed=0)
    assert len(batches) == 6
    assert all(make_up(b) == (5, 3, 2) for b in batches)
    batches = build_batches(NEW, REPLAY, ANCHORS, ratios=MixRatios(new=1, replay=1, anchor=2), steps=3, batch_size=8, seed=0)
    assert all(make_up(b) == (2, 2, 4) for b in batches)


def test_empty_pools_give_their_share_to_new():
    assert all(make_up(b) == (8, 0, 2) for b in build_batches(NEW, [], ANCHORS, ratios=MixRatios(), steps=3, batch_size=10, seed=1))
    assert all(make_up(b) == (7, 3, 0) for b in build_batches(NEW, REPLAY, [], ratios=MixRatios(), steps=3, batch_size=10, seed=1))
    assert all(make_up(b) == (4, 0, 0) for b in build_batches(NEW, [], [], ratios=MixRatios(), steps=3, batch_size=4, seed=1))


def test_at_least_one_new_example_per_batch():
    ratios = MixRatios(new=0, replay=1, anchor=1)
    for bs in (1, 2, 3, 5):
        for b in build_batches(NEW, REPLAY, ANCHORS, ratios=ratios, steps=4, batch_size=bs, seed=2):
            assert len(b) == bs and make_up(b)[0] >= 1


def test_every_new_example_seen_about_equally():
    batches = build_batches(NEW, REPLAY, ANCHORS, ratios=MixRatios(), steps=10, batch_size=4, seed=3)  # 20 new draws
    counts = Counter(e.id for b in batches for e in b if e.id in NEW_IDS)
    assert set(counts) == NEW_IDS
    assert max(counts.values()) - min(counts.values()) <= 1
    # the replay pool is drawn without repeats until it has been walked through once
    replay_drawn = [e.id for b in batches for e in b if e.id in REPLAY_IDS]
    assert len(replay_drawn) == 10 and len(set(replay_drawn)) == 10


def test_batches_deterministic_per_seed():
    def ids(seed):
        return [[e.id for e in b] for b in build_batches(NEW, REPLAY, ANCHORS, ratios=MixRatios(), steps=5, batch_size=10, seed=seed)]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


def test_build_batches_rejects_bad_input():
    with pytest.raises(ValueError, match="new example"):
        build_batches([], REPLAY, ANCHORS, ratios=MixRatios(), steps=2, batch_size=4, seed=0)
    with pytest.raises(ValueError):
        build_batches(NEW, REPLAY, ANCHORS, ratios=MixRatios(), steps=0, batch_size=4, seed=0)


def test_holdout_split():
    new = pool("teach", 20)
    train, held = split_holdout(new, fraction=0.2, min_examples=10, seed=5)
    assert len(held) == 4 and len(train) == 16
    assert {e.id for e in train} | {e.id for e in held} == {e.id for e in new}
    assert not {e.id for e in train} & {e.id for e in held}
    assert [e.id for e in train] == [e.id for e in new if e in train]  # input order kept

    again = split_holdout(list(reversed(new)), fraction=0.2, min_examples=10, seed=5)[1]
    assert {e.id for e in again} == {e.id for e in held}  # depends on seed and ids, not list order
    other_seeds = [{e.id for e in split_holdout(new, fraction=0.2, min_examples=10, seed=s)[1]} for s in range(6, 10)]
    assert any(s != {e.id for e in held} for s in other_seeds)


def test_holdout_minimums():
    few = pool("teach", 4)
    assert split_holdout(few, fraction=0.2, min_examples=5, seed=0) == (few, [])  # too few: evaluate on training data
    train, held = split_holdout(few, fraction=0.1, min_examples=4, seed=0)
    assert len(held) == 1 and len(train) == 3  # round(0.4) == 0, but at least one
    one = pool("teach", 1)
    assert split_holdout(one, fraction=0.5, min_examples=1, seed=0) == (one, [])  # never holds out everything
    with pytest.raises(ValueError):
        split_holdout(few, fraction=1.0, min_examples=1, seed=0)
