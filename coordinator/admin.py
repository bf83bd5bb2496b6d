"""The Fleet admin service: the node table and the event stream (what fleetctl reads)."""

from __future__ import annotations

import time

from cluster.api import fleet_pb2, fleet_pb2_grpc
from coordinator import health_policy as hp
from coordinator.admission import Admission
from coordinator.events import EventLog
from coordinator.fleet import Fleet, NodeEntry

COORDINATOR_VERSION = "studiofleet-coordinator 0.1.0"

_HEALTH = {
    hp.Verdict.PENDING: fleet_pb2.NODE_HEALTH_PENDING,
    hp.Verdict.HEALTHY: fleet_pb2.NODE_HEALTH_HEALTHY,
    hp.Verdict.SUSPECT: fleet_pb2.NODE_HEALTH_SUSPECT,
    hp.Verdict.EJECTED: fleet_pb2.NODE_HEALTH_EJECTED,
    hp.Verdict.PROBING: fleet_pb2.NODE_HEALTH_PROBING,
    hp.Verdict.REJECTED: fleet_pb2.NODE_HEALTH_REJECTED,
}


def describe(entry: NodeEntry, now: float) -> fleet_pb2.FleetNode:
    h = entry.health
    node = fleet_pb2.FleetNode(
        address=entry.address, source=entry.source, mdns_name=entry.mdns_name,
        health=_HEALTH[h.verdict], health_reason=h.reason, routable=entry.routable,
        consecutive_failures=h.failures, ejections=h.ejections,
        ejected_for_s=max(0.0, h.ejected_until - now) if h.verdict is hp.Verdict.EJECTED else 0.0,
        in_flight=entry.in_flight, outstanding_tokens=max(0, entry.outstanding_tokens),
        routed_total=entry.routed_total, failovers_total=entry.failovers_total,
        last_status_age_s=now - entry.status_at if entry.status is not None else 0.0)
    if entry.status is not None:
        node.status.CopyFrom(entry.status)
    return node


class FleetAdmin(fleet_pb2_grpc.FleetServicer):
    def __init__(self, *, fleet: Fleet, admission: Admission, events: EventLog, relay, identify, audit):
        self._identify = identify
        self._audit = audit
        self._fleet = fleet
        self._admission = admission
        self._events = events
        self._relay = relay

    async def ListNodes(self, request, context) -> fleet_pb2.ListNodesResponse:
        self._audit.admin(self._identify(context), context.peer(), "fleet.list_nodes")
        now = time.monotonic()
        nodes = sorted(self._fleet.entries.values(), key=lambda e: (e.node_id or "~", e.address))
        return fleet_pb2.ListNodesResponse(nodes=[describe(e, now) for e in nodes],
                                           queued=self._admission.depth, in_flight=self._relay.in_flight,
                                           coordinator_version=COORDINATOR_VERSION)

    async def WatchEvents(self, request, context):
        self._audit.admin(self._identify(context), context.peer(), "fleet.watch_events", replay=request.replay)
        async for event in self._events.subscribe(request.replay):
            yield event
