"""Shadow runs' definitions (`fleetctl shadow start|stop`; docs/shadow.md) in the state
database (coordinator/state/: SQLite or PostgreSQL): a restarted coordinator resumes the
latest run, and coordinators sharing the database run the same one. One row per run, its
settings, who started it and when, and when it stopped (0 while active). Scores and timings
stay in each coordinator's memory. The methods block: callers run them in a thread, off the
event loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import sqlalchemy as sa

from coordinator.state import StateDB
from coordinator.state.schema import shadow_runs as T

KEEP = 50  # runs kept; older rows are deleted as a new run starts


@dataclass(frozen=True)
class Row:
    id: str
    model: str
    fraction: float
    templates: frozenset[str]
    margin: float
    min_samples: int
    max_in_flight: int
    timeout_s: float
    started_by: str
    started_at: float
    stopped_at: float  # 0: active


class ShadowStore:
    def __init__(self, state: Union[StateDB, str, Path]):
        self._state, self._owned = StateDB.of(state)

    def close(self) -> None:
        if self._owned:
            self._state.close()

    def started(self, row: Row) -> None:
        """A new run; any other run still marked active is marked stopped when it started."""
        with self._state.begin() as db:
            db.execute(T.update().where(T.c.stopped_at == 0).values(stopped_at=row.started_at))
            db.execute(
                T.insert().values(
                    id=row.id,
                    model=row.model,
                    fraction=row.fraction,
                    templates=json.dumps(sorted(row.templates)),
                    margin=row.margin,
                    min_samples=row.min_samples,
                    max_in_flight=row.max_in_flight,
                    timeout_s=row.timeout_s,
                    started_by=row.started_by[:200],
                    started_at=row.started_at,
                    stopped_at=0.0,
                )
            )
            old = sa.select(T.c.id).order_by(T.c.started_at.desc()).offset(KEEP)
            db.execute(T.delete().where(T.c.id.in_(old.scalar_subquery())))

    def stopped(self, run_id: str, at: float) -> None:
        with self._state.begin() as db:
            db.execute(
                T.update().where(T.c.id == run_id, T.c.stopped_at == 0).values(stopped_at=at)
            )

    def latest(self) -> Optional[Row]:
        """The run started last (None: none yet); a row that no longer parses is skipped."""
        with self._state.begin() as db:
            r = db.execute(sa.select(T).order_by(T.c.started_at.desc()).limit(1)).first()
        if r is None:
            return None
        try:
            templates = frozenset(json.loads(r.templates or "[]"))
        except (ValueError, TypeError):
            return None
        return Row(
            r.id,
            r.model,
            r.fraction,
            templates,
            r.margin,
            r.min_samples,
            r.max_in_flight,
            r.timeout_s,
            r.started_by,
            r.started_at,
            r.stopped_at,
        )
