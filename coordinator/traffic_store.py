"""The traffic policies operators set (`fleetctl traffic`; docs/traffic.md), in the state
database (coordinator/state/: SQLite or PostgreSQL): a restarted coordinator keeps them, and
coordinators sharing the database follow the same ones. One row per model id or "*"; a
cleared policy stays as a row with no weights, so every coordinator clears it too. The
methods block: callers run them in a thread, off the event loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import sqlalchemy as sa

from cluster.traffic import Policy
from coordinator.state import StateDB
from coordinator.state.schema import traffic_policies as T


@dataclass(frozen=True)
class Row:
    model: str
    policy: Optional[Policy]  # None: cleared
    set_by: str
    set_at: float  # unix seconds: the row's version


class TrafficStore:
    def __init__(self, state: Union[StateDB, str, Path]):
        self._state, self._owned = StateDB.of(state)

    def close(self) -> None:
        if self._owned:
            self._state.close()

    def save(self, model: str, policy: Optional[Policy], set_by: str, set_at: float) -> None:
        """Write (or replace) `model`'s row; `policy` None clears it."""
        weights = json.dumps(dict(policy.weights)) if policy is not None else ""
        overflow = policy.overflow if policy is not None else ""
        with self._state.begin() as db:
            db.execute(T.delete().where(T.c.model == model))
            db.execute(
                T.insert().values(
                    model=model,
                    weights=weights,
                    overflow=overflow,
                    set_by=set_by[:200],
                    set_at=set_at,
                )
            )

    def load(self) -> list[Row]:
        """Every row; a row that no longer parses (a hand edit) is skipped."""
        with self._state.begin() as db:
            rows = db.execute(sa.select(T)).all()
        out = []
        for r in rows:
            policy = None
            if r.weights:
                try:
                    policy = Policy.parse(r.model, json.loads(r.weights), r.overflow)
                except (ValueError, TypeError, AttributeError):
                    continue
            out.append(Row(r.model, policy, r.set_by, r.set_at))
        return out
