"""Shadow runs' definitions (`fleetctl shadow start|stop`; docs/shadow.md) in the state
database (coordinator/state/: SQLite or PostgreSQL): a restarted coordinator resumes the
latest run, and coordinators sharing the database run the same one. One row per run, its
settings, who started it and when, and when it stopped (0 while active). And each sampled
request's two sides' scores and timings (table shadow_outcomes, no content), written by the
coordinator that relayed it and read by every coordinator of the run, so each reports the
pooled figures. The methods block: callers run them in a thread, off the event loop."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import sqlalchemy as sa

from coordinator.shadow_report import Outcome
from coordinator.state import StateDB
from coordinator.state.schema import shadow_outcomes as O
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


@dataclass(frozen=True)
class StoredOutcome:
    id: int
    run_id: str
    instance: str  # the coordinator process that wrote it
    template: str
    side: str  # "live" or "candidate"
    outcome: Outcome


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
            db.execute(O.delete().where(O.c.run_id.not_in(sa.select(T.c.id).scalar_subquery())))

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

    def add_outcomes(self, instance: str, rows: list[tuple[str, str, str, Outcome, float]]) -> None:
        """The coordinator process `instance`'s outcomes, each (run id, template, side,
        outcome, when), in one transaction."""
        if not rows:
            return
        with self._state.begin() as db:
            db.execute(
                O.insert(),
                [
                    dict(
                        run_id=run_id,
                        instance=instance[:200],
                        template=template[:200],
                        side=side,
                        completed=int(o.completed),
                        latency_ms=o.latency_ms,
                        ttft_ms=o.ttft_ms,
                        score=o.score,
                        schema_valid=None if o.schema_valid is None else int(o.schema_valid),
                        parts=json.dumps(dict(o.parts)) if o.parts else "",
                        model=o.model[:200],
                        digest=o.digest[:200],
                        at=at,
                    )
                    for run_id, template, side, o, at in rows
                ],
            )

    def outcomes(self, run_id: str, after_id: int = 0) -> list[StoredOutcome]:
        """The run's outcomes with an id above `after_id`, oldest first."""
        with self._state.begin() as db:
            rows = db.execute(
                sa.select(O).where(O.c.run_id == run_id, O.c.id > after_id).order_by(O.c.id)
            ).all()
        out = []
        for r in rows:
            try:
                parts = tuple(sorted((str(k), float(v)) for k, v in json.loads(r.parts).items()))
            except (ValueError, TypeError, AttributeError):
                parts = ()
            outcome = Outcome(
                completed=bool(r.completed),
                latency_ms=r.latency_ms,
                ttft_ms=r.ttft_ms,
                score=r.score,
                schema_valid=None if r.schema_valid is None else bool(r.schema_valid),
                parts=parts,
                model=r.model,
                digest=r.digest,
            )
            out.append(StoredOutcome(r.id, r.run_id, r.instance, r.template, r.side, outcome))
        return out
