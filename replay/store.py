"""The replay store: every served turn, the feedback on it, the training examples, and the updates that used them.

Contract:
- One SQLite file (WAL journal, ``synchronous=FULL``), migrated to the latest schema on open (see `schema.py`).
  The daemon holds one read-write `ReplayStore`; other processes (the CLI) may open the same file with
  `ReplayStore.open_readonly` while it runs.
- Thread-safe: one connection shared by all threads (asyncio code and FastAPI's threadpool), every call serialised
  by a re-entrant lock. Every write runs in one ``BEGIN IMMEDIATE`` transaction, so it is all-or-nothing and takes
  SQLite's write lock up front; that lock is also what makes "one running update" hold across processes.
- Training data is derived only from explicit signals (`add_feedback`, `add_taught`, `add_document`, `add_anchor`),
  never from an unrated served response. Examples are deduplicated by content hash: adding existing content
  returns the stored example with ``created=False`` (it keeps its first source and its consumed/pending state).
- Example life cycle: *pending* -> *in training* once a running update claims it (`claim_examples`; not counted
  as pending) -> in the *replay pool* when that update is promoted, *set aside* with the reason when it is
  rejected, pending again when it fails. An example can also be set aside before training (`finish_update`'s
  `set_aside`: it contradicts an earlier answer); set-aside examples wait, with their reason, until `requeue`
  makes them pending again. Anchors are their own pool and are never pending. Forgetting (`forgetting.py`) is the
  only way anything is deleted.
- Bad input raises `InvalidInput`, an unknown id `NotFound`, a second update `UpdateAlreadyRunning`, a write on a
  read-only store `ReadOnlyStore`; all derive from `StoreError`.
- Timestamps are ISO-8601 UTC strings. Interactions and updates come back as plain dicts (JSON fields decoded),
  examples as `Example` models.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlite_utils import Database

from .examples import EXAMPLE_SOURCES, Example, ToolCallError, make_example, utc_now
from .schema import SCHEMA_VERSION, SchemaError, current_version, migrate

# How long a writer waits for another process's write lock before giving up (SQLite busy timeout).
BUSY_TIMEOUT_S = 10.0


class StoreError(Exception):
    """Base class of the replay store's errors."""


class NotFound(StoreError, LookupError):
    """No row with the given id."""


class InvalidInput(StoreError, ValueError):
    """The arguments cannot be stored as given; the message says why, `param` names the field when one is at fault
    (tools and tool calls: ``tool_calls.0.function.name``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UpdateAlreadyRunning(StoreError):
    """An update is already running (possibly started by another process on the same file)."""

    def __init__(self, update_id: int):
        self.update_id = update_id
        super().__init__(f"update {update_id} is already running; only one update runs at a time")


class ReadOnlyStore(StoreError, PermissionError):
    """A write was attempted on a store opened with `ReplayStore.open_readonly`."""


class Interaction(BaseModel):
    """One served turn, as logged."""

    model_config = ConfigDict(allow_inf_nan=False)

    id: str = Field(min_length=1)
    created_at: str
    kind: Literal["chat", "completion"]
    prompt: list[dict] | str
    response: str
    model: str
    adapter_version: str | None
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    latency_ms: float = Field(ge=0)
    ttft_ms: float | None = Field(default=None, ge=0)
    finish_reason: str
    params: dict
    transport: str = "http"

    @model_validator(mode="after")
    def _prompt_matches_kind(self) -> "Interaction":
        if self.kind == "chat" and not isinstance(self.prompt, list):
            raise ValueError("a chat interaction's prompt must be a list of messages")
        if self.kind == "completion" and not isinstance(self.prompt, str):
            raise ValueError("a completion interaction's prompt must be a string")
        return self


class Update(BaseModel):
    """One training update: its state while running, then its verdict and metrics."""

    id: int
    trigger: str
    base_adapter: str | None
    status: Literal["running", "promoted", "rejected", "failed"]
    started_at: str
    finished_at: str | None
    progress: float
    message: str
    adapter_version: str | None
    metrics: dict
    reason: str | None
    example_ids: list[str]


UPDATE_STATUSES = ("running", "promoted", "rejected", "failed")


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def _finite_json(value: Any) -> Any:
    """Replace NaN/inf with None: JSON has no such numbers, and a diverged loss must still be recordable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{what} must be JSON-serialisable: {e}") from None


# Examples that a promoted update has used (the replay pool), that a running update is training on, that are set
# aside (with a reason); correlated on e.id.
_IN_REPLAY = """EXISTS (SELECT 1 FROM update_examples ue JOIN updates u ON u.id = ue.update_id
    WHERE ue.example_id = e.id AND u.status = 'promoted')"""
_IN_RUNNING = """EXISTS (SELECT 1 FROM update_examples ue JOIN updates u ON u.id = ue.update_id
    WHERE ue.example_id = e.id AND u.status = 'running')"""
_SET_ASIDE = "EXISTS (SELECT 1 FROM set_aside s WHERE s.example_id = e.id)"
_WITHDRAWN = "EXISTS (SELECT 1 FROM withdrawn w WHERE w.example_id = e.id)"
_WAITING_WHERE = f"e.source != 'anchor' AND NOT {_IN_REPLAY} AND NOT {_SET_ASIDE} AND NOT {_WITHDRAWN}"
_PENDING_WHERE = f"{_WAITING_WHERE} AND NOT {_IN_RUNNING}"
_REPLAY_WHERE = f"e.source != 'anchor' AND {_IN_REPLAY}"


def _logged_answer(interaction: dict) -> tuple[str, list[dict] | None]:
    """What a thumbs-up on a logged turn teaches: `(answer, tool_calls)`. The logged response, or, when it called
    tools (`params.tool_calls`, logged with the text outside the calls as `params.content`), those calls."""
    params = json.loads(interaction["params"])
    if params.get("tool_calls"):
        return params.get("content") or "", params["tool_calls"]
    return interaction["response"], None


class ReplayStore:
    """The daemon's SQLite replay store. See the module docstring for the contract."""

    def __init__(self, path: str | Path):
        self._open(Path(path), readonly=False)

    @classmethod
    def open_readonly(cls, path: str | Path) -> "ReplayStore":
        """Open an existing store for reading only (safe while the daemon writes to it). Writes raise
        `ReadOnlyStore`. The file must exist and already be at the latest schema version."""
        store = cls.__new__(cls)
        store._open(Path(path), readonly=True)
        return store

    def _open(self, path: Path, *, readonly: bool) -> None:
        self._path = path
        self._readonly = readonly
        self._lock = threading.RLock()
        self._closed = False
        if readonly:
            if not path.is_file():
                raise FileNotFoundError(f"no replay store at {path}")
            conn = sqlite3.connect(
                path.resolve().as_uri() + "?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                check_same_thread=False,
                isolation_level=None,
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write opens its own BEGIN IMMEDIATE.
            conn = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
        try:
            self._db = Database(conn, execute_plugins=False)
            self._db.execute("PRAGMA foreign_keys = ON")
            if readonly:
                self._db.execute("PRAGMA query_only = ON")
                version = current_version(self._db)
                if version != SCHEMA_VERSION:
                    hint = (
                        "open it read-write once (start the daemon) to migrate it"
                        if version < SCHEMA_VERSION
                        else "upgrade sloth-daemon"
                    )
                    raise SchemaError(
                        f"replay store {path} is at schema version {version}, this code reads {SCHEMA_VERSION}; {hint}"
                    )
            else:
                self._db.enable_wal()
                # FULL: a commit survives power loss, not only a process crash (feedback cannot be regenerated).
                self._db.execute("PRAGMA synchronous = FULL")
                migrate(self._db)
        except BaseException:
            conn.close()
            raise

    # ----------------------------------------------------------------------------------------- plumbing

    @property
    def path(self) -> Path:
        return self._path

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def schema_version(self) -> int:
        with self._read() as db:
            return current_version(db)

    def set_busy_timeout(self, seconds: float) -> None:
        """How long the next statements wait for another connection's lock before SQLite gives up with
        `sqlite3.OperationalError` ("database is locked"); the default is `BUSY_TIMEOUT_S`."""
        with self._lock:
            self._check_open()
            self._db.execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> "ReplayStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the replay store is closed")

    @contextmanager
    def _read(self) -> Iterator[Database]:
        """A consistent snapshot for several statements (one deferred read transaction)."""
        with self._lock:
            self._check_open()
            if self._db.conn.in_transaction:  # nested inside a write: already consistent
                yield self._db
                return
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.rollback()  # nothing to keep; ends the snapshot

    @contextmanager
    def _write(self) -> Iterator[Database]:
        if self._readonly:
            raise ReadOnlyStore(f"replay store {self._path} is open read-only")
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._db.rollback()
                raise

    def write_transaction(self) -> Any:
        """One BEGIN IMMEDIATE transaction over the sqlite-utils `Database`, for sibling modules of this package that
        need several statements at once (`forgetting.py`); committed on exit, rolled back on an error."""
        return self._write()

    def read_transaction(self) -> Any:
        """A consistent read snapshot over the `Database`, as `write_transaction` for reads."""
        return self._read()

    # ------------------------------------------------------------------------------------- interactions

    def log_interaction(
        self,
        *,
        id: str,
        kind: Literal["chat", "completion"],
        prompt: list[dict] | str,
        response: str,
        model: str,
        adapter_version: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float,
        ttft_ms: float | None,
        finish_reason: str,
        params: dict,
        transport: str = "http",
    ) -> None:
        """Record one served turn. The id is the caller's (the OpenAI response id); a duplicate raises InvalidInput."""
        try:
            row = Interaction(
                id=id,
                created_at=utc_now(),
                kind=kind,
                prompt=prompt,
                response=response,
                model=model,
                adapter_version=adapter_version,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency_ms=latency_ms,
                ttft_ms=ttft_ms,
                finish_reason=finish_reason,
                params=params,
                transport=transport,
            )
        except ValidationError as e:
            raise InvalidInput(f"invalid interaction: {_validation_message(e)}") from None
        record = row.model_dump()
        record["prompt"] = _dumps(row.prompt, "prompt")
        record["params"] = _dumps(row.params, "params")
        with self._write() as db:
            if db.execute("SELECT 1 FROM interactions WHERE id = ?", [id]).fetchone():
                raise InvalidInput(f"interaction {id!r} is already logged")
            db["interactions"].insert(record)

    def get_interaction(self, id: str) -> dict | None:
        with self._read() as db:
            rows = list(db.query("SELECT * FROM interactions WHERE id = ?", [id]))
        return self._interaction(rows[0]) if rows else None

    def list_interactions(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """Newest first."""
        if limit < 0 or offset < 0:
            raise InvalidInput("limit and offset must be >= 0")
        with self._read() as db:
            rows = list(
                db.query(
                    "SELECT * FROM interactions ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                    [limit, offset],
                )
            )
        return [self._interaction(r) for r in rows]

    def count_interactions(self) -> int:
        with self._read() as db:
            return db.execute("SELECT count(*) FROM interactions").fetchone()[0]

    @staticmethod
    def _interaction(row: dict) -> dict:
        row = dict(row, prompt=json.loads(row["prompt"]), params=json.loads(row["params"]))
        return Interaction.model_validate(row).model_dump()

    # ----------------------------------------------------------------------------------------- feedback

    def add_feedback(
        self,
        interaction_id: str,
        *,
        rating: Literal["up", "down"] | None = None,
        correction: str | None = None,
        comment: str | None = None,
        tool_calls: list[dict] | None = None,
    ) -> dict:
        """Attach a rating and/or a corrected answer to a logged turn. The latest feedback on a turn wins; it
        decides the turn's one training example:
        - a correction -> the corrected answer (source "correction"), whatever the rating; `tool_calls` make it an
          answer that calls tools (`correction` then the text before the calls, "" when None); the turn must have
          offered tools, and the example carries the tools the turn offered (as every example derived from a turn
          that offered tools does, so the prompt is trained as it was served);
        - "up" alone -> the turn's latest correction if it has one (an "up" after a fix endorses the fix, it does
          not add the bad answer), else the logged response (source "rated_up"; none when that response is empty:
          the rating is kept, there is nothing to learn); a response that called tools (its `params` hold
          `tool_calls`) is learnt as those calls and the text outside them (`params.content`), as a correction
          with the same calls would be;
        - "down" alone -> none, and it takes back an earlier "up" of the logged response (a correction stays: the
          answer it replaced was the bad one).
        Examples that earlier feedback on this turn derived and that this one replaces (a correction or an "up":
        every other one; a "down": the logged response's) are *withdrawn* if no update has trained on them yet and
        nothing else (teaching, another turn's feedback) also gave them; ones already learnt stay learnt
        (forgetting them is a separate, explicit action) and are returned as `already_learnt`.
        Returns feedback_id, interaction_id, example_id, withdrawn (ids), already_learnt (ids)."""
        if rating not in (None, "up", "down"):
            raise InvalidInput(f"rating must be 'up' or 'down', not {rating!r}")
        if correction is not None and not isinstance(correction, str):
            raise InvalidInput("correction must be a string")
        if comment is not None and not isinstance(comment, str):
            raise InvalidInput("comment must be a string")
        if tool_calls is not None and correction is None:
            correction = ""  # a correction that only calls tools
        if rating is None and correction is None:
            raise InvalidInput("feedback needs a rating ('up'/'down') or a correction")
        with self._write() as db:
            rows = list(db.query("SELECT kind, prompt, response, params FROM interactions WHERE id = ?",
                                 [interaction_id]))
            if not rows:
                raise NotFound(f"no logged interaction {interaction_id!r}")
            inter = rows[0]
            example: Example | None = None
            earlier = [r[0] for r in db.execute(
                "SELECT f.example_id FROM feedback f WHERE f.interaction_id = ? AND f.example_id IS NOT NULL "
                "ORDER BY f.id", [interaction_id])]
            last_fix = [r[0] for r in db.execute(
                "SELECT f.example_id FROM feedback f WHERE f.interaction_id = ? AND f.correction IS NOT NULL "
                "ORDER BY f.id DESC LIMIT 1", [interaction_id])]
            if correction is None and rating == "up" and last_fix:
                example = self._example(next(iter(db.query("SELECT * FROM examples WHERE id = ?", last_fix))))
            elif correction is not None or rating == "up":
                source = "correction" if correction is not None else "rated_up"
                answer, calls = (correction, tool_calls) if correction is not None else _logged_answer(inter)
                tools = json.loads(inter["params"]).get("tools") or None
                if tool_calls is not None and correction is not None and not tools:
                    raise InvalidInput(f"tool_calls: turn {interaction_id!r} offered no tools, so its correction "
                                       "cannot call one", "tool_calls")
                try:
                    candidate = make_example(inter["kind"], json.loads(inter["prompt"]), answer, source, tools=tools,
                                             tool_calls=calls)
                except ToolCallError as e:
                    raise InvalidInput(str(e), e.param) from None
                except ValueError as e:
                    if correction is not None:
                        raise InvalidInput(f"cannot derive a training example from this feedback: {e}") from None
                    candidate = None  # a thumbs-up on an empty answer: the rating is kept, there is nothing to learn
                if candidate is not None:
                    example, _ = self._insert_example(db, candidate)
            table = db["feedback"]
            table.insert(
                {
                    "interaction_id": interaction_id,
                    "created_at": utc_now(),
                    "rating": rating,
                    "correction": correction,
                    "comment": comment,
                    "example_id": example.id if example else None,
                    "tool_calls": None if example is None or example.tool_calls is None or correction is None
                    else json.dumps(example.tool_calls, ensure_ascii=False),
                }
            )
            feedback_id = int(table.last_pk)
            keep = example.id if example else None
            if keep is not None:
                db.execute("DELETE FROM withdrawn WHERE example_id = ?", [keep])  # given again: it counts again
            withdrawn, learnt = [], []
            replaced = [e for e in dict.fromkeys(earlier) if e != keep]
            if correction is None and rating == "down":
                answers = [inter["response"], _logged_answer(inter)[0]]
                replaced = [e for e in replaced if db.execute(
                    "SELECT 1 FROM examples WHERE id = ? AND answer IN (?, ?)", [e, *answers]).fetchone()]
            for old in replaced:
                if self._learnt(db, old):
                    learnt.append(old)
                elif not self._given_elsewhere(db, old, interaction_id):
                    db.execute("INSERT OR REPLACE INTO withdrawn (example_id, feedback_id, created_at) VALUES (?, ?, ?)",
                               [old, feedback_id, utc_now()])
                    withdrawn.append(old)
        return {"feedback_id": feedback_id, "interaction_id": interaction_id, "example_id": keep,
                "withdrawn": withdrawn, "already_learnt": learnt}

    @staticmethod
    def _learnt(db: Database, example_id: str) -> bool:
        """Trained by a promoted update, or being trained by the running one."""
        return db.execute(
            "SELECT 1 FROM update_examples ue JOIN updates u ON u.id = ue.update_id WHERE ue.example_id = ? "
            "AND u.status IN ('promoted', 'running')", [example_id]).fetchone() is not None

    @staticmethod
    def _given_elsewhere(db: Database, example_id: str, interaction_id: str) -> bool:
        """Whether something other than this turn's feedback also gave the example (teaching, another turn)."""
        row = db.execute("SELECT source FROM examples WHERE id = ?", [example_id]).fetchone()
        if row is None or row[0] not in ("correction", "rated_up"):
            return True
        return db.execute("SELECT 1 FROM feedback WHERE example_id = ? AND interaction_id != ?",
                          [example_id, interaction_id]).fetchone() is not None

    def feedback_for(self, interaction_ids: list[str]) -> dict[str, list[dict]]:
        """The feedback given on each of these turns, oldest first: {interaction_id: [{created_at, rating,
        correction, comment, example_id}]} (turns without feedback are absent); `id` is the feedback id."""
        out: dict[str, list[dict]] = {}
        with self._read() as db:
            for start in range(0, len(interaction_ids), 500):  # SQLite's bound-parameter limit
                chunk = interaction_ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for row in db.query(f"SELECT interaction_id, id, created_at, rating, correction, comment, example_id, "
                                    f"tool_calls FROM feedback WHERE interaction_id IN ({marks}) ORDER BY id", chunk):
                    calls = row.pop("tool_calls")
                    if calls is not None:
                        row["tool_calls"] = json.loads(calls)
                    out.setdefault(row.pop("interaction_id"), []).append(row)
        return out

    # ----------------------------------------------------------------------------------------- examples

    def add_taught(self, prompt: list[dict] | str, answer: str, *, tools: list[dict] | None = None,
                   tool_calls: list[dict] | None = None) -> tuple[Example, bool]:
        """A prompt with the answer it should get: a message list -> chat example, a string -> completion; a chat
        prompt may offer `tools` and the answer call them (`tool_calls`, `answer` then the text before them)."""
        return self._add("teach", self._kind_of(prompt), prompt, answer, tools=tools, tool_calls=tool_calls)

    def add_document(self, text: str) -> tuple[Example, bool]:
        """Plain text for continued pretraining."""
        return self._add("document", "document", None, text)

    def add_examples(self, items: list[tuple]) -> list[tuple[Example, bool]]:
        """Add many `(source, kind, prompt, answer)` examples (optionally a fifth item: `{"tools", "tool_calls"}`) in
        one transaction: all are stored or none (a dataset import). Each is validated first; the first bad one
        raises `InvalidInput` naming its index."""
        candidates = []
        for i, (source, kind, prompt, answer, *extra) in enumerate(items):
            try:
                candidates.append(make_example(kind, prompt, answer, source, **(extra[0] if extra else {})))
            except ValueError as e:
                raise InvalidInput(f"example {i}: {e}") from None
        with self._write() as db:
            return [self._insert_example(db, c) for c in candidates]

    def add_anchor(self, prompt: list[dict] | str, answer: str) -> tuple[Example, bool]:
        """An example of the base model's behaviour to preserve (never pending; its own pool)."""
        return self._add("anchor", self._kind_of(prompt), prompt, answer)

    @staticmethod
    def _kind_of(prompt: Any) -> str:
        if isinstance(prompt, list):
            return "chat"
        if isinstance(prompt, str):
            return "completion"
        raise InvalidInput("prompt must be a list of chat messages or a string")

    def _add(self, source: str, kind: str, prompt: Any, answer: str, **tool_use: Any) -> tuple[Example, bool]:
        try:
            candidate = make_example(kind, prompt, answer, source, **tool_use)
        except ToolCallError as e:
            raise InvalidInput(str(e), e.param) from None
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        with self._write() as db:
            return self._insert_example(db, candidate)

    def _insert_example(self, db: Database, example: Example) -> tuple[Example, bool]:
        """Insert unless the content exists; returns the stored example and whether it is new. Caller holds a write."""
        rows = list(db.query("SELECT * FROM examples WHERE content_hash = ?", [example.content_hash]))
        if rows:
            return self._example(rows[0]), False
        record = example.model_dump()
        record["prompt"] = None if example.prompt is None else json.dumps(example.prompt, ensure_ascii=False)
        for key in ("tools", "tool_calls"):
            record[key] = None if record[key] is None else json.dumps(record[key], ensure_ascii=False)
        db["examples"].insert(record)
        return example, True

    def get_example(self, id: str) -> Example | None:
        with self._read() as db:
            rows = list(db.query("SELECT * FROM examples WHERE id = ?", [id]))
        return self._example(rows[0]) if rows else None

    def _examples_where(self, where: str, params: list | None = None) -> list[Example]:
        with self._read() as db:
            rows = list(db.query(f"SELECT * FROM examples e WHERE {where} ORDER BY e.created_at, e.rowid", params or []))
        return [self._example(r) for r in rows]

    def _count_where(self, where: str) -> int:
        with self._read() as db:
            return db.execute(f"SELECT count(*) FROM examples e WHERE {where}").fetchone()[0]

    def pending_examples(self) -> list[Example]:
        """Non-anchor examples waiting for an update (not learnt, not set aside, not being trained), oldest first."""
        return self._examples_where(_PENDING_WHERE)

    def count_pending(self) -> int:
        return self._count_where(_PENDING_WHERE)

    def replay_pool(self) -> list[Example]:
        """Non-anchor examples used by promoted updates (what the served adapter has learned), oldest first."""
        return self._examples_where(_REPLAY_WHERE)

    def anchors(self) -> list[Example]:
        return self._examples_where("e.source = 'anchor'")

    def count_anchors(self) -> int:
        return self._count_where("e.source = 'anchor'")

    @staticmethod
    def _example(row: dict) -> Example:
        prompt = None if row["prompt"] is None else json.loads(row["prompt"])
        tool_use = {k: json.loads(row[k]) for k in ("tools", "tool_calls") if row.get(k) is not None}
        return Example.model_validate(dict(row, prompt=prompt, **tool_use))

    # ------------------------------------------------------------------------------------------ updates

    def begin_update(self, *, trigger: str, base_adapter: str | None) -> int:
        """Record a new running update and return its id; raises UpdateAlreadyRunning if one is running (in any
        process using this file)."""
        if not isinstance(trigger, str) or not trigger:
            raise InvalidInput("trigger must be a non-empty string")
        with self._write() as db:
            running = db.execute("SELECT id FROM updates WHERE status = 'running'").fetchone()
            if running:
                raise UpdateAlreadyRunning(running[0])
            table = db["updates"]
            table.insert(
                {"trigger": trigger, "base_adapter": base_adapter, "status": "running", "started_at": utc_now()}
            )
            return int(table.last_pk)

    def set_update_progress(self, update_id: int, progress: float, message: str = "") -> None:
        """Progress in [0, 1] of a running update."""
        if not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:  # also rejects NaN
            raise InvalidInput(f"progress must be a number in [0, 1], not {progress!r}")
        if not isinstance(message, str):
            raise InvalidInput("message must be a string")
        with self._write() as db:
            self._require_running(db, update_id)
            db.execute("UPDATE updates SET progress = ?, message = ? WHERE id = ?", [float(progress), message, update_id])

    def finish_update(
        self,
        update_id: int,
        *,
        status: Literal["promoted", "rejected", "failed"],
        adapter_version: str | None,
        metrics: dict,
        reason: str | None,
        example_ids: list[str],
        set_aside: dict[str, str] | None = None,
    ) -> None:
        """Record a running update's verdict. The examples it trained on (`example_ids`, plus any it claimed) are
        linked to it: promoted -> they join the replay pool; rejected -> those not already learnt (a rebuild
        retrains learnt ones) are set aside with the reason "update N rejected: <reason>"; failed -> they are pending again. `set_aside` ({example id: reason}) sets
        further examples aside whatever the status (new examples that contradict an earlier answer).
        Non-finite metric values are stored as null."""
        if status not in ("promoted", "rejected", "failed"):
            raise InvalidInput(f"status must be 'promoted', 'rejected' or 'failed', not {status!r}")
        if status == "promoted" and not adapter_version:
            raise InvalidInput("a promoted update needs its adapter_version")
        if not isinstance(metrics, dict):
            raise InvalidInput("metrics must be a dict")
        metrics_json = _dumps(_finite_json(metrics), "metrics")
        if isinstance(example_ids, str) or not all(isinstance(i, str) for i in example_ids):
            raise InvalidInput("example_ids must be a list of example id strings")
        ids = list(dict.fromkeys(example_ids))
        with self._write() as db:
            self._require_running(db, update_id)
            known: set[str] = set()
            for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                known.update(r[0] for r in db.execute(f"SELECT id FROM examples WHERE id IN ({marks})", chunk))
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise InvalidInput(f"unknown example ids: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
            db.execute(
                "UPDATE updates SET status = ?, finished_at = ?, adapter_version = ?, metrics = ?, reason = ? WHERE id = ?",
                [status, utc_now(), adapter_version, metrics_json, reason, update_id],
            )
            db.conn.executemany(
                "INSERT OR IGNORE INTO update_examples (update_id, example_id) VALUES (?, ?)",
                [(update_id, i) for i in ids],
            )
            aside = dict(set_aside or {})
            if status == "rejected":
                linked = [r[0] for r in db.execute(  # already learnt ones stay learnt (a rebuild retrains them)
                    f"SELECT ue.example_id FROM update_examples ue JOIN examples e ON e.id = ue.example_id "
                    f"WHERE ue.update_id = ? AND NOT {_IN_REPLAY}", [update_id])]
                for i in linked:
                    aside.setdefault(i, f"update {update_id} rejected: {reason or 'no reason given'}")
            self._set_aside(db, aside, update_id)

    def claim_examples(self, update_id: int, example_ids: list[str]) -> None:
        """Link the examples a running update trains on to it now, so they stop counting as pending while it runs
        (they are pending again if it fails)."""
        with self._write() as db:
            self._require_running(db, update_id)
            db.conn.executemany("INSERT OR IGNORE INTO update_examples (update_id, example_id) VALUES (?, ?)",
                                [(update_id, i) for i in dict.fromkeys(example_ids)])

    def _set_aside(self, db: Database, reasons: dict[str, str], update_id: int | None) -> None:
        now = utc_now()
        db.conn.executemany(
            "INSERT OR REPLACE INTO set_aside (example_id, update_id, reason, created_at) VALUES (?, ?, ?, ?)",
            [(i, update_id, r, now) for i, r in reasons.items()],
        )

    def set_aside_examples(self, limit: int = 100) -> list[dict]:
        """Examples kept out of training, newest first: {example_id, update_id, reason, created_at, example}."""
        with self._read() as db:
            rows = list(db.query(
                "SELECT s.example_id, s.update_id, s.reason, s.created_at, e.* FROM set_aside s "
                "JOIN examples e ON e.id = s.example_id ORDER BY s.created_at DESC, s.rowid DESC LIMIT ?", [limit]))
        return [{"example_id": r["example_id"], "update_id": r["update_id"], "reason": r["reason"],
                 "set_aside_at": r["created_at"], "example": self._example(r).model_dump()} for r in rows]

    def count_set_aside(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT count(*) FROM set_aside").fetchone()[0])

    def requeue(self, example_ids: list[str] | None = None) -> int:
        """Make set-aside examples pending again (all of them when `example_ids` is None); returns how many."""
        with self._write() as db:
            if example_ids is None:
                return db.execute("DELETE FROM set_aside").rowcount
            return sum(db.execute("DELETE FROM set_aside WHERE example_id = ?", [i]).rowcount
                       for i in dict.fromkeys(example_ids))

    def fail_running_updates(self, reason: str) -> int:
        """Mark every running update failed (called at daemon start: a running row then means a crash).
        Returns how many were marked."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE updates SET status = 'failed', finished_at = ?, reason = ? WHERE status = 'running'",
                [utc_now(), reason],
            )
            return cur.rowcount

    @staticmethod
    def _require_running(db: Database, update_id: int) -> None:
        row = db.execute("SELECT status FROM updates WHERE id = ?", [update_id]).fetchone()
        if row is None:
            raise NotFound(f"no update {update_id}")
        if row[0] != "running":
            raise InvalidInput(f"update {update_id} is not running (it is {row[0]})")

    def get_update(self, update_id: int) -> dict | None:
        with self._read() as db:
            rows = list(db.query("SELECT * FROM updates WHERE id = ?", [update_id]))
            return self._update(db, rows[0]) if rows else None

    def list_updates(self, limit: int = 20) -> list[dict]:
        """Newest first."""
        if limit < 0:
            raise InvalidInput("limit must be >= 0")
        with self._read() as db:
            rows = list(db.query("SELECT * FROM updates ORDER BY id DESC LIMIT ?", [limit]))
            return [self._update(db, r) for r in rows]

    def running_update(self) -> dict | None:
        with self._read() as db:
            rows = list(db.query("SELECT * FROM updates WHERE status = 'running' ORDER BY id LIMIT 1"))
            return self._update(db, rows[0]) if rows else None

    @staticmethod
    def _update(db: Database, row: dict) -> dict:
        ids = [
            r[0]
            for r in db.execute(
                "SELECT example_id FROM update_examples WHERE update_id = ? ORDER BY rowid", [row["id"]]
            )
        ]
        return Update.model_validate(dict(row, metrics=json.loads(row["metrics"]), example_ids=ids)).model_dump()

    # -------------------------------------------------------------------------------------------- stats

    def stats(self) -> dict:
        """Counts for status pages and `sloth-daemon replay stats`, from one consistent snapshot."""
        with self._read() as db:

            def scalar(sql: str) -> int:
                return int(db.execute(sql).fetchone()[0] or 0)

            by_source = dict.fromkeys(EXAMPLE_SOURCES, 0)
            by_source.update(db.execute("SELECT source, count(*) FROM examples GROUP BY source").fetchall())
            by_status = dict.fromkeys(UPDATE_STATUSES, 0)
            by_status.update(db.execute("SELECT status, count(*) FROM updates GROUP BY status").fetchall())
            return {
                "schema_version": current_version(db),
                "interactions": scalar("SELECT count(*) FROM interactions"),
                "feedback": {
                    "total": scalar("SELECT count(*) FROM feedback"),
                    "up": scalar("SELECT count(*) FROM feedback WHERE rating = 'up'"),
                    "down": scalar("SELECT count(*) FROM feedback WHERE rating = 'down'"),
                    "corrections": scalar("SELECT count(*) FROM feedback WHERE correction IS NOT NULL"),
                },
                "examples": {**by_source, "total": sum(by_source.values())},
                "pending": scalar(f"SELECT count(*) FROM examples e WHERE {_PENDING_WHERE}"),
                "set_aside": scalar("SELECT count(*) FROM set_aside"),
                "withdrawn": scalar("SELECT count(*) FROM withdrawn"),
                "replay_pool": scalar(f"SELECT count(*) FROM examples e WHERE {_REPLAY_WHERE}"),
                "anchors": by_source["anchor"],
                "updates": {**by_status, "total": sum(by_status.values())},
            }
