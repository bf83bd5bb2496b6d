"""Shadow evaluation (docs/shadow.md): a sample of live requests is also sent to nodes
serving a candidate model. The caller gets only the live output; of the copy the coordinator
reads only the node's final record (quality score, schema check, timings) and drops every
token as it arrives. Both sides' outcomes go to the run's report (coordinator/shadow_report.py)
and, with a state database, to its shadow_outcomes table, from which every coordinator of the
run reads the others' (so each reports the pooled scores).

Copies are best effort: only to READY nodes serving the candidate, only while nothing waits
in the admission queue, at most `max_in_flight` at once, never queued on a node; anything
else is dropped and counted. A remote node (engine "upstream") gets copies only if it declared
--phi-allowed. Each copy is one audit record of its own type, `shadow` (never a second
outcome of the caller's request), without content. A copy is not a caller's request: it
never reaches the request log or the request metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster.api import inference_pb2, shadow_pb2
from cluster.quality import prompts
from cluster.routing import Want
from cluster.validation import serves, valid_id
from coordinator.admission import Admission
from coordinator.audit_trail import AuditTrail
from coordinator.fleet import Fleet, NodeEntry
from coordinator.records import Caller, CallRecord
from coordinator.request_summary import Outcome as Ended
from coordinator.request_summary import RequestSummary
from coordinator.shadow_report import Outcome, Pair, templates_proto
from coordinator.shadow_store import Row as StoredRun

log = logging.getLogger(__name__)

DEFAULT_MARGIN, DEFAULT_MIN_SAMPLES, DEFAULT_MAX_IN_FLIGHT, DEFAULT_TIMEOUT_S = 0.05, 20, 2, 300.0
REMOTE_ENGINE = "upstream"
# The label values of /metrics (fixed sets: never a model id or anything a caller sent).
COPY_OUTCOMES = (Ended.COMPLETED, Ended.FAILED, Ended.CANCELLED)
DROP_REASONS = ("busy", "no_node", "phi")
SYNC_S = 2.0  # runs started or stopped through another coordinator are taken up this often
# Outcomes not yet written (the database away) are kept up to this many, the oldest dropped.
PENDING_MAX = 10_000
# Rows are read from (newest id seen - LOOKBACK_IDS): a transaction of the other coordinator
# that took its ids earlier but committed later is still read (ids seen are skipped).
LOOKBACK_IDS = 1_000


class ShadowRefused(Exception):
    """A start the coordinator will not take; `field` names the request field (the CLI flag)."""

    def __init__(self, field_: str, message: str):
        super().__init__(message)
        self.field = field_


@dataclass(frozen=True)
class ShadowConfig:
    model: str
    fraction: float
    templates: frozenset[str] = frozenset()
    margin: float = DEFAULT_MARGIN
    min_samples: int = DEFAULT_MIN_SAMPLES
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def of(cls, r: shadow_pb2.StartShadowRequest) -> ShadowConfig:
        """The request's settings, checked; ShadowRefused names the first bad field."""
        if not r.model:
            raise ShadowRefused("model", "model is required: the candidate's model id")
        if not valid_id(r.model):
            raise ShadowRefused(
                "model", "model must be a model id, or ID@VERSION (`fleetctl nodes` lists them)"
            )
        if not 0.0 < r.fraction <= 1.0:
            raise ShadowRefused("fraction", "fraction must be over 0 and at most 1 (e.g. 0.05)")
        unknown = [t for t in r.templates if t not in prompts.REGISTRY]
        if unknown:
            raise ShadowRefused(
                "template",
                f"template {unknown[0][:64]!r} is not one of {', '.join(prompts.names())}",
            )
        if not 0.0 <= r.margin <= 1.0:
            raise ShadowRefused("margin", "margin must be 0 to 1 (0: the default 0.05)")
        if r.min_samples > 100_000:
            raise ShadowRefused("min_samples", "min_samples must be at most 100000")
        if r.max_in_flight > 1024:
            raise ShadowRefused("max_in_flight", "max_in_flight must be at most 1024")
        if not 0.0 <= r.timeout_s <= 3600.0:
            raise ShadowRefused("timeout_s", "timeout_s must be 0 to 3600 (0: the default 300)")
        return cls(
            model=r.model,
            fraction=r.fraction,
            templates=frozenset(r.templates),
            margin=r.margin or DEFAULT_MARGIN,
            min_samples=r.min_samples or DEFAULT_MIN_SAMPLES,
            max_in_flight=r.max_in_flight or DEFAULT_MAX_IN_FLIGHT,
            timeout_s=r.timeout_s or DEFAULT_TIMEOUT_S,
        )


@dataclass
class ShadowRun:
    """One run from start to stop: its settings, counters, tallies and the copies under way."""

    id: str
    config: ShadowConfig
    started_by: str
    started_at: float
    stopped_at: float = 0.0
    # The scores start here (0: started_at; later only on a coordinator without a database).
    figures_since: float = 0.0
    eligible: int = 0
    sampled: int = 0
    sent: int = 0
    dropped_busy: int = 0
    dropped_no_node: int = 0
    dropped_phi: int = 0
    pairs: dict[str, Pair] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return not self.stopped_at

    def pair(self, template: str) -> Pair:
        return self.pairs.setdefault(template, Pair())


@dataclass(frozen=True)
class _Sampled:
    run: ShadowRun
    template: str


def remote_unsafe(entry: NodeEntry) -> bool:
    """A remote endpoint not declared covered for PHI: never sent a copy."""
    st = entry.status
    return st is not None and st.model.engine == REMOTE_ENGINE and not st.phi_allowed


class Shadow:
    """The coordinator's shadow runs: one active at a time, the last kept for its report."""

    def __init__(
        self,
        *,
        fleet: Fleet,
        admission: Admission,
        audit: AuditTrail,
        coordinator_id: str,
        rng: Optional[random.Random] = None,
        clock: Callable[[], float] = time.time,
    ):
        self._fleet = fleet
        self._admission = admission
        self._audit = audit
        self._me = coordinator_id
        self._rng = rng or random.Random()
        self._clock = clock
        self.run: Optional[ShadowRun] = None
        self._sampled: dict[str, _Sampled] = {}  # live request id -> its copy's run
        # coordinator/shadow_store.ShadowStore (set before start_sync); None: memory only
        self.store = None
        self._synced: Optional[tuple[str, float]] = None  # (run id, stopped_at) last taken up
        # This process, in the outcome rows it writes (a restarted coordinator reads its own
        # earlier rows back as any other's).
        self._instance = f"{coordinator_id}/{secrets.token_hex(4)}"
        self._pending: list[tuple[str, str, str, Outcome, float]] = []  # not yet written
        self._read: tuple[str, int, set[int]] = ("", 0, set())  # run id, newest id, ids seen
        self._task: Optional[asyncio.Task] = None
        # Since the process started, over every run (the /metrics counters).
        self.copies_total: dict[str, int] = dict.fromkeys(COPY_OUTCOMES, 0)
        self.dropped_total: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    # -- control ----------------------------------------------------------------------
    async def start(self, config: ShadowConfig, started_by: str) -> ShadowRun:
        """A new run, replacing the one in progress (its copies are cancelled). Saved to the
        state database first (raises its error, and nothing changes), then in effect here, and
        on the coordinators sharing the database within SYNC_S."""
        run = ShadowRun(f"shadow-{secrets.token_hex(6)}", config, started_by, self._clock())
        if self.store is not None:
            await asyncio.to_thread(self.store.started, _row(run))
        await self._halt(run.started_at)
        self.run = run
        self._synced = (run.id, 0.0)
        log.info(
            "shadow=%s started by %s: model=%s fraction=%g templates=%s max_in_flight=%d",
            self.run.id,
            started_by,
            config.model,
            config.fraction,
            ",".join(sorted(config.templates)) or "all",
            config.max_in_flight,
        )
        return self.run

    async def stop(self) -> Optional[ShadowRun]:
        """Stop the active run (if any): no new copies; those under way are cancelled. Saved
        to the state database first (raises its error, and the run goes on)."""
        run = self.run
        if run is None or not run.active:
            return run
        at = self._clock()
        if self.store is not None:
            await asyncio.to_thread(self.store.stopped, run.id, at)
        self._synced = (run.id, at)
        await self._halt(at)
        return run

    async def _halt(self, at: float, how: str = "") -> None:
        """Stop the active run here only (the state database is not told)."""
        run = self.run
        if run is None or not run.active:
            return
        run.stopped_at = at
        await _cancel(run.tasks)
        log.info("shadow=%s stopped%s: %d copies sent", run.id, how, run.sent)

    async def sync(self) -> None:
        """Take up the latest run in the state database: started before this coordinator
        (re)started, or started or stopped through another coordinator sharing it."""
        if self.store is None:
            return
        row = await asyncio.to_thread(self.store.latest)
        if row is None or self._synced == (row.id, row.stopped_at):
            return
        self._synced = (row.id, row.stopped_at)
        how = " (from the state database)"
        run = self.run
        if run is not None and run.id == row.id:
            if row.stopped_at:
                await self._halt(row.stopped_at, how)
            return
        await self._halt(row.started_at, how)
        config = ShadowConfig(
            model=row.model,
            fraction=row.fraction,
            templates=row.templates,
            margin=row.margin,
            min_samples=row.min_samples,
            max_in_flight=row.max_in_flight,
            timeout_s=row.timeout_s,
        )
        self.run = ShadowRun(
            row.id,
            config,
            row.started_by,
            row.started_at,
            stopped_at=row.stopped_at,
            figures_since=row.started_at,  # every coordinator's outcomes are in the database
        )
        log.info(
            "shadow=%s taken up from the state database (%s, started by %s): model=%s fraction=%g",
            row.id,
            "stopped" if row.stopped_at else "active",
            row.started_by,
            row.model,
            row.fraction,
        )

    async def _sync_logged(self) -> None:
        try:
            await self.sync()
            if self.store is not None:
                await self._exchange()
        except Exception as exc:  # noqa: BLE001 - the database may be away; the run stays as it is
            log.warning(
                "shadow runs and outcomes not synced with the state database (%s: %s); keeping "
                "the run in effect and %d outcomes to write, retrying in %.0f s",
                type(exc).__name__,
                exc,
                len(self._pending),
                SYNC_S,
            )

    async def start_sync(self) -> None:
        """Take up the state database's run, then follow it every SYNC_S."""
        await self._sync_logged()

        async def follow() -> None:
            while True:
                await asyncio.sleep(SYNC_S)  # a period, not synchronisation
                await self._sync_logged()

        self._task = asyncio.get_running_loop().create_task(follow(), name="shadow sync")

    async def close(self) -> None:
        """The coordinator is shutting down: no copy outlives it. The run stays active in the
        state database, so the coordinator resumes it when it starts again."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._halt(self._clock(), " (coordinator shutting down)")
        self._sampled.clear()
        if self.store is not None:
            try:  # the last outcomes, for the pair's report and this one's after a restart
                await self._flush()
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                log.warning("shadow: %d outcomes not written (%s)", len(self._pending), exc)

    # -- the relay's side ---------------------------------------------------------------
    def offer(self, req: inference_pb2.GenerateRequest) -> None:
        """A live request, accepted and about to run: maybe copy it to the candidate. Never
        raises: whatever happens to the copy, the live request goes on."""
        try:
            self._offer(req)
        except Exception as exc:  # noqa: BLE001 - a copy never fails the caller's request
            log.error("shadow: request=%s not copied: %s", req.request_id, type(exc).__name__)

    def _offer(self, req: inference_pb2.GenerateRequest) -> None:
        run = self.run
        if run is None or not run.active or req.prefix_token_ids:
            return  # a stream continued from elsewhere carries another model's tokens
        c = run.config
        template = req.template.name if req.WhichOneof("input") == "template" else ""
        if c.templates and template not in c.templates:
            return
        run.eligible += 1
        if self._rng.random() >= c.fraction:
            return
        run.sampled += 1
        serving = [
            e for e in self._fleet.routable() if serves(e.model_id, e.status.model.version, c.model)
        ]
        if not serving:
            self._drop(run, "no_node")
            return
        unsafe = frozenset(e.node_id for e in serving if remote_unsafe(e))
        if len(unsafe) == len(serving):
            self._drop(run, "phi")
            return
        if len(run.tasks) >= c.max_in_flight or self._audit.failing:
            self._drop(run, "busy")
            return
        tokens = req.max_tokens
        entry = self._admission.try_acquire(Want(model=c.model, exclude=unsafe), tokens)
        if entry is None:
            self._drop(run, "busy")
            return
        if entry.load.in_flight > max(1, entry.status.capacity.max_running):
            self._admission.release(entry, tokens)  # it would wait in the node's own queue
            self._drop(run, "busy")
            return
        run.sent += 1
        self._sampled[req.request_id] = _Sampled(run, template)
        task = asyncio.get_running_loop().create_task(
            self._copy(run, req, entry, template, tokens), name=f"{run.id} copy"
        )
        run.tasks.add(task)
        task.add_done_callback(run.tasks.discard)

    def _drop(self, run: ShadowRun, reason: str) -> None:
        setattr(run, f"dropped_{reason}", getattr(run, f"dropped_{reason}") + 1)
        self.dropped_total[reason] += 1

    def live_ended(self, s: RequestSummary) -> None:
        """A monitor sink: the live side of a sampled request (its summary holds no content)."""
        sampled = self._sampled.pop(s.request_id, None)
        if sampled is None:
            return
        entry = self._fleet.by_id(s.nodes[-1]) if s.nodes else None
        model, digest = _label(entry)
        if entry is not None and serves(
            entry.model_id, entry.status.model.version, sampled.run.config.model
        ):
            return  # the live request itself ran on the candidate: no comparison
        self._record(
            sampled.run,
            sampled.template,
            "live",
            Outcome(
                completed=s.outcome == Ended.COMPLETED,
                latency_ms=s.duration_s * 1000.0,
                ttft_ms=s.ttft_s * 1000.0 if s.ttft_s is not None else None,
                score=s.quality_score,
                schema_valid=s.schema_valid,
                parts=tuple(sorted(s.quality_parts.items())),
                model=model,
                digest=digest,
            ),
        )

    def _record(self, run: ShadowRun, template: str, side: str, outcome: Outcome) -> None:
        """One side of a sampled request: into the run's tallies here, and (with a state
        database) into shadow_outcomes at the next sync, for every coordinator's report."""
        getattr(run.pair(template), side).add(outcome)
        if self.store is None:
            return
        self._pending.append((run.id, template, side, outcome, self._clock()))
        if len(self._pending) > PENDING_MAX:
            del self._pending[: len(self._pending) - PENDING_MAX]

    async def _flush(self) -> None:
        """Write the outcomes recorded since the last write (kept if the database fails)."""
        if self._pending:
            batch = self._pending[:]
            await asyncio.to_thread(self.store.add_outcomes, self._instance, batch)
            del self._pending[: len(batch)]

    async def _exchange(self) -> None:
        """Write this coordinator's new outcomes; read the run's others (every coordinator
        sharing the database, and this one's before a restart) into its tallies."""
        await self._flush()
        run = self.run
        if run is None:
            return
        run_id, newest, seen = self._read
        if run_id != run.id:
            newest, seen = 0, set()
        rows = await asyncio.to_thread(self.store.outcomes, run.id, max(0, newest - LOOKBACK_IDS))
        if self.run is not run:
            return
        for r in rows:
            if r.id in seen:
                continue
            seen.add(r.id)
            newest = max(newest, r.id)
            if r.instance != self._instance and r.side in ("live", "candidate"):
                getattr(run.pair(r.template), r.side).add(r.outcome)
        self._read = (run.id, newest, {i for i in seen if i > newest - LOOKBACK_IDS})

    # -- one copy ---------------------------------------------------------------------
    async def _copy(
        self,
        run: ShadowRun,
        live: inference_pb2.GenerateRequest,
        entry: NodeEntry,
        template: str,
        reserved: int,
    ) -> None:
        copy_id = f"{run.id}-{secrets.token_hex(6)}"
        req = inference_pb2.GenerateRequest()
        req.CopyFrom(live)
        req.request_id = copy_id
        req.model = run.config.model
        req.require_weights_digest = entry.digest
        req.session_key = ""
        req.allow_restart = False
        req.resumed_from_coordinator = ""
        t0 = time.monotonic()
        ttft: Optional[float] = None
        final: Optional[inference_pb2.FinalInfo] = None
        got, code = 0, "CANCELLED"
        try:
            async with asyncio.timeout(run.config.timeout_s):
                async for chunk in entry.link.generate(req, run.config.timeout_s):
                    n = len(chunk.token_ids)  # the text itself is dropped here, unread
                    if n and ttft is None:
                        ttft = (time.monotonic() - t0) * 1000.0
                    got += n
                    self._admission.delivered(entry, n)
                    if chunk.HasField("final"):
                        final = chunk.final
            ok = final is not None and final.finish_reason not in (
                inference_pb2.FINISH_REASON_CANCELLED,
                inference_pb2.FINISH_REASON_ERROR,
            )
            code = "OK" if ok else "UNAVAILABLE"
        except TimeoutError:
            code = "DEADLINE_EXCEEDED"
        except grpc.aio.AioRpcError as err:
            code = err.code().name  # its details may quote the request: not kept
        except grpc.aio.UsageError:  # the node's channel closed as it left the fleet
            code = "UNAVAILABLE"
        except Exception as exc:  # noqa: BLE001 - a copy never fails the coordinator; no text kept
            log.error(
                "shadow=%s copy of request=%s: %s", run.id, live.request_id, type(exc).__name__
            )
            code = "INTERNAL"
        finally:
            self._admission.release(entry, max(0, reserved - got))
            self._ended(run, entry, template, live.request_id, copy_id, code, final, t0, ttft, got)

    def _ended(self, run, entry, template, live_id, copy_id, code, final, t0, ttft, got) -> None:
        """The copy's outcome: into the report and the audit chain (no content either way)."""
        latency = (time.monotonic() - t0) * 1000.0
        model, digest = _label(entry)
        completed = code == "OK"
        score = final.quality.total if completed and final.HasField("quality") else None
        valid = final.structured.valid if completed and final.HasField("structured") else None
        parts = (
            tuple(sorted((p.name, p.score) for p in final.quality.parts))
            if score is not None
            else ()
        )
        self._record(
            run,
            template,
            "candidate",
            Outcome(completed, latency, ttft, score, valid, parts, model, digest),
        )
        outcome = Ended.COMPLETED if completed else Ended.FAILED
        if code == "CANCELLED":
            outcome = Ended.CANCELLED
        self.copies_total[outcome] += 1
        details = {
            "shadow_id": run.id,
            "request_id": live_id,  # the live request this copies (its own records are apart)
            "copy_id": copy_id,
            "nodes": [{"node": entry.node_id, "model": model, "digest": digest}],
            "template": template,
            "completion_tokens": got,
            "latency_ms": round(latency, 1),
        }
        if score is not None:
            details["quality_score"] = score
        if valid is not None:
            details["schema_valid"] = valid
        self._audit.submit(
            CallRecord(
                "shadow",
                "shadow.copy",
                Caller(run.started_by, "operator", "", self._me),
                outcome,
                code,
                details,
            )
        )
        log.info(
            "shadow=%s copy=%s of request=%s node=%s outcome=%s code=%s tokens=%d total_ms=%.1f",
            run.id,
            copy_id,
            live_id,
            entry.node_id,
            outcome,
            code,
            got,
            latency,
        )

    def collector(self) -> Collector:
        return _Metrics(self)

    # -- the report -------------------------------------------------------------------
    def report(self) -> shadow_pb2.ShadowReport:
        run = self.run
        if run is None:
            return shadow_pb2.ShadowReport(
                coordinator_id=self._me, verdict="insufficient", reason="no shadow run started"
            )
        c = run.config
        rows, verdict, why = templates_proto(run.pairs, margin=c.margin, min_samples=c.min_samples)
        return shadow_pb2.ShadowReport(
            shadow_id=run.id,
            active=run.active,
            model=c.model,
            fraction=c.fraction,
            templates=sorted(c.templates),
            margin=c.margin,
            min_samples=c.min_samples,
            max_in_flight=c.max_in_flight,
            timeout_s=c.timeout_s,
            started_by=run.started_by,
            started_unix_s=run.started_at,
            stopped_unix_s=run.stopped_at,
            figures_since_unix_s=run.figures_since or run.started_at,
            figures_pooled=self.store is not None,
            eligible=run.eligible,
            sampled=run.sampled,
            sent=run.sent,
            dropped_busy=run.dropped_busy,
            dropped_no_node=run.dropped_no_node,
            dropped_phi=run.dropped_phi,
            in_flight=len(run.tasks),
            by_template=rows,
            verdict=verdict,
            reason=why,
            coordinator_id=self._me,
        )


class _Metrics(Collector):
    """The shadow runs' series (docs/shadow.md "Metrics"), read at scrape time. Labels come
    from fixed sets; the candidate's model id is in the report, not in a label."""

    def __init__(self, shadow: Shadow):
        self._s = shadow

    def describe(self):
        return ()

    def collect(self):
        s, run = self._s, self._s.run
        copies = CounterMetricFamily(
            "studiofleet_shadow_copies",
            "Shadow copies that ended, by outcome (completed, failed, cancelled).",
            labels=["outcome"],
        )
        for outcome, n in s.copies_total.items():
            copies.add_metric([str(outcome)], n)
        dropped = CounterMetricFamily(
            "studiofleet_shadow_dropped",
            "Sampled requests not copied: busy (no free place, max in flight, live requests "
            "waiting, audit failing), no_node (no READY candidate), phi (only undeclared remotes).",
            labels=["reason"],
        )
        for reason, n in s.dropped_total.items():
            dropped.add_metric([reason], n)
        active = GaugeMetricFamily(
            "studiofleet_shadow_active", "1 while a shadow run is active on this coordinator."
        )
        active.add_metric([], 1.0 if run is not None and run.active else 0.0)
        in_flight = GaugeMetricFamily("studiofleet_shadow_in_flight", "Shadow copies running now.")
        in_flight.add_metric([], len(run.tasks) if run is not None else 0)
        yield from (copies, dropped, active, in_flight)


def _row(run: ShadowRun) -> StoredRun:
    c = run.config
    return StoredRun(
        run.id,
        c.model,
        c.fraction,
        c.templates,
        c.margin,
        c.min_samples,
        c.max_in_flight,
        c.timeout_s,
        run.started_by,
        run.started_at,
        0.0,
    )


def _label(entry: Optional[NodeEntry]) -> tuple[str, str]:
    """(model@version, weights digest) a node serves, as the audit names them."""
    if entry is None or entry.status is None:
        return "", ""
    m = entry.status.model
    return (f"{m.model_id}@{m.version}" if m.version else m.model_id), m.weights_digest


async def _cancel(tasks: set[asyncio.Task]) -> None:
    """Cancel the copies and wait for each to record its end."""
    pending = list(tasks)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
