"""The review database: one SQLite file per reviewed split, an append-only log of verdicts.

The file holds a snapshot of the sampled items (so a rebuild cannot change what is being
reviewed) and every action of the reviewer as one row of ``events``: a tier verdict, an edit
of a tier's text, an item decision, or an undo (a row naming the event it cancels). Nothing is
ever updated or deleted (triggers refuse it); the state of an item is the fold of its events
(:func:`fold_events`). Each action is one ``BEGIN IMMEDIATE`` transaction, committed before
the server answers, in WAL mode with ``synchronous=FULL``: killing the server at any moment
loses no answered action, and two browser tabs writing at once are serialised by SQLite.
A write carries the item's revision the page last saw (``base``); when another tab has changed
the item since, the write is refused (:class:`StaleError`) instead of silently overwriting.

Tier verdicts (:data:`VERDICTS`): ``valid``; ``wrong_tier`` (true of the image but at the wrong
level of generality); ``not_entailed`` (not entailed by the more specific tiers); and, for train
items, ``contradiction_fails`` (the negative N_i does not contradict T_i). Item decisions:
``accept`` (every tier valid, as built), ``fix`` (kept with edited tiers) and ``reject`` (dropped).
Accept and fix mark every tier without a verdict (and, for fix, without an edit) valid. A verdict
or edit after a decision reopens the item.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from hierarcaps.hierarchy import N_TIERS, RELEASE_DELIMITER

SCHEMA_VERSION = 1
VERDICTS = ("valid", "wrong_tier", "not_entailed", "contradiction_fails")
DECISIONS = ("accept", "fix", "reject")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    position INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    row TEXT NOT NULL
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    position INTEGER NOT NULL REFERENCES items(position),
    kind TEXT NOT NULL CHECK (kind IN ('verdict', 'edit', 'decision', 'undo')),
    tier INTEGER CHECK (tier IS NULL OR tier BETWEEN 1 AND 4),
    value TEXT,
    undoes INTEGER UNIQUE REFERENCES events(id),
    created_at TEXT NOT NULL
);
CREATE INDEX events_position ON events(position);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the verdict log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the verdict log is append-only'); END;
"""


class ReviewError(ValueError):
    """A request the review cannot carry out; ``status`` is the HTTP status that fits it."""

    status = 400


class UnknownItemError(ReviewError):
    """No item at that position."""

    status = 404


class ConflictError(ReviewError):
    """The action does not fit the item's state (e.g. accepting an item with a wrong tier)."""

    status = 409


class StaleError(ConflictError):
    """The item changed (in another tab) since the page loaded it."""


@dataclass
class ItemState:
    """The reviewer's current view of one item: per-tier verdicts and edits, and the decision."""

    verdicts: list[str | None] = field(default_factory=lambda: [None] * N_TIERS)
    edits: list[str | None] = field(default_factory=lambda: [None] * N_TIERS)
    decision: str | None = None
    revision: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"verdicts": self.verdicts, "edits": self.edits, "decision": self.decision, "revision": self.revision}

    @property
    def fully_valid(self) -> bool:
        """Every tier judged valid (an edited tier is never valid: it needed fixing)."""
        return all(v == "valid" for v in self.verdicts) and not any(self.edits)


def fold_events(events: Sequence[Mapping[str, Any]]) -> ItemState:
    """The state of one item from its events (``id``, ``kind``, ``tier``, ``value``, ``undoes``), oldest first.

    ``revision`` is the id of the newest event touching the item (undos included), 0 when none.
    """
    undone = {e["undoes"] for e in events if e["kind"] == "undo"}
    state = ItemState()
    for event in events:
        state.revision = max(state.revision, event["id"])
        if event["kind"] == "undo" or event["id"] in undone:
            continue
        if event["kind"] == "decision":
            state.decision = event["value"]
            if event["value"] in ("accept", "fix"):
                state.verdicts = [
                    v if v is not None or e is not None else "valid" for v, e in zip(state.verdicts, state.edits)
                ]
            continue
        i = event["tier"] - 1
        if event["kind"] == "verdict":
            state.verdicts[i] = event["value"]
        else:
            state.edits[i] = event["value"]
        state.decision = None
    return state


def check_edit(text: str, original: str, tier: int) -> str | None:
    """The edit to store for a tier (``None`` when it restores the original); raises on a bad text."""
    if not isinstance(text, str) or not text.strip():
        raise ReviewError(f"tier T{tier}: the edit leaves the tier empty; type the corrected text or press Esc")
    if RELEASE_DELIMITER in text:
        raise ReviewError(f"tier T{tier}: the text contains the tier delimiter {RELEASE_DELIMITER.strip()!r}; remove it")
    return None if text == original else text


class ReviewStore:
    """One review database file; every method opens its own connection (safe across threads)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ReviewError(f"{self.path}: no review database; start one with `hierarcaps review`")
        with self._connect() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise ReviewError(
                    f"{self.path}: review database schema version {version}, this hierarcaps reads version "
                    f"{SCHEMA_VERSION}; use the hierarcaps version that made it or start a new --db"
                )
            self.meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            self.rows = [json.loads(r) for (r,) in conn.execute("SELECT row FROM items ORDER BY position")]

    @classmethod
    def create(cls, path: Path, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> "ReviewStore":
        """Write a new database with these item rows (schema rows) and metadata, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            conn = sqlite3.connect(tmp)
            try:
                with conn:
                    conn.executescript(_SCHEMA)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.executemany(
                        "INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()]
                    )
                    conn.executemany(
                        "INSERT INTO items VALUES (?, ?, ?)",
                        [(i, str(r["id"]), json.dumps(dict(r), ensure_ascii=False)) for i, r in enumerate(rows)],
                    )
                conn.execute("PRAGMA journal_mode = WAL")
            finally:
                conn.close()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(path)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        try:
            yield conn
        finally:
            conn.close()

    @property
    def total(self) -> int:
        return len(self.rows)

    def row(self, position: int) -> dict[str, Any]:
        """The schema row of the item at ``position``; :class:`UnknownItemError` when there is none."""
        if not isinstance(position, int) or not 0 <= position < self.total:
            raise UnknownItemError(f"no item {position}: this review has {self.total} items, 0..{self.total - 1}")
        return self.rows[position]

    def _events(self, conn: sqlite3.Connection, position: int | None = None) -> list[sqlite3.Row]:
        if position is None:
            return conn.execute("SELECT * FROM events ORDER BY id").fetchall()
        return conn.execute(
            "SELECT * FROM events WHERE position = ? ORDER BY id", (position,)
        ).fetchall()

    def state(self, position: int) -> ItemState:
        """The current state of one item."""
        self.row(position)
        with self._connect() as conn:
            return fold_events(self._events(conn, position))

    def states(self) -> list[ItemState]:
        """The current state of every item, in review order."""
        with self._connect() as conn:
            events = self._events(conn)
        by_item: list[list[sqlite3.Row]] = [[] for _ in range(self.total)]
        for event in events:
            by_item[event["position"]].append(event)
        return [fold_events(e) for e in by_item]

    def progress(self) -> dict[str, int]:
        """``{"done": items with a decision, "total": items}``."""
        return {"done": sum(s.decision is not None for s in self.states()), "total": self.total}

    def _append(self, position: int, base: int | None, kind: str, tier: int | None, value: str | None) -> ItemState:
        """Check the action against the item's state and append it, in one immediate transaction."""
        row = self.row(position)
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                state = fold_events(self._events(conn, position))
                if base is not None and base != state.revision:
                    raise StaleError(
                        f"item {position} changed since this page loaded it (another tab?); it has been reloaded, "
                        "check it and repeat the action"
                    )
                value = _checked_action(row, state, kind, tier, value)
                conn.execute(
                    "INSERT INTO events (position, kind, tier, value, created_at) VALUES (?, ?, ?, ?, ?)",
                    (position, kind, tier, value, _now()),
                )
                state = fold_events(self._events(conn, position))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return state

    def set_verdict(self, position: int, tier: int, verdict: str, base: int | None = None) -> ItemState:
        """Record a verdict on tier ``tier`` (1..4) of an item."""
        return self._append(position, base, "verdict", tier, verdict)

    def edit_tier(self, position: int, tier: int, text: str, base: int | None = None) -> ItemState:
        """Replace the text of tier ``tier``; the original text restores it."""
        return self._append(position, base, "edit", tier, text)

    def decide(self, position: int, decision: str, base: int | None = None) -> ItemState:
        """Accept, fix or reject the whole item."""
        return self._append(position, base, "decision", None, decision)

    def undo(self) -> tuple[int, ItemState]:
        """Cancel the newest action not yet undone (any item); returns its item's position and new state."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                target = conn.execute(
                    "SELECT id, position FROM events WHERE kind != 'undo' AND id NOT IN "
                    "(SELECT undoes FROM events WHERE undoes IS NOT NULL) ORDER BY id DESC LIMIT 1"
                ).fetchone()
                if target is None:
                    raise ConflictError("nothing to undo")
                conn.execute(
                    "INSERT INTO events (position, kind, undoes, created_at) VALUES (?, 'undo', ?, ?)",
                    (target["position"], target["id"], _now()),
                )
                state = fold_events(self._events(conn, target["position"]))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return target["position"], state


def _checked_action(row: Mapping[str, Any], state: ItemState, kind: str, tier: int | None, value: str | None) -> str | None:
    """The value to store for an action, after checking it fits the item; raises :class:`ReviewError`."""
    if kind in ("verdict", "edit") and (not isinstance(tier, int) or not 1 <= tier <= N_TIERS):
        raise ReviewError(f"tier {tier!r}: expected 1..{N_TIERS}")
    if kind == "verdict":
        if value not in VERDICTS:
            raise ReviewError(f"verdict {value!r}: expected one of {', '.join(VERDICTS)}")
        if value == "contradiction_fails" and not row["negative"]:
            raise ReviewError("contradiction_fails judges a negative tier; this item has no negatives")
        return value
    if kind == "edit":
        return check_edit(value, row["positive"][tier - 1], tier)  # type: ignore[index, arg-type]
    if value not in DECISIONS:
        raise ReviewError(f"decision {value!r}: expected one of {', '.join(DECISIONS)}")
    if value == "accept":
        bad = [f"T{i + 1}" for i, v in enumerate(state.verdicts) if v not in (None, "valid")]
        edited = [f"T{i + 1}" for i, e in enumerate(state.edits) if e is not None]
        if bad or edited:
            raise ConflictError(
                f"cannot accept: {', '.join(bad + edited)} {'is' if len(bad + edited) == 1 else 'are'} "
                "judged not valid or edited; use fix (with the corrected text) or reject"
            )
    if value == "fix":
        if not any(e is not None for e in state.edits):
            raise ConflictError("cannot fix: no tier is edited; edit a tier first (e), or accept or reject")
        unjudged = [f"T{i + 1}" for i, (v, e) in enumerate(zip(state.verdicts, state.edits)) if e is not None and v is None]
        if unjudged:
            raise ConflictError(f"cannot fix: edited {', '.join(unjudged)} has no verdict; say what was wrong with it")
        if any(v == "valid" and e is not None for v, e in zip(state.verdicts, state.edits)):
            raise ConflictError("cannot fix: a tier judged valid is edited; give it the verdict that explains the edit")
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
