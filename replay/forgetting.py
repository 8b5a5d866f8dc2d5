"""Forgetting on request: delete examples, feedback, logged turns, a whole conversation or a time range from the
replay store, and record which adapter versions were trained on what was deleted (*tainted*).

Contract (`forget`, one ``BEGIN IMMEDIATE`` transaction: all of it happens or none of it):
- What is selected: `example_ids`; `feedback_ids`; `interaction_ids`; `conversation` (a turn id: every chat turn
  linked to it by continuation, see `conversation_of`); `since`/`until` (ISO-8601; `since` <= created_at < `until`:
  the turns, feedback and examples created in that range). A turn brings its feedback; a feedback brings the example
  it gave (unless feedback outside the selection also gave it, or it is an anchor); an example brings the feedback
  that gave it (a correction holds the same text). Anchors (the base model's own answers) cannot be forgotten: naming
  one is `InvalidInput`. An id that does not exist is `NotFound`; nothing is deleted then.
- What is deleted: those rows, and every link to the examples (update_examples, set_aside, withdrawn). Set-aside
  examples whose reason names a forgotten example (they contradicted it) are pending again: forgetting the earlier
  answer is how a user replaces it. Nothing of the deleted text stays, except:
- `forgotten`: the deleted examples that some adapter had trained on, kept whole (kind, prompt, answer, the tools
  offered and the calls made) only until an adapter rebuilt without them is promoted (`purge_forgotten`), so that
  the rebuild's gate can check it no longer gives their answers (tool calls included).
- Tainted: every adapter version whose update trained on a deleted example as a new example, or started after one
  joined the replay pool (its batches may have replayed it), or continued from a tainted version. Recorded in
  `tainted_adapters` with the forget request's id; the daemon mirrors it into the registry and rebuilds.
- Refused while an update runs (`UpdateAlreadyRunning`): the daemon stops it first, so no update can finish on data
  that is gone.
Returns {forget_id, examples, feedback, interactions (counts), example_ids, tainted (versions), requeued (ids)}.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from sqlite_utils import Database

from .examples import Example, utc_now
from .store import InvalidInput, NotFound, ReplayStore, UpdateAlreadyRunning


def utc_bound(value: str, what: str) -> str:
    """An ISO-8601 time as the store's UTC string (a time without an offset is taken as UTC); InvalidInput if it is
    not one."""
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what}: {value!r} is not an ISO-8601 time (e.g. 2026-11-30T18:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _message_key(m: Any) -> tuple[str, str]:
    content = m.get("content") if isinstance(m, dict) else None
    return (str(m.get("role")) if isinstance(m, dict) else "", json.dumps(content, sort_keys=True))


def conversation_of(db: Database, interaction_id: str) -> list[str]:
    """The ids of every turn in the conversation of `interaction_id`: chat turns whose prompts continue one another
    (turn B continues turn A when B's messages start with all of A's followed by an assistant message, as a client
    resends the history). A completion turn is its own conversation. NotFound if the turn is not logged."""
    row = db.execute("SELECT kind FROM interactions WHERE id = ?", [interaction_id]).fetchone()
    if row is None:
        raise NotFound(f"no logged turn {interaction_id!r}")
    if row[0] != "chat":
        return [interaction_id]
    keys: dict[str, tuple] = {}
    by_key: dict[tuple, list[str]] = {}
    for tid, prompt in db.execute("SELECT id, prompt FROM interactions WHERE kind = 'chat'"):
        key = tuple(_message_key(m) for m in json.loads(prompt))
        keys[tid] = key
        by_key.setdefault(key, []).append(tid)
    links: dict[str, set[str]] = {}
    for tid, key in keys.items():
        for j, (role, _) in enumerate(key):
            if role == "assistant" and j > 0:
                for parent in by_key.get(key[:j], ()):
                    links.setdefault(tid, set()).add(parent)
                    links.setdefault(parent, set()).add(tid)
    seen, todo = {interaction_id}, [interaction_id]
    while todo:
        for other in links.get(todo.pop(), ()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return sorted(seen)


def _ids(db: Database, sql: str, params: list) -> set:
    return {r[0] for r in db.execute(sql, params)}


def _in(values: set | list) -> tuple[str, list]:
    """An `IN (...)` operand for any number of values: one JSON array parameter (SQLite's json_each), so a large
    selection never meets the bound-parameter limit."""
    return "SELECT value FROM json_each(?)", [json.dumps(sorted(values))]


def _require(db: Database, table: str, ids: list, what: str) -> None:
    for i in ids:
        if db.execute(f"SELECT 1 FROM {table} WHERE id = ?", [i]).fetchone() is None:
            raise NotFound(f"no {what} {i!r}")


def _tainted(db: Database, examples: set[str]) -> dict[str, tuple[int, str]]:
    """{adapter version: (update id, reason)} for the versions trained on `examples` (see the module docstring)."""
    if not examples:
        return {}
    marks, vals = _in(examples)
    updates = {r["id"]: r for r in db.query(
        "SELECT id, status, started_at, finished_at, base_adapter, adapter_version FROM updates ORDER BY id")}
    trained = {}
    for uid, ex in db.execute(f"SELECT update_id, example_id FROM update_examples WHERE example_id IN ({marks})", vals):
        trained.setdefault(uid, ex)
    # When each forgotten example joined the replay pool: the end of the first promoted update that trained on it.
    joined = min((updates[u]["finished_at"] for u in trained
                  if updates[u]["status"] == "promoted" and updates[u]["finished_at"]), default=None)
    out: dict[str, tuple[int, str]] = {}
    for uid, u in updates.items():
        version = u["adapter_version"]
        if not version:
            continue
        if uid in trained:
            out[version] = (uid, f"update {uid} trained on forgotten example {trained[uid]}")
        elif joined is not None and u["started_at"] > joined:
            out[version] = (uid, f"update {uid} ran while forgotten examples were in the replay pool")
        elif u["base_adapter"] in out:
            out[version] = (uid, f"update {uid} continued from tainted {u['base_adapter']}")
    return out


def forget(store: ReplayStore, *, example_ids: list[str] = (), feedback_ids: list[int] = (),  # type: ignore[assignment]
           interaction_ids: list[str] = (), conversation: str | None = None,  # type: ignore[assignment]
           since: str | None = None, until: str | None = None) -> dict:
    """Delete what is selected and record the tainted adapters; see the module docstring."""
    selection = {"example_ids": list(example_ids), "feedback_ids": list(feedback_ids),
                 "interaction_ids": list(interaction_ids), "conversation": conversation, "since": since,
                 "until": until}
    if not any(selection.values()):
        raise InvalidInput("say what to forget: example_ids, feedback_ids, interaction_ids, conversation, or a "
                           "time range (since/until)")
    lo = utc_bound(since, "since") if since else None
    hi = utc_bound(until, "until") if until else None
    if lo and hi and lo >= hi:
        raise InvalidInput("since must be before until")
    with store.write_transaction() as db:
        running = db.execute("SELECT id FROM updates WHERE status = 'running'").fetchone()
        if running:
            raise UpdateAlreadyRunning(running[0])
        _require(db, "examples", selection["example_ids"], "example")
        _require(db, "feedback", selection["feedback_ids"], "feedback")
        _require(db, "interactions", selection["interaction_ids"], "logged turn")
        anchors = [i for i in example_ids if db.execute(
            "SELECT 1 FROM examples WHERE id = ? AND source = 'anchor'", [i]).fetchone()]
        if anchors:
            raise InvalidInput(f"{anchors[0]} is an anchor (the base model's own answer); anchors are not forgotten")
        turns = set(interaction_ids)
        if conversation:
            turns.update(conversation_of(db, conversation))
        feedback = set(feedback_ids)
        examples = set(example_ids)
        if lo or hi:
            where = " AND ".join(c for c in ("created_at >= ?" if lo else "", "created_at < ?" if hi else "") if c)
            bounds = [b for b in (lo, hi) if b]
            turns |= _ids(db, f"SELECT id FROM interactions WHERE {where}", bounds)
            feedback |= _ids(db, f"SELECT id FROM feedback WHERE {where}", bounds)
            examples |= _ids(db, f"SELECT id FROM examples WHERE source != 'anchor' AND {where}", bounds)
        if turns:
            marks, vals = _in(turns)
            feedback |= _ids(db, f"SELECT id FROM feedback WHERE interaction_id IN ({marks})", vals)
        if feedback:
            marks, vals = _in(feedback)
            given = _ids(db, f"SELECT example_id FROM feedback WHERE id IN ({marks}) AND example_id IS NOT NULL", vals)
            for ex in given:
                elsewhere = db.execute(f"SELECT 1 FROM feedback WHERE example_id = ? AND id NOT IN ({marks})",
                                       [ex, *vals]).fetchone()
                source = db.execute("SELECT source FROM examples WHERE id = ?", [ex]).fetchone()
                if not elsewhere and source and source[0] in ("correction", "rated_up"):
                    examples.add(ex)
        if examples:
            marks, vals = _in(examples)
            feedback |= _ids(db, f"SELECT id FROM feedback WHERE example_id IN ({marks})", vals)
        tainted = _tainted(db, examples)
        forget_id = int(db["forget_requests"].insert(
            {"created_at": utc_now(), "selection": json.dumps(selection), "result": "{}"}).last_pk)
        requeued: list[str] = []
        if examples:
            marks, vals = _in(examples)
            trained = _ids(db, f"SELECT example_id FROM update_examples WHERE example_id IN ({marks})", vals)
            for row in db.query(f"SELECT id, kind, prompt, answer, tools, tool_calls FROM examples "
                                f"WHERE id IN ({marks})", vals):
                if row["id"] in trained and tainted:
                    db.execute("INSERT OR REPLACE INTO forgotten (example_id, forget_id, kind, prompt, answer, tools, "
                               "tool_calls) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [row["id"], forget_id, row["kind"], row["prompt"], row["answer"], row["tools"],
                                row["tool_calls"]])
            for ex_id, reason in list(db.execute("SELECT example_id, reason FROM set_aside")):
                if ex_id not in examples and any(f in reason for f in examples):
                    requeued.append(ex_id)
            for table in ("update_examples", "set_aside", "withdrawn"):
                db.execute(f"DELETE FROM {table} WHERE example_id IN ({marks})", vals)
            for ex_id in requeued:
                db.execute("DELETE FROM set_aside WHERE example_id = ?", [ex_id])
        if feedback:
            marks, vals = _in(feedback)
            db.execute(f"UPDATE withdrawn SET feedback_id = NULL WHERE feedback_id IN ({marks})", vals)
            db.execute(f"DELETE FROM feedback WHERE id IN ({marks})", vals)
        if examples:
            marks, vals = _in(examples)
            db.execute(f"DELETE FROM examples WHERE id IN ({marks})", vals)
        if turns:
            marks, vals = _in(turns)
            db.execute(f"DELETE FROM interactions WHERE id IN ({marks})", vals)
        now = utc_now()
        for version, (uid, reason) in tainted.items():
            db.execute("INSERT OR IGNORE INTO tainted_adapters (adapter_version, update_id, forget_id, reason, "
                       "created_at) VALUES (?, ?, ?, ?, ?)", [version, uid, forget_id, reason, now])
        result = {"forget_id": forget_id, "examples": len(examples), "feedback": len(feedback),
                  "interactions": len(turns), "example_ids": sorted(examples), "tainted": sorted(tainted),
                  "requeued": sorted(requeued)}
        db.execute("UPDATE forget_requests SET result = ? WHERE id = ?",
                   [json.dumps({k: v for k, v in result.items() if k != "forget_id"}), forget_id])
        return result


def tainted_adapters(store: ReplayStore) -> dict[str, str]:
    """{adapter version: reason} of every version trained on forgotten data."""
    with store.read_transaction() as db:
        return {r[0]: r[1] for r in db.execute(
            "SELECT adapter_version, reason FROM tainted_adapters ORDER BY adapter_version")}


def forgotten_examples(store: ReplayStore) -> list[Example]:
    """The forgotten examples kept for checking a rebuild, whole: prompt, answer, the tools offered and the calls made
    (so each has the id it had; source "teach" stands in: their source is gone)."""
    from .examples import make_example

    def loaded(value: str | None) -> Any:
        return None if value is None else json.loads(value)

    with store.read_transaction() as db:
        rows = list(db.query("SELECT * FROM forgotten ORDER BY forget_id, example_id"))
    return [make_example(r["kind"], loaded(r["prompt"]), r["answer"], "teach", tools=loaded(r["tools"]),
                         tool_calls=loaded(r["tool_calls"])) for r in rows]


def purge_forgotten(store: ReplayStore) -> int:
    """Delete the kept text of forgotten examples (a rebuild without them is served); returns how many."""
    with store.write_transaction() as db:
        return db.execute("DELETE FROM forgotten").rowcount
