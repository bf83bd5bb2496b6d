"""The coordinator's Prometheus metrics (docs/monitoring.md).

Counted as requests end (one `request_ended` per accepted or refused request, the same
moment its audit record and request-log row are made) and as fleet events go out; the
gauges (running, queued, node states, rollout progress, audit health) are read from the
live objects when Prometheus scrapes, so they cannot drift from what `fleetctl` shows.
"""

from __future__ import annotations

from typing import Iterable, Optional

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster.api import common_pb2, fleet_pb2
from cluster.metrics import (
    DURATION_BUCKETS,
    ITL_BUCKETS,
    QUEUE_BUCKETS,
    TTFT_BUCKETS,
    NoteMetrics,
    new_registry,
    state_family,
)
from coordinator import health_policy as hp
from coordinator.request_summary import RequestSummary

LIFECYCLES = [
    n.removeprefix("LIFECYCLE_")
    for n in common_pb2.Lifecycle.keys()
    if not n.endswith("UNSPECIFIED")
]
VERDICTS = [v.name for v in hp.Verdict]
ROLLOUT_STEPS = (
    "pending",
    "wait",
    "stage",
    "drain",
    "activate",
    "gate",
    "restart",
    "rollback",
    "done",
    "rolled_back",
    "failed",
    "skipped",
)


class CoordinatorMetrics:
    def __init__(
        self, *, coordinator_id: str, fleet, relay, rollouts, audit, events, headroom=None
    ):
        self.registry = new_registry("coordinator", coordinator_id)
        r = self.registry
        self.requests = Counter(
            "studiofleet_requests",
            "Requests by outcome (completed, failed, cancelled, "
            "deadline, rejected, refused, denied) and gRPC status code.",
            ["outcome", "code"],
            registry=r,
        )
        self.queue = Histogram(
            "studiofleet_request_queue_seconds",
            "Time a request waited in the coordinator's queue for a node, summed over its hops.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "studiofleet_request_ttft_seconds",
            "Accepted to first token sent to the caller.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "studiofleet_request_inter_token_seconds",
            "Gap between consecutive tokens sent to "
            "the caller (one observation per token after the first).",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "studiofleet_request_duration_seconds",
            "Accepted to the request's end, whatever the outcome.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "studiofleet_prompt_tokens", "Prompt tokens of completed requests.", registry=r
        )
        self.generation_tokens = Counter(
            "studiofleet_generation_tokens",
            "Tokens sent to callers (voided ones of restarted requests excluded).",
            registry=r,
        )
        self.failovers = Counter(
            "studiofleet_failovers",
            "Streams resumed on another node after their first token.",
            registry=r,
        )
        self.retries = Counter(
            "studiofleet_retries",
            "Requests moved to another node before their first token.",
            registry=r,
        )
        self.restarts = Counter(
            "studiofleet_restarts",
            "Streams started over on other weights (allow_restart).",
            registry=r,
        )
        self.denied = Counter(
            "studiofleet_denied",
            "Calls refused for their certificate or role, by method "
            "(gRPC method or `http GET PATH`) and code.",
            ["method", "code"],
            registry=r,
        )
        self.events = Counter(
            "studiofleet_fleet_events",
            "Fleet events by kind (joined, ejected, failover, rollout, ...).",
            ["kind"],
            registry=r,
        )
        self.ejections = Counter(
            "studiofleet_node_ejections",
            "Times the coordinator ejected a node.",
            ["node"],
            registry=r,
        )
        self.rollout_steps = Counter(
            "studiofleet_rollout_steps", "Rollout steps entered, by step.", ["step"], registry=r
        )
        self.api_responses = Counter(
            "studiofleet_openai_responses",
            "Answers of the OpenAI-compatible front "
            "door by endpoint and HTTP status (a stream counts once, as its status).",
            ["endpoint", "status"],
            registry=r,
        )
        self.ready = Gauge(
            "studiofleet_coordinator_ready",
            "1 while this coordinator takes new requests: its "
            "state store answers and a node is routable (coordinator/readiness.py).",
            registry=r,
        )
        self.state_store_up = Gauge(
            "studiofleet_state_store_up",
            "1 while the state database answered the last readiness probe (SELECT 1), 0 otherwise.",
            registry=r,
        )
        self.notes = NoteMetrics("studiofleet", r)
        r.register(_Live(fleet=fleet, relay=relay, rollouts=rollouts, audit=audit))
        if headroom is not None:
            r.register(_Headroom(headroom))
        events.listeners.append(self._event)

    def watch_request_log(self, request_log) -> None:
        """Export the request log's lost rows (it is made after the metrics)."""
        self.registry.register(_RequestLog(request_log))

    def request_ended(self, s: RequestSummary) -> None:
        self.requests.labels(s.outcome, s.code).inc()
        self.duration.observe(s.duration_s)
        if s.queue_s is not None:
            self.queue.observe(s.queue_s)
        if s.ttft_s is not None:
            self.ttft.observe(s.ttft_s)
        for gap in s.token_gaps:
            self.itl.observe(gap)
        if s.outcome == "completed":
            self.prompt_tokens.inc(s.prompt_tokens)
        if s.completion_tokens:
            self.generation_tokens.inc(s.completion_tokens)
        if s.failovers:
            self.failovers.inc(s.failovers)
        if s.retries:
            self.retries.inc(s.retries)
        if s.restarts:
            self.restarts.inc(s.restarts)
        if s.quality_score is not None:
            self.notes.observe(
                s.output_format, bool(s.schema_valid), s.quality_score, s.quality_parts
            )

    def _event(self, event: fleet_pb2.FleetEvent) -> None:
        kind = fleet_pb2.EventKind.Name(event.kind).removeprefix("EVENT_KIND_").lower()
        self.events.labels(kind).inc()
        if event.kind == fleet_pb2.EVENT_KIND_EJECTED and event.node_id:
            self.ejections.labels(event.node_id).inc()
        elif event.kind == fleet_pb2.EVENT_KIND_ROLLOUT and event.step in ROLLOUT_STEPS:
            self.rollout_steps.labels(event.step).inc()


class _Live(Collector):
    """Gauges read from the coordinator's own objects at scrape time (on its event loop)."""

    def __init__(self, *, fleet, relay, rollouts, audit):
        self._fleet, self._relay = fleet, relay
        self._rollouts, self._audit = rollouts, audit

    def collect(self) -> Iterable[Metric]:
        running, queued = self._relay.load()
        yield GaugeMetricFamily(
            "studiofleet_requests_running",
            "Requests on nodes now (streaming or about to).",
            value=running,
        )
        yield GaugeMetricFamily(
            "studiofleet_requests_queued",
            "Requests waiting in the coordinator's queue.",
            value=queued,
        )
        entries = [e for e in self._fleet.entries.values() if e.node_id]
        yield GaugeMetricFamily(
            "studiofleet_nodes_routable",
            "Nodes taking new requests now (READY, healthy, uncordoned, serving).",
            value=sum(e.routable for e in entries),
        )
        yield GaugeMetricFamily(
            "studiofleet_nodes_known",
            "Verified nodes in the coordinator's view.",
            value=len(entries),
        )
        lifecycle = GaugeMetricFamily(
            "studiofleet_node_lifecycle",
            "Each node's lifecycle state as last read (1 for the current state).",
            labels=["node", "state"],
        )
        health = GaugeMetricFamily(
            "studiofleet_node_health",
            "The coordinator's verdict on each node (1 for the current verdict).",
            labels=["node", "verdict"],
        )
        routable = GaugeMetricFamily(
            "studiofleet_node_routable", "1 while the node takes new requests.", labels=["node"]
        )
        running = GaugeMetricFamily(
            "studiofleet_node_requests_in_flight",
            "This coordinator's requests on each node.",
            labels=["node"],
        )
        for e in entries:
            now = (
                common_pb2.Lifecycle.Name(e.status.lifecycle).removeprefix("LIFECYCLE_")
                if e.status is not None
                else ""
            )
            for fam, states, current in (
                (lifecycle, LIFECYCLES, now),
                (health, VERDICTS, e.health.verdict.name),
            ):
                for state in states:
                    fam.add_metric([e.node_id, state], 1.0 if state == current else 0.0)
            routable.add_metric([e.node_id], float(e.routable))
            running.add_metric([e.node_id], float(e.in_flight))
        yield from (lifecycle, health, routable, running)
        yield from self._rollout()
        yield from self._audit_health()

    def _rollout(self) -> Iterable[Metric]:
        row = self._rollouts.latest if self._rollouts is not None else None
        state = row.state if row is not None else "NONE"
        yield state_family(
            "studiofleet_rollout_state",
            "The latest rollout's state (1 for the current).",
            "state",
            ("NONE", "RUNNING", "PAUSED", "SUCCEEDED", "FAILED", "ABORTED"),
            state,
        )
        nodes = GaugeMetricFamily(
            "studiofleet_rollout_nodes", "Nodes of the latest rollout by step.", labels=["step"]
        )
        counts = {step: 0 for step in ROLLOUT_STEPS}
        for n in row.nodes if row is not None else []:
            counts[n.step] = counts.get(n.step, 0) + 1
        for step, count in counts.items():
            nodes.add_metric([step], float(count))
        yield nodes
        total = len(row.nodes) if row is not None else 0
        finished = sum(n.step in ("done", "skipped") for n in row.nodes) if row is not None else 0
        yield GaugeMetricFamily(
            "studiofleet_rollout_progress_ratio",
            "Share of the latest rollout's nodes done.",
            value=finished / total if total else 0.0,
        )

    def _audit_health(self) -> Iterable[Metric]:
        log: Optional[object] = self._audit.log if self._audit is not None else None
        stats = getattr(log, "stats", None)
        written = CounterMetricFamily(
            "studiofleet_audit_records", "Audit records written and fsynced."
        )
        failures = CounterMetricFamily(
            "studiofleet_audit_write_failures",
            "Audit batches that could not be written (each failed its requests closed).",
        )
        written.add_metric([], float(stats.records_written) if stats else 0.0)
        failures.add_metric([], float(stats.write_errors) if stats else 0.0)
        yield written
        yield failures
        yield GaugeMetricFamily(
            "studiofleet_audit_enabled",
            "1 when the audit chain is on.",
            value=1.0 if log is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "studiofleet_audit_writer_failing",
            "1 while the audit log cannot be written: the "
            "coordinator refuses new requests (UNAVAILABLE) and admin calls until it can.",
            value=1.0 if log is not None and log.failing else 0.0,
        )


class _RequestLog(Collector):
    """Request log rows the state database did not take (a full write queue, the database
    down): counted, logged and alerted; the audit chain still has every request."""

    def __init__(self, request_log):
        self._log = request_log

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "studiofleet_request_log_rows_lost",
            "Request log rows lost (queue full or state database failing); the audit chain "
            "still has those requests.",
            value=float(self._log.dropped),
        )


class _Headroom(Collector):
    """The live headroom (docs/capacity.md "Live headroom"), computed at scrape time from the
    routable nodes' profiles and the arrival rate (cluster.capacity.headroom.LiveHeadroom)."""

    def __init__(self, headroom):
        self._headroom = headroom

    def describe(self) -> Iterable[Metric]:
        return ()  # registering must not compute (and cache) a snapshot before any node is known

    def collect(self) -> Iterable[Metric]:
        h = self._headroom.snapshot()
        yield GaugeMetricFamily(
            "studiofleet_capacity_arrivals_per_second",
            "Requests accepted per second over "
            "--capacity-window-s (refusals of the caller's own input not counted).",
            value=h.arrival_rate_per_s,
        )
        yield GaugeMetricFamily(
            "studiofleet_capacity_sla_p95_seconds",
            "The p95 time per note the fleet is held to (--sla-p95-s).",
            value=h.sla_p95_s,
        )
        nodes = GaugeMetricFamily(
            "studiofleet_capacity_nodes",
            "Routable nodes with a capacity profile "
            "(profiled=yes) and without one (no: left out of the prediction).",
            labels=["profiled"],
        )
        nodes.add_metric(["yes"], h.profiled_nodes)
        nodes.add_metric(["no"], h.unprofiled_nodes)
        yield nodes
        # Without a profiled node these have no sample (no prediction, no alert).
        p95 = GaugeMetricFamily(
            "studiofleet_capacity_predicted_p95_seconds",
            "The p95 time per note the "
            "profiles predict at the arrival rate now (+Inf: past what the fleet can decode).",
        )
        sla_rate = GaugeMetricFamily(
            "studiofleet_capacity_sla_arrivals_per_second",
            "The arrival rate at which "
            "the predicted p95 reaches the SLA (0: a lone note already misses it).",
        )
        ratio = GaugeMetricFamily(
            "studiofleet_capacity_headroom_ratio",
            "1 - the arrival rate / the SLA's rate: "
            "the share of the SLA's rate still free (negative: past it).",
        )
        if h.known:
            p95.add_metric([], h.predicted_p95_s)
            sla_rate.add_metric([], h.sla_rate_per_s)
            ratio.add_metric([], h.headroom_ratio)
        yield from (p95, sla_rate, ratio)
