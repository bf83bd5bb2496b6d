"""The eval gate's baselines (coordinator/gates.py EvalGate): the current version's score on
a node, measured before the rollout drains it, which each updated node's new score is
compared with. In the coordinator's state database (coordinator/state/: SQLite or
PostgreSQL), so a rollout another coordinator takes over (its holder died) or resumes
compares with the baseline its first runner measured instead of checking the floor only.

Reports hold scores, timings and case ids, never a note (cluster/quality/evaluation.py).
The methods are coroutines; BaselineStore runs its queries in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Optional, Union

import sqlalchemy as sa

from cluster.quality import evaluation
from coordinator.state import StateDB
from coordinator.state.schema import eval_baselines as B


class MemoryBaselines:
    """Baselines of this process only (an EvalGate built without a state database)."""

    def __init__(self) -> None:
        self._reports: dict[tuple[str, str], evaluation.Report] = {}

    async def has(self, rollout_id: str, digest: str) -> bool:
        return (rollout_id, digest) in self._reports

    async def get(self, rollout_id: str) -> Optional[evaluation.Report]:
        return next((r for (rid, _), r in self._reports.items() if rid == rollout_id), None)

    async def put(self, rollout_id: str, digest: str, report: evaluation.Report) -> None:
        # One rollout runs at a time: earlier rollouts' baselines are not needed again.
        self._reports = {k: r for k, r in self._reports.items() if k[0] == rollout_id}
        self._reports[(rollout_id, digest)] = report


class BaselineStore:
    """The eval_baselines table: one report per (rollout, digest); the first one kept."""

    def __init__(self, state: Union[StateDB, str, Path]):
        self._state, self._owned = StateDB.of(state)

    def close(self) -> None:
        if self._owned:
            self._state.close()

    async def has(self, rollout_id: str, digest: str) -> bool:
        return await asyncio.to_thread(self._has, rollout_id, digest)

    async def get(self, rollout_id: str) -> Optional[evaluation.Report]:
        text = await asyncio.to_thread(self._get, rollout_id)
        return evaluation.Report.from_json(text) if text is not None else None

    async def put(self, rollout_id: str, digest: str, report: evaluation.Report) -> None:
        await asyncio.to_thread(self._put, rollout_id, digest, report.to_json())

    def _has(self, rollout_id: str, digest: str) -> bool:
        with self._state.begin() as db:
            return (
                db.execute(
                    sa.select(B.c.rollout_id).where(
                        B.c.rollout_id == rollout_id, B.c.digest == digest
                    )
                ).first()
                is not None
            )

    def _get(self, rollout_id: str) -> Optional[str]:
        with self._state.begin() as db:
            return db.execute(
                sa.select(B.c.report)
                .where(B.c.rollout_id == rollout_id)
                .order_by(B.c.created)
                .limit(1)
            ).scalar()

    def _put(self, rollout_id: str, digest: str, text: str) -> None:
        with self._state.begin() as db:
            # One rollout runs at a time per database: earlier rollouts' baselines go.
            db.execute(B.delete().where(B.c.rollout_id != rollout_id))
            db.execute(
                _insert(db)
                .values(rollout_id=rollout_id, digest=digest, report=text, created=time.time())
                .on_conflict_do_nothing(index_elements=["rollout_id", "digest"])
            )


def _insert(db):
    if db.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(B)
