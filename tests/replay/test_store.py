"""ReplayStore over a real SQLite file: round-trips, schema/migrations, feedback rules, dedupe, the example life
cycle across updates, one-update-at-a-time across instances, crash recovery, threads, and read-only access."""

import gc
import json
import sqlite3
import threading

import pytest
from sqlite_utils import Database

from sloth_replay import (
    SCHEMA_VERSION,
    InvalidInput,
    NotFound,
    ReadOnlyStore,
    ReplayStore,
    SchemaError,
    UpdateAlreadyRunning,
)
from sloth_replay.schema import migrate

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "replay.db"


@pytest.fixture
def store(db_path):
    s = ReplayStore(db_path)
    yield s
    s.close()


def log(store, id, *, kind="chat", prompt=None, response="Paris.", **overrides):
    args = dict(
        id=id,
        kind=kind,
        prompt=prompt if prompt is not None else (CHAT if kind == "chat" else "The capital of France is"),
        response=response,
        model="tiny-llama",
        adapter_version="v000001",
        prompt_tokens=12,
        completion_tokens=3,
        latency_ms=41.5,
        ttft_ms=9.25,
        finish_reason="stop",
        params={"temperature": 0.7, "max_tokens": 16},
    )
    args.update(overrides)
    store.log_interaction(**args)


# ------------------------------------------------------------------------------------------- basics


def test_creates_file_in_wal_mode_at_latest_schema(store, db_path):
    assert db_path.is_file()
    assert store.schema_version == SCHEMA_VERSION == 6
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_interaction_round_trip_and_order(store):
    log(store, "chatcmpl-a1")
    log(store, "cmpl-b2", kind="completion", response=" Paris", ttft_ms=None, transport="zmq", adapter_version=None)
    log(store, "chatcmpl-c3", response="Lyon?", finish_reason="length")

    got = store.get_interaction("chatcmpl-a1")
    assert got["prompt"] == CHAT and got["response"] == "Paris." and got["params"] == {"temperature": 0.7, "max_tokens": 16}
    assert got["kind"] == "chat" and got["adapter_version"] == "v000001" and got["transport"] == "http"
    assert (got["prompt_tokens"], got["completion_tokens"], got["latency_ms"], got["ttft_ms"]) == (12, 3, 41.5, 9.25)
    assert got["created_at"].endswith("+00:00")
    comp = store.get_interaction("cmpl-b2")
    assert comp["prompt"] == "The capital of France is" and comp["ttft_ms"] is None and comp["transport"] == "zmq"
    assert store.get_interaction("nope") is None

    assert [i["id"] for i in store.list_interactions()] == ["chatcmpl-c3", "cmpl-b2", "chatcmpl-a1"]
    assert [i["id"] for i in store.list_interactions(limit=1, offset=1)] == ["cmpl-b2"]
    assert store.count_interactions() == 3


def test_interaction_bad_input(store):
    log(store, "chatcmpl-dup")
    with pytest.raises(InvalidInput, match="already logged"):
        log(store, "chatcmpl-dup")
    with pytest.raises(InvalidInput, match="prompt"):
        log(store, "x1", kind="chat", prompt="a string for a chat")
    with pytest.raises(InvalidInput):
        log(store, "x2", kind="embedding")
    with pytest.raises(InvalidInput):
        log(store, "x3", prompt_tokens=-1)
    with pytest.raises(InvalidInput, match="JSON"):
        log(store, "x4", params={"stop": object()})
    assert store.count_interactions() == 1


def test_data_survives_reopen(db_path):
    s = ReplayStore(db_path)
    log(s, "chatcmpl-keep")
    ex, _ = s.add_taught("2 + 2 =", " 4")
    s.close()
    s2 = ReplayStore(db_path)
    try:
        assert s2.get_interaction("chatcmpl-keep")["response"] == "Paris."
        assert s2.get_example(ex.id) == ex
    finally:
        s2.close()


# ------------------------------------------------------------------------------------------- migrations


def test_migrates_v1_database_keeping_data(db_path):
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    db = Database(conn, execute_plugins=False)
    assert migrate(db, target=1) == 1
    cols = {c.name for c in db["interactions"].columns}
    assert "transport" not in cols  # really the old layout
    db.execute(
        "INSERT INTO interactions (id, created_at, kind, prompt, response, model, adapter_version, prompt_tokens,"
        " completion_tokens, latency_ms, ttft_ms, finish_reason, params) VALUES"
        " ('chatcmpl-old', '2025-01-01T00:00:00+00:00', 'chat', ?, 'Paris.', 'm', NULL, 5, 2, 10.0, NULL, 'stop', '{}')",
        [json.dumps(CHAT)],
    )
    db.execute(
        "INSERT INTO updates (trigger, status, started_at) VALUES ('interval', 'running', '2025-01-01T00:00:00+00:00')"
    )
    conn.close()

    s = ReplayStore(db_path)
    try:
        assert s.schema_version == SCHEMA_VERSION
        old = s.get_interaction("chatcmpl-old")
        assert old["prompt"] == CHAT and old["transport"] == "http"
        assert s.running_update()["trigger"] == "interval"
        # v2's guard exists: the database itself refuses a second running update
        with pytest.raises(sqlite3.IntegrityError):
            s._db.execute(
                "INSERT INTO updates (trigger, status, started_at) VALUES ('x', 'running', '2025-01-02T00:00:00+00:00')"
            )
        fb = s.add_feedback("chatcmpl-old", rating="up")  # the old row is fully usable
        assert s.get_example(fb["example_id"]).answer == "Paris."
    finally:
        s.close()


def test_refuses_newer_schema_and_readonly_refuses_old(db_path):
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    migrate(Database(conn, execute_plugins=False), target=1)
    conn.close()
    with pytest.raises(SchemaError, match="read-write"):
        ReplayStore.open_readonly(db_path)
    ReplayStore(db_path).close()  # migrates
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        ReplayStore(db_path)


# ------------------------------------------------------------------------------------------- feedback


def test_feedback_derivation_rules(store):
    log(store, "chatcmpl-up", response="Paris.")
    log(store, "chatcmpl-down", response="Berlin.")
    log(store, "cmpl-fix", kind="completion", response=" Berlin")

    up = store.add_feedback("chatcmpl-up", rating="up", comment="good")
    ex = store.get_example(up["example_id"])
    assert (ex.kind, ex.prompt, ex.answer, ex.source) == ("chat", CHAT, "Paris.", "rated_up")

    down = store.add_feedback("chatcmpl-down", rating="down")
    assert down["example_id"] is None and down["interaction_id"] == "chatcmpl-down"

    fix = store.add_feedback("cmpl-fix", rating="down", correction=" Paris")
    ex = store.get_example(fix["example_id"])
    assert (ex.kind, ex.prompt, ex.answer, ex.source) == ("completion", "The capital of France is", " Paris", "correction")

    # a later, different correction of the same turn replaces the earlier one (the latest wins); the first again
    # brings it back (deduped) and withdraws the second
    again = store.add_feedback("cmpl-fix", correction=" Paris, of course")
    assert again["example_id"] not in (None, fix["example_id"]) and again["withdrawn"] == [fix["example_id"]]
    same = store.add_feedback("cmpl-fix", correction=" Paris")
    assert same["example_id"] == fix["example_id"] and same["withdrawn"] == [again["example_id"]]
    assert len({up["feedback_id"], down["feedback_id"], fix["feedback_id"], again["feedback_id"], same["feedback_id"]}) == 5

    assert {e.source for e in store.pending_examples()} == {"rated_up", "correction"}
    assert store.count_pending() == 2 and store.stats()["withdrawn"] == 1
    st = store.stats()
    assert st["feedback"] == {"total": 5, "up": 1, "down": 2, "corrections": 3}
    assert st["examples"]["correction"] == 2 and st["examples"]["rated_up"] == 1


def test_latest_feedback_on_a_turn_wins(store):
    log(store, "t1", response="Berlin.")
    fix = store.add_feedback("t1", rating="down", correction="Paris.")
    up = store.add_feedback("t1", rating="up")  # endorses the fix; the bad answer is not added
    assert up["example_id"] == fix["example_id"] and up["withdrawn"] == []
    assert [e.answer for e in store.pending_examples()] == ["Paris."]
    down = store.add_feedback("t1", rating="down")  # rates the logged answer: the fix stays
    assert down["example_id"] is None and down["withdrawn"] == []
    assert [e.answer for e in store.pending_examples()] == ["Paris."]
    assert store.add_feedback("t1", correction="Paris, France.")["withdrawn"] == [fix["example_id"]]
    assert [e.answer for e in store.pending_examples()] == ["Paris, France."]

    log(store, "t2", response="Rome.")
    liked = store.add_feedback("t2", rating="up")
    assert store.add_feedback("t2", rating="down")["withdrawn"] == [liked["example_id"]]
    assert store.add_feedback("t2", rating="up")["example_id"] == liked["example_id"]  # and back again
    assert [e.answer for e in store.pending_examples()] == ["Paris, France.", "Rome."]

    # what an update already trained on stays learnt (forgetting is explicit) and is reported
    u = store.begin_update(trigger="manual", base_adapter=None)
    store.finish_update(u, status="promoted", adapter_version="v000001", metrics={}, reason=None,
                        example_ids=[liked["example_id"]])
    late = store.add_feedback("t2", rating="down")
    assert late["withdrawn"] == [] and late["already_learnt"] == [liked["example_id"]]
    assert [e.answer for e in store.replay_pool()] == ["Rome."]

    # an answer also taught directly is not withdrawn by a turn's feedback
    log(store, "t3", response="Madrid.")
    taught, _ = store.add_taught(CHAT, "Madrid.")
    assert store.add_feedback("t3", rating="up")["example_id"] == taught.id
    assert store.add_feedback("t3", rating="down")["withdrawn"] == []
    assert taught.id in [e.id for e in store.pending_examples()]


def test_an_up_on_a_turn_that_called_tools_learns_the_calls(store):
    """A thumbs-up on a turn whose answer was a tool call teaches that call (as a correction with it would), not the
    raw text it was parsed from; a later "down" takes it back."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}}
    raw = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Bern"}}</tool_call>'
    log(store, "t-tool", response=raw, finish_reason="tool_calls",
        params={"tools": tools, "tool_choice": "auto", "tool_calls": [call], "content": "Checking."})
    up = store.add_feedback("t-tool", rating="up")
    ex = store.get_example(up["example_id"])
    assert (ex.answer, ex.tools, ex.source) == ("Checking.", tools, "rated_up")
    assert ex.tool_calls == [{"type": "function", "function": call["function"]}]
    fix = store.add_feedback("t-tool", correction="Checking.", tool_calls=[call])
    assert fix["example_id"] == ex.id  # the same example
    log(store, "t-tool2", response=raw, params={"tools": tools, "tool_calls": [call], "content": None})
    liked = store.add_feedback("t-tool2", rating="up")
    assert store.get_example(liked["example_id"]).answer == ""
    assert store.add_feedback("t-tool2", rating="down")["withdrawn"] == [liked["example_id"]]


def test_feedback_errors(store):
    log(store, "chatcmpl-1")
    with pytest.raises(NotFound):
        store.add_feedback("chatcmpl-missing", rating="up")
    with pytest.raises(InvalidInput, match="rating"):
        store.add_feedback("chatcmpl-1")
    with pytest.raises(InvalidInput):
        store.add_feedback("chatcmpl-1", rating="meh")
    with pytest.raises(InvalidInput):
        store.add_feedback("chatcmpl-1", correction="   ")
    assert store.stats()["feedback"]["total"] == 0 and store.count_pending() == 0


# ------------------------------------------------------------------------------------------- examples


def test_teach_document_anchor_and_dedupe(store):
    chat_ex, created = store.add_taught([{"role": "user", "content": "Who made you?", "name": "u1"}], "The sloths.")
    assert created and chat_ex.kind == "chat" and chat_ex.source == "teach"
    assert chat_ex.prompt == [{"role": "user", "content": "Who made you?"}]  # normalised for training/dedupe
    assert chat_ex.id == "ex_" + chat_ex.content_hash[:16]
    # same content (text given as content parts) -> same example, not created
    dup, created = store.add_taught([{"role": "user", "content": [{"type": "text", "text": "Who made you?"}]}], "The sloths.")
    assert not created and dup == chat_ex
    comp, created = store.add_taught("Q: 2+2\nA:", " 4")
    assert created and comp.kind == "completion"
    doc, created = store.add_document("Sloths sleep fifteen hours a day.")
    assert created and (doc.kind, doc.prompt, doc.source) == ("document", None, "document")
    assert store.add_document("Sloths sleep fifteen hours a day.")[1] is False
    anchor, created = store.add_anchor("The sky is", " blue.")
    assert created and anchor.source == "anchor"

    assert [e.id for e in store.pending_examples()] == [chat_ex.id, comp.id, doc.id]  # oldest first, no anchors
    assert store.anchors() == [anchor] and store.count_anchors() == 1
    assert store.get_example("ex_0000000000000000") is None

    for bad in [lambda: store.add_taught(42, "x"), lambda: store.add_taught("q", ""), lambda: store.add_taught([], "x"),
                lambda: store.add_document("  "), lambda: store.add_taught([{"role": "user"}], "x")]:
        with pytest.raises(InvalidInput):
            bad()
    assert store.stats()["examples"]["total"] == 4


# ------------------------------------------------------------------------------------------- updates


def test_example_life_cycle_across_updates(store):
    a, _ = store.add_taught("a?", "A")
    b, _ = store.add_taught("b?", "B")
    anchor, _ = store.add_anchor("sky?", "blue")

    failed = store.begin_update(trigger="manual", base_adapter=None)
    store.set_update_progress(failed, 0.25, "step 1/4")
    assert store.get_update(failed)["progress"] == 0.25 and store.get_update(failed)["message"] == "step 1/4"
    store.finish_update(failed, status="failed", adapter_version=None, metrics={"loss": float("nan")},
                        reason="trainer crashed", example_ids=[a.id, b.id])
    assert [e.id for e in store.pending_examples()] == [a.id, b.id]  # a failed update consumes nothing
    assert store.replay_pool() == []
    assert store.get_update(failed)["metrics"] == {"loss": None}

    rejected = store.begin_update(trigger="threshold", base_adapter=None)
    store.finish_update(rejected, status="rejected", adapter_version=None, metrics={"held_out_loss": 2.0},
                        reason="held-out loss did not improve", example_ids=[a.id])
    assert [e.id for e in store.pending_examples()] == [b.id]  # a rejected update's examples are set aside
    assert store.replay_pool() == []
    aside = store.set_aside_examples()
    assert [(r["example_id"], r["update_id"]) for r in aside] == [(a.id, rejected)]
    assert aside[0]["reason"] == f"update {rejected} rejected: held-out loss did not improve"
    assert aside[0]["example"]["answer"] == "A" and store.count_set_aside() == 1

    c, _ = store.add_taught("c?", "C")
    promoted = store.begin_update(trigger="interval", base_adapter=None)
    store.claim_examples(promoted, [b.id])  # training on b: no longer counted as pending
    assert [e.id for e in store.pending_examples()] == [c.id] and store.count_pending() == 1
    store.finish_update(promoted, status="promoted", adapter_version="v000001", metrics={"held_out_loss": 0.5},
                        reason=None, example_ids=[b.id, c.id, anchor.id])
    assert store.pending_examples() == [] and store.count_pending() == 0
    assert [e.id for e in store.replay_pool()] == [b.id, c.id]  # not the rejected one, not the anchor
    assert store.anchors() == [anchor]
    # re-adding consumed content does not make it pending again
    assert store.add_taught("c?", "C") == (c, False) and store.count_pending() == 0

    up = store.get_update(promoted)
    assert up["status"] == "promoted" and up["adapter_version"] == "v000001" and up["finished_at"]
    assert up["metrics"] == {"held_out_loss": 0.5} and set(up["example_ids"]) == {b.id, c.id, anchor.id}
    assert [u["id"] for u in store.list_updates()] == [promoted, rejected, failed]
    assert [u["id"] for u in store.list_updates(limit=1)] == [promoted]
    st = store.stats()
    assert st["updates"] == {"running": 0, "promoted": 1, "rejected": 1, "failed": 1, "total": 3}
    assert (st["pending"], st["replay_pool"], st["anchors"], st["set_aside"]) == (0, 2, 1, 1)
    assert store.requeue() == 1 and store.count_set_aside() == 0
    assert [e.id for e in store.pending_examples()] == [a.id]  # asked again: pending, its history kept


def test_contradicting_examples_set_aside_with_any_verdict(store):
    a, _ = store.add_taught("a?", "A")
    b, _ = store.add_taught("b?", "B")
    u = store.begin_update(trigger="manual", base_adapter=None)
    store.claim_examples(u, [a.id])
    store.finish_update(u, status="promoted", adapter_version="v000001", metrics={}, reason=None,
                        example_ids=[a.id], set_aside={b.id: "contradicts learnt example x"})
    assert store.pending_examples() == [] and [e.id for e in store.replay_pool()] == [a.id]
    assert [(r["example_id"], r["reason"]) for r in store.set_aside_examples()] == [
        (b.id, "contradicts learnt example x")]
    assert store.requeue([b.id, "ex_unknown"]) == 1 and [e.id for e in store.pending_examples()] == [b.id]


def test_claimed_examples_of_a_failed_update_are_pending_again(store):
    a, _ = store.add_taught("a?", "A")
    u = store.begin_update(trigger="manual", base_adapter=None)
    store.claim_examples(u, [a.id])
    assert store.count_pending() == 0 and store.stats()["pending"] == 0
    store.fail_running_updates("daemon crashed")
    assert [e.id for e in store.pending_examples()] == [a.id]


def test_v3_migration_sets_aside_what_rejected_updates_consumed(db_path):
    db_path.parent.mkdir(parents=True)
    db = Database(sqlite3.connect(db_path, isolation_level=None))
    migrate(db, target=2)
    for ex, answer in (("ex_a", "A"), ("ex_b", "B")):
        db["examples"].insert({"id": ex, "content_hash": ex, "kind": "completion", "prompt": json.dumps(ex + "?"),
                               "answer": answer, "source": "teach", "created_at": "2026-01-01T00:00:00+00:00"})
    db["updates"].insert({"id": 1, "trigger": "manual", "status": "rejected", "started_at": "t", "reason": "bad"})
    db["updates"].insert({"id": 2, "trigger": "manual", "status": "promoted", "started_at": "t"})
    db["update_examples"].insert_all([{"update_id": 1, "example_id": "ex_a"}, {"update_id": 1, "example_id": "ex_b"},
                                      {"update_id": 2, "example_id": "ex_b"}])
    assert migrate(db, target=3) == 3
    rows = list(db.query("SELECT example_id, update_id, reason FROM set_aside"))
    assert rows == [{"example_id": "ex_a", "update_id": 1, "reason": "update 1 rejected: bad"}]
    db.conn.close()


def test_update_errors(store):
    a, _ = store.add_taught("a?", "A")
    with pytest.raises(NotFound):
        store.set_update_progress(99, 0.5)
    u = store.begin_update(trigger="manual", base_adapter="v000003")
    assert store.running_update()["id"] == u and store.running_update()["base_adapter"] == "v000003"
    with pytest.raises(InvalidInput):
        store.set_update_progress(u, 1.5)
    with pytest.raises(InvalidInput, match="adapter_version"):
        store.finish_update(u, status="promoted", adapter_version=None, metrics={}, reason=None, example_ids=[a.id])
    with pytest.raises(InvalidInput, match="unknown example"):
        store.finish_update(u, status="rejected", adapter_version=None, metrics={}, reason="r", example_ids=["ex_nope"])
    with pytest.raises(InvalidInput):
        store.finish_update(u, status="done", adapter_version=None, metrics={}, reason=None, example_ids=[])
    assert store.running_update()["id"] == u  # none of the bad calls changed anything
    store.finish_update(u, status="rejected", adapter_version=None, metrics={}, reason="r", example_ids=[a.id])
    with pytest.raises(InvalidInput, match="not running"):
        store.finish_update(u, status="promoted", adapter_version="v1", metrics={}, reason=None, example_ids=[])
    assert store.running_update() is None and store.get_update(12345) is None


def test_one_running_update_across_instances(db_path):
    first, second = ReplayStore(db_path), ReplayStore(db_path)
    try:
        u = first.begin_update(trigger="manual", base_adapter=None)
        with pytest.raises(UpdateAlreadyRunning) as err:
            second.begin_update(trigger="interval", base_adapter=None)
        assert err.value.update_id == u
        first.finish_update(u, status="failed", adapter_version=None, metrics={}, reason="x", example_ids=[])
        u2 = second.begin_update(trigger="interval", base_adapter=None)
        with pytest.raises(UpdateAlreadyRunning):
            first.begin_update(trigger="manual", base_adapter=None)
        assert u2 != u and first.running_update()["id"] == u2
    finally:
        first.close()
        second.close()


def test_fail_running_updates_after_crash(db_path):
    crashed = ReplayStore(db_path)
    a, _ = crashed.add_taught("a?", "A")
    u = crashed.begin_update(trigger="manual", base_adapter=None)
    del crashed  # no finish_update, no close: the process "died"
    gc.collect()

    s = ReplayStore(db_path)
    try:
        assert s.running_update()["id"] == u
        assert s.fail_running_updates("daemon restarted during the update") == 1
        row = s.get_update(u)
        assert row["status"] == "failed" and row["reason"] == "daemon restarted during the update" and row["finished_at"]
        assert s.fail_running_updates("again") == 0
        assert [e.id for e in s.pending_examples()] == [a.id]  # still waiting for the next update
        assert s.begin_update(trigger="manual", base_adapter=None) != u
    finally:
        s.close()


# ------------------------------------------------------------------------------------------- concurrency


def test_concurrent_logging_from_threads(store):
    n_threads, per_thread = 8, 25
    errors = []
    start = threading.Barrier(n_threads)

    def worker(t):
        try:
            start.wait()
            for i in range(per_thread):
                log(store, f"chatcmpl-{t}-{i}", response=f"answer {t}/{i}")
                if i % 5 == 0:
                    store.list_interactions(limit=5)
                    store.stats()
        except Exception as e:  # surfaced below with the thread's context
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert store.count_interactions() == n_threads * per_thread
    ids = {i["id"] for i in store.list_interactions(limit=1000)}
    assert ids == {f"chatcmpl-{t}-{i}" for t in range(n_threads) for i in range(per_thread)}
    assert store.get_interaction("chatcmpl-7-24")["response"] == "answer 7/24"


# ------------------------------------------------------------------------------------------- read-only


def test_readonly_reader_sees_writes_and_cannot_write(store, db_path):
    log(store, "chatcmpl-1")
    ro = ReplayStore.open_readonly(db_path)
    try:
        assert ro.readonly and ro.schema_version == SCHEMA_VERSION
        assert ro.count_interactions() == 1
        log(store, "chatcmpl-2")  # the daemon keeps writing while the CLI reads
        store.add_taught("q", "a")
        assert ro.count_interactions() == 2 and ro.count_pending() == 1

        for write in [lambda: log(ro, "chatcmpl-3"), lambda: ro.add_taught("q2", "a2"),
                      lambda: ro.begin_update(trigger="manual", base_adapter=None),
                      lambda: ro.add_feedback("chatcmpl-1", rating="up"), lambda: ro.fail_running_updates("x")]:
            with pytest.raises(ReadOnlyStore):
                write()
        # below the API too: the connection itself refuses writes
        with pytest.raises(sqlite3.OperationalError):
            ro._db.execute("DELETE FROM interactions")
        assert store.count_interactions() == 2 and store.stats()["feedback"]["total"] == 0
    finally:
        ro.close()


def test_readonly_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ReplayStore.open_readonly(tmp_path / "none.db")
    assert not (tmp_path / "none.db").exists()
