"""Rollout state in the coordinator's state database (coordinator/state/: SQLite or
PostgreSQL): what a restarted coordinator resumes from, and the lease that keeps two
coordinators sharing the database from running rollouts at once. Nodes keep their own truth (their digests and operation records);
this is the plan and how far it got.

The lease carries a fencing token that grows by one each time the lease changes hands.
The holder sends it with every node operation (nodes refuse a token older than the
newest they have seen) and every write of rollout progress checks it here, so a
coordinator that stalled past its lease and woke up cannot act on nodes or on the plan.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import sqlalchemy as sa
from google.protobuf.json_format import MessageToDict, ParseDict

from cluster.api import fleet_pb2
from coordinator.state import StateDB
from coordinator.state.schema import lease as L
from coordinator.state.schema import rollout_nodes as N
from coordinator.state.schema import rollouts as R

ACTIVE = ("RUNNING", "PAUSED")
DEFAULT_WAIT_TIMEOUT_S = 300.0
TERMINAL_STEPS = ("done", "rolled_back", "failed", "skipped")


class LeaseLost(Exception):
    """Another coordinator took the rollout lease over: this one must stop acting."""


@dataclass(frozen=True)
class Lease:
    """The outcome of `acquire`: held (with its fencing token), or who holds it instead."""

    holder: str
    token: int = 0  # > 0 when held
    refused: str = ""  # why not held: who holds it and for how long

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
    kept_out: bool = (
        False  # out of service before the rollout: updated first, and left out afterwards
    )


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
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S  # a wait longer than this pauses the rollout


class RolloutStore:
    """Blocking: the coordinator calls it in a thread (asyncio.to_thread), never on its
    event loop, since a PostgreSQL across the network may be slow. Every write that acts under
    the lease checks it in the same transaction, holding the lease row (SQLite: BEGIN
    IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE), so a lease change and a fenced write
    never interleave."""

    def __init__(self, state: Union[StateDB, str, Path]):
        self._state, self._owned = StateDB.of(state)
        self.path = self._state.path  # the SQLite file; None on PostgreSQL

    def close(self) -> None:
        if self._owned:
            self._state.close()

    # -- rollouts -----------------------------------------------------------------------
    def create(self, row: RolloutRow) -> None:
        now = time.time()
        with self._state.begin(immediate=True) as db:
            db.execute(
                R.insert().values(
                    id=row.id,
                    state=row.state,
                    target=json.dumps(MessageToDict(row.target)),
                    max_unavailable=row.max_unavailable,
                    drain_timeout_s=row.drain_timeout_s,
                    message=row.message,
                    created=now,
                    updated=now,
                    owner=row.owner,
                    started_by=row.started_by,
                    wait_timeout_s=row.wait_timeout_s,
                )
            )
            if row.nodes:
                db.execute(
                    N.insert(),
                    [
                        {
                            "rollout_id": row.id,
                            "node_id": n.node_id,
                            "position": i,
                            "kept_out": int(n.kept_out),
                        }
                        for i, n in enumerate(row.nodes)
                    ],
                )

    def get(self, rollout_id: str = "") -> Optional[RolloutRow]:
        """The rollout with this id, or the latest one."""
        query = sa.select(
            R.c.id,
            R.c.state,
            R.c.target,
            R.c.max_unavailable,
            R.c.drain_timeout_s,
            R.c.message,
            R.c.created,
            R.c.updated,
            R.c.owner,
            R.c.started_by,
            R.c.wait_timeout_s,
        )
        query = (
            query.where(R.c.id == rollout_id)
            if rollout_id
            else query.order_by(R.c.created.desc()).limit(1)
        )
        with self._state.begin() as db:
            r = db.execute(query).first()
            if r is None:
                return None
            nodes = db.execute(
                sa.select(
                    N.c.node_id,
                    N.c.step,
                    N.c.from_digest,
                    N.c.message,
                    N.c.started,
                    N.c.finished,
                    N.c.kept_out,
                )
                .where(N.c.rollout_id == r[0])
                .order_by(N.c.position)
            ).all()
        row = RolloutRow(
            id=r[0],
            state=r[1],
            target=ParseDict(json.loads(r[2]), fleet_pb2.RolloutTarget()),
            max_unavailable=r[3],
            drain_timeout_s=r[4],
            message=r[5],
            created=r[6],
            updated=r[7],
            owner=r[8],
            started_by=r[9],
            wait_timeout_s=r[10],
        )
        row.nodes = [NodeRow(*n[:6], kept_out=bool(n[6])) for n in nodes]
        return row

    def active(self) -> Optional[RolloutRow]:
        with self._state.begin() as db:
            r = db.execute(
                sa.select(R.c.id).where(R.c.state.in_(ACTIVE)).order_by(R.c.created.desc()).limit(1)
            ).first()
        return self.get(r[0]) if r else None

    def set_state(
        self, rollout_id: str, state: str, message: str, fence: Optional[Lease] = None
    ) -> None:
        with self._state.begin(immediate=True) as db:
            self._check(db, fence)
            db.execute(
                R.update()
                .where(R.c.id == rollout_id)
                .values(state=state, message=message, updated=time.time())
            )

    def set_owner(self, rollout_id: str, owner: str) -> None:
        with self._state.begin() as db:
            db.execute(
                R.update().where(R.c.id == rollout_id).values(owner=owner, updated=time.time())
            )

    def set_step(self, rollout_id: str, node: NodeRow, fence: Optional[Lease] = None) -> None:
        with self._state.begin(immediate=True) as db:
            self._check(db, fence)
            db.execute(
                N.update()
                .where(N.c.rollout_id == rollout_id, N.c.node_id == node.node_id)
                .values(
                    step=node.step,
                    from_digest=node.from_digest,
                    message=node.message,
                    started=node.started,
                    finished=node.finished,
                )
            )
            db.execute(R.update().where(R.c.id == rollout_id).values(updated=time.time()))

    # -- the lease ----------------------------------------------------------------------
    def acquire(self, holder: str, ttl_s: float, name: str = "rollouts") -> Lease:
        """Take or renew the lease. Its fencing token grows whenever the lease changes hands
        (never on a renewal), and is kept when it is released, so it only ever increases."""
        now = time.time()
        with self._state.begin(immediate=True) as db:
            r = self._locked(db, name)
            if r is None:
                # The first lease ever: two coordinators may both get here; the primary key
                # lets one insert, the other's insert waits for it and does nothing, and
                # both then read (and lock) the one row.
                db.execute(_insert_new(db, name))
                r = self._locked(db, name)
            if r.holder not in ("", holder) and r.expires > now:
                return Lease(
                    holder,
                    refused=f"coordinator {r.holder} holds the rollout lease for another "
                    f"{r.expires - now:.0f}s",
                )
            token = r.token if r.holder == holder and r.token > 0 else r.token + 1
            db.execute(
                L.update()
                .where(L.c.name == name)
                .values(holder=holder, expires=now + ttl_s, token=token)
            )
        return Lease(holder, token)

    def release(self, holder: str, name: str = "rollouts") -> None:
        """Free the lease at once (its token stays, for the next holder to exceed)."""
        with self._state.begin(immediate=True) as db:
            db.execute(L.update().where(L.c.name == name, L.c.holder == holder).values(expires=0))

    def lease(self, name: str = "rollouts") -> Optional[tuple[str, float, int]]:
        """(holder, expires, token) as stored, or None."""
        with self._state.begin() as db:
            r = db.execute(
                sa.select(L.c.holder, L.c.expires, L.c.token).where(L.c.name == name)
            ).first()
        return None if r is None or r.token == 0 else tuple(r)

    @staticmethod
    def _locked(db, name: str):
        return db.execute(
            sa.select(L.c.holder, L.c.expires, L.c.token).where(L.c.name == name).with_for_update()
        ).first()

    def _check(self, db, fence: Optional[Lease], name: str = "rollouts") -> None:
        """Inside a write transaction: LeaseLost unless `fence` is still the stored lease."""
        if fence is None:
            return
        r = self._locked(db, name)
        if r is None or (r.holder, r.token) != (fence.holder, fence.token):
            raise LeaseLost(
                f"the rollout lease (token {fence.token}) passed to "
                f"{(r.holder if r else '') or 'nobody'} (token {r.token if r else 0}); this "
                "coordinator stops acting on the rollout"
            )


def _insert_new(db, name: str):
    """INSERT of a blank lease row (token 0, expired) that does nothing if the row exists."""
    if db.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return (
        insert(L)
        .values(name=name, holder="", expires=0, token=0)
        .on_conflict_do_nothing(index_elements=["name"])
    )
