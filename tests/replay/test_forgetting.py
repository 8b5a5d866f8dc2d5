"""Forgetting in the replay store (real SQLite): what each selector deletes, which adapter versions become tainted,
what is kept for checking the rebuild, and that a refused request deletes nothing."""

import pytest

from sloth_replay import InvalidInput, NotFound, ReplayStore, UpdateAlreadyRunning
from sloth_replay.forgetting import (
    conversation_of,
    forget,
    forgotten_examples,
    purge_forgotten,
    tainted_adapters,
)


@pytest.fixture
def store(tmp_path):
    s = ReplayStore(tmp_path / "replay.db")
    yield s
    s.close()


def turn(store, id, messages, response, **kw):
    store.log_interaction(id=id, kind="chat", prompt=messages, response=response, model="m", adapter_version=None,
                          prompt_tokens=1, completion_tokens=1, latency_ms=1.0, ttft_ms=None, finish_reason="stop",
                          params={}, **kw)


def update(store, ids, status="promoted", version=None):
    uid = store.begin_update(trigger="manual", base_adapter=store_current(store))
    store.finish_update(uid, status=status, adapter_version=version, metrics={}, reason=None if status == "promoted"
                        else "gate", example_ids=ids)
    return uid


def store_current(store):
    rows = [u for u in store.list_updates(limit=100) if u["status"] == "promoted"]
    return rows[0]["adapter_version"] if rows else None


def test_forgetting_a_learnt_example_taints_what_trained_on_it_and_keeps_it_only_for_the_check(store):
    a, _ = store.add_taught("Cat?", "Biscuit")
    b, _ = store.add_taught("Car?", "Level 3")
    update(store, [a.id], version="v000001")
    update(store, [b.id], version="v000002")  # replayed a, continued from v000001
    c, _ = store.add_taught("Cat?", "Muffin")  # contradicts a: set aside with a's id in the reason
    uid = store.begin_update(trigger="manual", base_adapter="v000002")
    store.finish_update(uid, status="rejected", adapter_version=None, metrics={}, reason="conflict", example_ids=[],
                        set_aside={c.id: f"contradicts learnt example {a.id}"})
    d, _ = store.add_taught("Dog?", "Rex")  # pending, never trained

    out = forget(store, example_ids=[a.id, d.id])
    assert (out["examples"], out["tainted"], out["requeued"]) == (2, ["v000001", "v000002"], [c.id])
    assert store.get_example(a.id) is None and store.get_example(d.id) is None
    assert [e.id for e in store.replay_pool()] == [b.id]
    assert [e.id for e in store.pending_examples()] == [c.id]  # free to be learnt now that a is gone
    assert "forgotten example" in tainted_adapters(store)["v000001"]
    assert "replay pool" in tainted_adapters(store)["v000002"]
    assert [(e.prompt, e.answer) for e in forgotten_examples(store)] == [("Cat?", "Biscuit")]  # d was never trained
    assert purge_forgotten(store) == 1 and forgotten_examples(store) == []


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_a_forgotten_tool_call_is_kept_whole_for_the_check(store):
    """The rebuild's gate must render a forgotten tool-call example with its tools and see whether its calls come
    back: the kept example is the one that was trained (same id), tools and calls included."""
    prompt = [{"role": "user", "content": "Weather in Bern?"}]
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}}]
    called, _ = store.add_taught(prompt, "", tools=[WEATHER], tool_calls=calls)
    said, _ = store.add_taught(prompt, "Sunny.", tools=[WEATHER])
    plain, _ = store.add_taught("Cat?", "Biscuit")
    update(store, [called.id, said.id, plain.id], version="v000001")
    forget(store, example_ids=[called.id, said.id, plain.id])
    kept = {e.id: e for e in forgotten_examples(store)}
    assert set(kept) == {called.id, said.id, plain.id}
    assert (kept[called.id].tools, kept[called.id].tool_calls, kept[called.id].answer) == ([WEATHER], calls, "")
    assert (kept[said.id].tools, kept[said.id].tool_calls) == ([WEATHER], None)
    assert (kept[plain.id].tools, kept[plain.id].tool_calls, kept[plain.id].prompt) == (None, None, "Cat?")


def test_forgotten_rows_from_before_v6_still_load(tmp_path):
    """A store at schema v5 with a kept forgotten example migrates to v6 (new columns NULL) and still loads it."""
    import json
    import sqlite3

    from sqlite_utils import Database

    from sloth_replay.schema import migrate

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    migrate(Database(conn), target=5)
    conn.execute("INSERT INTO forget_requests (created_at, selection, result) VALUES ('t', '{}', '{}')")
    conn.execute("INSERT INTO forgotten (example_id, forget_id, kind, prompt, answer) VALUES ('x', 1, 'chat', ?, ?)",
                 [json.dumps([{"role": "user", "content": "Cat?"}]), "Biscuit"])
    conn.close()
    s = ReplayStore(db)
    try:
        (kept,) = forgotten_examples(s)
        assert (kept.prompt, kept.answer, kept.tools, kept.tool_calls) == ([{"role": "user", "content": "Cat?"}],
                                                                           "Biscuit", None, None)
    finally:
        s.close()


def test_an_interaction_takes_its_feedback_and_the_examples_only_it_gave(store):
    q = [{"role": "user", "content": "Capital?"}]
    turn(store, "t1", q, "Lyon.")
    turn(store, "t2", q, "Lyon.")
    fix = store.add_feedback("t1", correction="Paris.")
    store.add_feedback("t2", correction="Paris.")  # the same example, also given by t2
    up = store.add_feedback("t1", rating="up")
    out = forget(store, interaction_ids=["t1"])
    assert (out["interactions"], out["feedback"], out["examples"], out["tainted"]) == (1, 2, 0, [])
    assert store.get_interaction("t1") is None and store.get_example(fix["example_id"]) is not None
    assert up["feedback_id"] not in [f["id"] for f in store.feedback_for(["t2"])["t2"]]
    out = forget(store, feedback_ids=[store.feedback_for(["t2"])["t2"][0]["id"]])
    assert out["examples"] == 1 and store.get_example(fix["example_id"]) is None
    assert store.get_interaction("t2") is not None  # the turn itself stays


def test_conversation_is_the_turns_that_continue_one_another(store):
    first = [{"role": "user", "content": "Hi"}]
    turn(store, "c1", first, "Hello!")
    second = [*first, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "My cat is Biscuit."}]
    turn(store, "c2", second, "Nice.")
    turn(store, "c3", [*second, {"role": "assistant", "content": "Nice."}, {"role": "user", "content": "Bye"}], "Bye")
    turn(store, "other", [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}], "?")
    with store.read_transaction() as db:
        assert conversation_of(db, "c3") == ["c1", "c2", "c3"]
        assert conversation_of(db, "other") == ["other"]
    store.add_feedback("c2", correction="What a nice name.")
    out = forget(store, conversation="c1")
    assert (out["interactions"], out["feedback"], out["examples"]) == (3, 1, 1)
    assert store.count_interactions() == 1 and store.count_pending() == 0


def test_time_range(store):
    old, _ = store.add_taught("Old?", "old")
    new, _ = store.add_taught("New?", "new")
    cut = store.get_example(new.id).created_at
    turn(store, "late", [{"role": "user", "content": "x"}], "y")
    with pytest.raises(InvalidInput, match="since must be before until"):
        forget(store, since="2026-12-01T00:00:00Z", until="2026-11-01T00:00:00")
    with pytest.raises(InvalidInput, match="ISO-8601"):
        forget(store, since="yesterday")
    out = forget(store, since=cut.replace("+00:00", "Z"))  # from the second example on
    assert (out["examples"], out["interactions"]) == (1, 1) and out["example_ids"] == [new.id]
    assert [e.id for e in store.pending_examples()] == [old.id]


def test_refused_requests_delete_nothing(store):
    a, _ = store.add_taught("Cat?", "Biscuit")
    anchor, _ = store.add_anchor("Hello", "Hi!")
    with pytest.raises(InvalidInput, match="anchor"):
        forget(store, example_ids=[a.id, anchor.id])
    with pytest.raises(NotFound):
        forget(store, example_ids=[a.id], interaction_ids=["nope"])
    with pytest.raises(InvalidInput, match="say what to forget"):
        forget(store)
    store.begin_update(trigger="manual", base_adapter=None)
    with pytest.raises(UpdateAlreadyRunning):
        forget(store, example_ids=[a.id])
    assert store.get_example(a.id) is not None and store.count_anchors() == 1


def test_a_rejected_rebuild_sets_aside_only_what_was_not_learnt(store):
    a, _ = store.add_taught("Cat?", "Biscuit")
    update(store, [a.id], version="v000001")
    b, _ = store.add_taught("Dog?", "Rex")
    update(store, [a.id, b.id], status="rejected", version="v000002")  # a rebuild trains learnt a with pending b
    assert [r["example_id"] for r in store.set_aside_examples()] == [b.id]
    assert [e.id for e in store.replay_pool()] == [a.id]
