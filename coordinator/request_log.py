"""The request log: every request's metadata in the coordinator's state database
(coordinator/state/: SQLite or PostgreSQL, shared by coordinators on one database), kept `retention_days`, for `fleetctl requests` and the dashboard (docs/monitoring.md).

Metadata only: who, when, the queue / first-token / decode breakdown, tokens, nodes,
failovers and the outcome. No prompt, no completion: the schema has no column for them.
The audit chain stays the record of account; this is the operator's quick view.

`record` runs on the event loop and never waits: rows go to a writer thread that inserts
them in batches (one transaction each) and deletes expired rows hourly. A full queue
(the disk stalled) drops rows and counts them rather than slow a request. The last
`TRAFFIC_WINDOW_S` of requests are also kept in memory, for the dashboard's charts.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Union

import sqlalchemy as sa

from cluster.api import fleet_pb2
from cluster.metrics import percentile
from coordinator.request_summary import FAILED_OUTCOMES, REJECTED_OUTCOMES, RequestSummary
from coordinator.state import StateDB
from coordinator.state.schema import requests as Q

log = logging.getLogger(__name__)

COLUMNS = (
    "request_id",
    "caller",
    "priority",
    "started_at",
    "ended_at",
    "outcome",
    "code",
    "queue_ms",
    "ttft_ms",
    "decode_ms",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "nodes",
    "failovers",
    "retries",
    "restarts",
    "finish_reason",
    "quality_score",
    "template",
    "output_format",
    "schema_valid",
    "quality_parts",
)
QUEUE_MAX = 20_000
BATCH_MAX = 500
FLUSH_S = 0.25
PRUNE_EVERY_S = 3600.0
TRAFFIC_WINDOW_S = 24 * 3600.0  # ~6,000 notes a day: a day of summaries is a few MB


def _row(s: RequestSummary) -> dict:
    ms = lambda v: None if v is None else round(v * 1000.0, 3)  # noqa: E731
    return dict(
        zip(
            COLUMNS,
            (
                s.request_id,
                s.caller,
                s.priority,
                s.started_at,
                s.ended_at,
                s.outcome,
                s.code,
                ms(s.queue_s),
                ms(s.ttft_s),
                ms(s.decode_s),
                ms(s.duration_s),
                s.prompt_tokens,
                s.completion_tokens,
                json.dumps(s.nodes),
                s.failovers,
                s.retries,
                s.restarts,
                s.finish_reason,
                s.quality_score,
                s.template,
                s.output_format,
                None if s.schema_valid is None else int(s.schema_valid),
                json.dumps(s.quality_parts) if s.quality_parts else None,
            ),
        )
    )


class RequestLog:
    def __init__(
        self,
        state: Union[StateDB, str, Path],
        *,
        retention_days: float,
        clock: Callable[[], float] = time.time,
    ):
        self._state, self._owned = StateDB.of(state)  # the schema is up to date once open
        self.path = (
            self._state.path or self._state.shown
        )  # what log lines name (a URL without its password)
        self.retention_days = retention_days
        self._clock = clock
        self._queue: "queue.Queue[Optional[dict]]" = queue.Queue(QUEUE_MAX)
        self._recent: collections.deque[RequestSummary] = collections.deque()
        self.dropped = 0
        self._failing = False
        self._flushed = threading.Condition()
        self._queued = 0  # rows handed to the writer so far
        self._settled = 0  # of those, rows committed or lost
        self._closed = False
        self._prune(self._state)  # expired rows are gone before the first query
        self._writer = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._writer.start()

    # -- the event loop's side -----------------------------------------------------------------
    def record(self, summary: RequestSummary) -> None:
        if self._closed:
            self.dropped += 1
            return
        # The charts need no per-token gaps: a day of them would be ~100 MB at 6,000 notes.
        self._recent.append(replace(summary, token_gaps=[]))
        horizon = summary.ended_at - TRAFFIC_WINDOW_S
        while self._recent and self._recent[0].ended_at < horizon:
            self._recent.popleft()
        try:
            self._queue.put_nowait(_row(summary))
            with self._flushed:
                self._queued += 1
        except queue.Full:
            self.dropped += 1
            if not self._failing:
                self._failing = True
                log.error(
                    "request log %s is %d rows behind; dropping rows (the audit chain still has every "
                    "request); check the disk",
                    self.path,
                    QUEUE_MAX,
                )

    def traffic_reply(self, window_s: int, bucket_s: int) -> fleet_pb2.Traffic:
        """Every bucket of the window, oldest first, from the in-memory recent requests."""
        now = self._clock()
        end = (int(now) // bucket_s + 1) * bucket_s
        start = end - (window_s // bucket_s) * bucket_s
        groups: list[list[RequestSummary]] = [[] for _ in range((end - start) // bucket_s)]
        for s in self._recent:
            if start <= s.ended_at < end:
                groups[int((s.ended_at - start) // bucket_s)].append(s)
        out = fleet_pb2.Traffic(bucket_s=bucket_s)
        for i, group in enumerate(groups):
            out.buckets.append(_bucket(start + i * bucket_s, group))
        last_minute = sum(s.completion_tokens for s in self._recent if s.ended_at >= now - 60.0)
        out.tokens_per_s = last_minute / 60.0
        return out

    # -- the writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        db = self._state
        next_prune = self._clock() + PRUNE_EVERY_S  # the first prune ran at open
        stop = False
        while not stop:
            batch: list[dict] = []
            try:
                item = self._queue.get(timeout=FLUSH_S)
                while True:
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                    if len(batch) >= BATCH_MAX:
                        break
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                if batch:
                    self._insert(db, batch)
                if self._clock() >= next_prune:
                    self._prune(db)
                    next_prune = self._clock() + PRUNE_EVERY_S
            except Exception:  # noqa: BLE001 - the writer outlives a bug (_insert settles its rows)
                log.exception("request log %s: writer error; still writing", self.path)

    def _settle(self, rows: int) -> None:
        with self._flushed:
            self._settled += rows
            self._flushed.notify_all()

    def _insert(self, db: StateDB, batch: list[dict]) -> None:
        try:
            with db.begin() as conn:
                conn.execute(Q.insert(), batch)
            if self._failing and self._queue.qsize() < QUEUE_MAX // 2:
                self._failing = False
                log.info("request log %s is writing again", self.path)
        except Exception as exc:  # noqa: BLE001 - a database error, or a row the driver cannot bind
            self.dropped += len(batch)
            if not self._failing:
                self._failing = True
                log.error(
                    "request log %s: %d rows lost (%s); the audit chain still has them",
                    self.path,
                    len(batch),
                    _why(exc),
                )
        finally:
            self._settle(len(batch))

    def _prune(self, db: StateDB) -> None:
        try:
            with db.begin() as conn:
                gone = conn.execute(
                    Q.delete().where(Q.c.ended_at < self._clock() - self.retention_days * 86400.0)
                ).rowcount
            if gone:
                log.info(
                    "request log: %d rows past the %g-day retention deleted",
                    gone,
                    self.retention_days,
                )
        except sa.exc.SQLAlchemyError as exc:
            log.error("request log %s: retention delete failed (%s)", self.path, _why(exc))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every row recorded before this call is committed (or lost); rows
        recorded meanwhile are not waited for, so steady traffic cannot hold a query up."""
        with self._flushed:
            mark = self._queued
            return self._flushed.wait_for(lambda: self._settled >= mark, timeout=timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join(timeout=30)
        if self._owned:
            self._state.close()

    # -- queries (a worker thread) -----------------------------------------------------------------
    def list_reply(
        self, request: fleet_pb2.ListRequestsRequest, *, slow_ttft_ms: float, slow_latency_ms: float
    ) -> fleet_pb2.ListRequestsResponse:
        self.flush()
        where = [Q.c.ended_at >= self._clock() - (request.since_s or 3600.0)]
        if request.slow_only:
            where.append(sa.or_(Q.c.ttft_ms >= slow_ttft_ms, Q.c.latency_ms >= slow_latency_ms))
        for only, outcomes in (
            (request.failed_only, FAILED_OUTCOMES),
            (request.rejected_only, REJECTED_OUTCOMES),
        ):
            if only:
                where.append(Q.c.outcome.in_(list(outcomes)))
        if request.caller:
            where.append(_caller_is(request.caller))
        with self._state.begin() as db:
            matched = db.execute(
                sa.select(sa.func.count()).select_from(Q).where(*where)
            ).scalar_one()
            rows = db.execute(
                sa.select(*(Q.c[c] for c in COLUMNS))
                .where(*where)
                .order_by(Q.c.ended_at.desc())
                .limit(request.limit or 100)
            ).all()
        reply = fleet_pb2.ListRequestsResponse(
            matched=matched,
            slow_ttft_ms=slow_ttft_ms,
            slow_latency_ms=slow_latency_ms,
            retention_days=self.retention_days,
        )
        for row in rows:
            r = dict(zip(COLUMNS, row))
            r["nodes"] = json.loads(r["nodes"])
            r["quality_parts"] = json.loads(r["quality_parts"]) if r["quality_parts"] else {}
            for key in ("queue_ms", "ttft_ms", "quality_score", "schema_valid"):
                if r[key] is None:
                    r.pop(key)
            if "schema_valid" in r:
                r["schema_valid"] = bool(r["schema_valid"])
            reply.requests.append(fleet_pb2.RequestRecord(**r))
        return reply


def _caller_is(name: str):
    """caller is role/name exactly, or its name part (after the first '/') is `name` exactly:
    not LIKE, where `_` and (on SQLite) case would match more. substr and length are the
    same functions on SQLite and PostgreSQL."""
    tail = "/" + name
    length = sa.func.length(Q.c.caller)
    return sa.or_(
        Q.c.caller == name,
        sa.and_(
            length > len(tail),
            sa.func.substr(Q.c.caller, length - len(tail) + 1) == tail,
            ~sa.func.substr(Q.c.caller, 1, length - len(tail)).contains("/"),
        ),
    )


def _why(exc: Exception) -> str:
    """An error's type and first line: SQLAlchemy's own text would add the statement."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0][:300] if lines else ''}"


def _bucket(start: float, group: list[RequestSummary]) -> fleet_pb2.TrafficBucket:
    ttft = [s.ttft_s * 1000.0 for s in group if s.ttft_s is not None]
    itl = [
        s.decode_s * 1000.0 / (s.completion_tokens - 1) for s in group if s.completion_tokens > 1
    ]
    return fleet_pb2.TrafficBucket(
        start=start,
        requests=len(group),
        errors=sum(s.outcome in FAILED_OUTCOMES for s in group),
        rejected=sum(s.outcome in REJECTED_OUTCOMES for s in group),
        tokens=sum(s.completion_tokens for s in group),
        ttft_p50_ms=percentile(ttft, 0.5),
        ttft_p95_ms=percentile(ttft, 0.95),
        latency_p95_ms=percentile([s.duration_s * 1000.0 for s in group], 0.95),
        itl_p50_ms=statistics.median(itl) if itl else 0.0,
    )
