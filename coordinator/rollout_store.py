"""Rollout state in the coordinator's embedded SQLite: what a restarted coordinator resumes
from, and the lease that keeps two coordinators sharing the database from running
rollouts at once. Nodes keep their own truth (their digests and operation records);
this is the plan and how far it got.

The lease carries a fencing token that grows by one each time the lease changes hands.
The holder sends it with every node operation (nodes refuse a token older than the
newest they have seen) and every write of rollout progress checks it here, so a
coordinator that stalled past its lease and woke up cannot act on nodes or on the plan.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from google.protobuf.json_format import MessageToDict, ParseDict

from cluster.api import fleet_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
  id TEXT PRIMARY KEY, state TEXT NOT NULL, target TEXT NOT NULL, max_unavailable INTEGER NOT NULL,
  drain_timeout_s REAL NOT NULL, message TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
  updated REAL NOT NULL, owner TEXT NOT NULL DEFAULT '', started_by TEXT NOT NULL DEFAULT '',
  wait_timeout_s REAL NOT NULL DEFAULT 300);
CREATE TABLE IF NOT EXISTS rollout_nodes (
  rollout_id TEXT NOT NULL, node_id TEXT NOT NULL, position INTEGER NOT NULL,
  step TEXT NOT NULL DEFAULT 'pending', from_digest TEXT NOT NULL DEFAULT '',
  message TEXT NOT NULL DEFAULT '', started REAL NOT NULL DEFAULT 0, finished REAL NOT NULL DEFAULT 0,
  kept_out INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (rollout_id, node_id));
CREATE TABLE IF NOT EXISTS lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL,
  token INTEGER NOT NULL DEFAULT 0);
"""
# Columns added after the first release, added to an older database when it is opened.
_ADDED = (("lease", "token", "INTEGER NOT NULL DEFAULT 0"),
          ("rollouts", "wait_timeout_s", "REAL NOT NULL DEFAULT 300"),
          ("rollout_nodes", "kept_out", "INTEGER NOT NULL DEFAULT 0"))
ACTIVE = ("RUNNING", "PAUSED")
DEFAULT_WAIT_TIMEOUT_S = 300.0
TERMINAL_STEPS = ("done", "rolled_back", "failed", "skipped")


class LeaseLost(Exception):
    """Another coordinator took the rollout lease over: this one must stop acting."""


@dataclass(frozen=True)
class Lease:
    """The outcome of `acquire`: held (with its fencing token), or who holds it instead."""

    holder: str
    token: int = 0          # > 0 when held
    refused: str = ""       # why not held: who holds it and for how long

    @property
    def held(self) -> bool:
        return not self.refused


@dataclass
class NodeRow:
    node_id: str
    step: str = "pending"
    from_digest: str = ""
    message: str = ""
    started: float = 0.0
    finished: float = 0.0
    kept_out: bool = False   # out of service before the rollout: updated first, and left out afterwards


@dataclass
class RolloutRow:
    id: str
    state: str
    target: fleet_pb2.RolloutTarget
    max_unavailable: int
    drain_timeout_s: float
    message: str = ""
    created: float = 0.0
    updated: float = 0.0
    owner: str = ""
    started_by: str = ""
    nodes: list[NodeRow] = field(default_factory=list)
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S   # a wait longer than this pauses the rollout


class RolloutStore:
    """One connection, used from the event loop only (writes are few and small)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a step is recorded before it is acted on
        self._db.executescript(_SCHEMA)
        for table, column, decl in _ADDED:   # an older database
            if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self._db.close()

    # -- rollouts -----------------------------------------------------------------------
    def create(self, row: RolloutRow) -> None:
        now = time.time()
        with self._tx():
            self._db.execute("INSERT INTO rollouts (id, state, target, max_unavailable, drain_timeout_s, message, "
                             "created, updated, owner, started_by, wait_timeout_s) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             (row.id, row.state, json.dumps(MessageToDict(row.target)), row.max_unavailable,
                              row.drain_timeout_s, row.message, now, now, row.owner, row.started_by,
                              row.wait_timeout_s))
            self._db.executemany("INSERT INTO rollout_nodes (rollout_id, node_id, position, kept_out) VALUES (?,?,?,?)",
                                 [(row.id, n.node_id, i, int(n.kept_out)) for i, n in enumerate(row.nodes)])

    def get(self, rollout_id: str = "") -> Optional[RolloutRow]:
        """The rollout with this id, or the latest one."""
        sql = ("SELECT id, state, target, max_unavailable, drain_timeout_s, message, created, updated, owner, "
               "started_by, wait_timeout_s FROM rollouts "
               + ("WHERE id=?" if rollout_id else "ORDER BY created DESC LIMIT 1"))
        r = self._db.execute(sql, (rollout_id,) if rollout_id else ()).fetchone()
        if r is None:
            return None
        row = RolloutRow(id=r[0], state=r[1], target=ParseDict(json.loads(r[2]), fleet_pb2.RolloutTarget()),
                         max_unavailable=r[3], drain_timeout_s=r[4], message=r[5], created=r[6], updated=r[7],
                         owner=r[8], started_by=r[9], wait_timeout_s=r[10])
        row.nodes = [NodeRow(*n[:6], kept_out=bool(n[6])) for n in self._db.execute(
            "SELECT node_id, step, from_digest, message, started, finished, kept_out FROM rollout_nodes "
            "WHERE rollout_id=? ORDER BY position", (row.id,))]
        return row

    def active(self) -> Optional[RolloutRow]:
        r = self._db.execute("SELECT id FROM rollouts WHERE state IN (?,?) ORDER BY created DESC LIMIT 1",
                             ACTIVE).fetchone()
        return self.get(r[0]) if r else None

    def set_state(self, rollout_id: str, state: str, message: str, fence: Optional[Lease] = None) -> None:
        with self._tx():
            self._check(fence)
            self._db.execute("UPDATE rollouts SET state=?, message=?, updated=? WHERE id=?",
                             (state, message, time.time(), rollout_id))

    def set_owner(self, rollout_id: str, owner: str) -> None:
        self._db.execute("UPDATE rollouts SET owner=?, updated=? WHERE id=?", (owner, time.time(), rollout_id))

    def set_step(self, rollout_id: str, node: NodeRow, fence: Optional[Lease] = None) -> None:
        with self._tx():
            self._check(fence)
            self._db.execute("UPDATE rollout_nodes SET step=?, from_digest=?, message=?, started=?, finished=? "
                             "WHERE rollout_id=? AND node_id=?",
                             (node.step, node.from_digest, node.message, node.started, node.finished,
                              rollout_id, node.node_id))
            self._db.execute("UPDATE rollouts SET updated=? WHERE id=?", (time.time(), rollout_id))

    # -- the lease ----------------------------------------------------------------------
    def acquire(self, holder: str, ttl_s: float, name: str = "rollouts") -> Lease:
        """Take or renew the lease. Its fencing token grows whenever the lease changes hands
        (never on a renewal), and is kept when it is released, so it only ever increases."""
        now = time.time()
        with self._tx():
            r = self._db.execute("SELECT holder, expires, token FROM lease WHERE name=?", (name,)).fetchone()
            if r is not None and r[0] != holder and r[1] > now:
                return Lease(holder, refused=f"coordinator {r[0]} holds the rollout lease for another "
                                             f"{r[1] - now:.0f}s")
            token = r[2] if r is not None and r[0] == holder and r[2] > 0 else (r[2] if r else 0) + 1
            self._db.execute("INSERT OR REPLACE INTO lease (name, holder, expires, token) VALUES (?,?,?,?)",
                             (name, holder, now + ttl_s, token))
        return Lease(holder, token)

    def release(self, holder: str, name: str = "rollouts") -> None:
        """Free the lease at once (its token stays, for the next holder to exceed)."""
        self._db.execute("UPDATE lease SET expires=0 WHERE name=? AND holder=?", (name, holder))

    def lease(self, name: str = "rollouts") -> Optional[tuple[str, float, int]]:
        """(holder, expires, token) as stored, or None."""
        return self._db.execute("SELECT holder, expires, token FROM lease WHERE name=?", (name,)).fetchone()

    def _check(self, fence: Optional[Lease], name: str = "rollouts") -> None:
        """Inside a write transaction: LeaseLost unless `fence` is still the stored lease."""
        if fence is None:
            return
        r = self._db.execute("SELECT holder, token FROM lease WHERE name=?", (name,)).fetchone()
        if r is None or (r[0], r[1]) != (fence.holder, fence.token):
            raise LeaseLost(f"the rollout lease (token {fence.token}) passed to "
                            f"{r[0] if r else 'nobody'} (token {r[1] if r else 0}); this coordinator stops "
                            "acting on the rollout")

    def _tx(self):
        return _Immediate(self._db)


class _Immediate:
    """BEGIN IMMEDIATE ... COMMIT: the write lock is taken first, so two coordinators
    cannot both read "free" and both take the lease."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
