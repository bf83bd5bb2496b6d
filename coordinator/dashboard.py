"""The dashboard on the coordinator's monitoring port (docs/monitoring.md): one page
(`static/`), and `/api/snapshot`, the JSON it polls every 2 s: the nodes as `fleetctl
nodes` shows them (the same `describe`), the last hour's traffic from the request log,
recent fleet events and the latest rollout. Metadata only: no prompt or completion is
ever in reach of this module.

Access is the operator role: a client certificate, or a session opened with a one-time
link from `fleetctl dashboard` (`dashboard_link`, coordinator/admin.py; sessions in
cluster/http_server.py). The page's polls are
marked background (BACKGROUND_HEADER) unless the user acted since the last one, so an
unattended tab still logs off after `dashboard_idle_timeout_s`.
"""

from __future__ import annotations

import math
import time
from importlib import resources
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from cluster.api import common_pb2, fleet_pb2
from coordinator.admin import fleet_nodes, traffic

if TYPE_CHECKING:
    from cluster.capacity.headroom import LiveHeadroom
    from cluster.config import CoordinatorSettings
    from coordinator.events import EventLog
    from coordinator.fleet import Fleet
    from coordinator.relay import Relay
    from coordinator.request_log import RequestLog
    from coordinator.rollouts import Rollouts

EVENTS = 50
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def _asset(name: str) -> bytes:
    return resources.files("coordinator").joinpath("static", name).read_bytes()


class Source(Protocol):
    """What the dashboard reads (the Coordinator provides it)."""

    settings: "CoordinatorSettings"
    fleet: "Fleet"
    relay: "Relay"
    events: "EventLog"
    rollouts: "Rollouts | None"
    request_log: "RequestLog | None"
    headroom: "LiveHeadroom"


def add_routes(app: web.Application, coordinator: Source) -> None:
    page = _asset("dashboard.html")
    assets = {name: (_asset(name), kind) for name, kind in ASSETS.items()}

    async def index(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def asset(request: web.Request) -> web.Response:
        body, kind = assets[request.match_info["name"]]
        return web.Response(body=body, content_type=kind, charset="utf-8")

    async def api_snapshot(_request: web.Request) -> web.Response:
        return web.json_response(snapshot(coordinator))

    app.router.add_get("/", index)
    app.router.add_get("/static/{name:dashboard\\.(js|css)}", asset)
    app.router.add_get("/api/snapshot", api_snapshot)


def snapshot(co: Source) -> dict:
    nodes = [_node(n) for n in fleet_nodes(co.fleet)]
    t = traffic(co.request_log, co.relay)
    return {
        "coordinator": co.settings.coordinator_id,
        "time": time.time(),
        "totals": {
            "nodes": len(nodes),
            "routable": sum(n["routable"] for n in nodes),
            "queued": t.queued,
            "running": t.running,
            "tokens_per_s": round(t.tokens_per_s, 1),
            "request_log": co.request_log is not None,
        },
        "nodes": nodes,
        "traffic": [
            {
                "start": b.start,
                "requests": b.requests,
                "errors": b.errors,
                "rejected": b.rejected,
                "tokens": b.tokens,
                "tokens_per_s": round(b.tokens / t.bucket_s, 2),
                "ttft_p50_ms": round(b.ttft_p50_ms, 1),
                "ttft_p95_ms": round(b.ttft_p95_ms, 1),
                "latency_p95_ms": round(b.latency_p95_ms, 1),
            }
            for b in t.buckets
        ],
        "events": [_event(e) for e in co.events.history()[-EVENTS:]][::-1],
        "rollout": _rollout(co),
        "capacity": _capacity(co.headroom.snapshot()),
        "traffic_classes": _classes(getattr(co, "traffic", None)),
        "shadow": _shadow(getattr(co, "shadow", None)),
    }


def _shadow(shadow) -> dict | None:
    """The latest shadow run (docs/shadow.md): candidate, share, copies and the verdict so far;
    None before the first start. Counts and scores only: a copy's text is never kept."""
    if shadow is None or shadow.run is None:
        return None
    r = shadow.report()
    return {
        "id": r.shadow_id,
        "active": r.active,
        "model": r.model,
        "fraction": r.fraction,
        "templates": list(r.templates),
        "sent": r.sent,
        "dropped": r.dropped_busy + r.dropped_no_node + r.dropped_phi,
        "in_flight": r.in_flight,
        "verdict": r.verdict,
        "reason": r.reason,
        "since": r.started_unix_s,
    }


def _classes(control) -> dict:
    """Each node class's share of the last minute's placements, and the overflow switches
    (docs/traffic.md)."""
    if control is None:
        return {"classes": [], "overflow": []}
    policies = control.to_proto().policies
    return {
        "classes": [
            {
                "node_class": c.node_class,
                "share": round(c.share, 4),
                "routed_recent": c.routed_recent,
                "routed_total": c.routed_total,
                "routable_nodes": c.routable_nodes,
            }
            for c in control.classes()
        ],
        "overflow": [
            {"model": p.policy.model, "to": p.policy.overflow, "active": p.overflow_active}
            for p in policies
            if p.policy.overflow
        ],
    }


def _capacity(h) -> dict:
    """The live headroom card (docs/capacity.md "Live headroom"); None for an infinite p95
    (JSON has no infinity): the fleet cannot keep up."""
    finite = lambda v: v if math.isfinite(v) else None  # noqa: E731
    return {
        "known": h.known,
        "line": h.line(),
        "arrival_rate_per_s": h.arrival_rate_per_s,
        "predicted_p95_s": finite(h.predicted_p95_s) if h.known else None,
        "sla_p95_s": h.sla_p95_s,
        "sla_rate_per_s": h.sla_rate_per_s,
        "headroom_per_s": h.headroom_per_s,
        "sla_met": h.sla_met,
        "profiled_nodes": h.profiled_nodes,
        "unprofiled_nodes": h.unprofiled_nodes,
    }


def _node(n: fleet_pb2.FleetNode) -> dict:
    st = n.status
    mem = st.memory
    used = mem.engine_active_bytes or mem.process_rss_bytes
    gpu_total = sum(g.memory_total_bytes for g in mem.gpus)
    return {
        "id": st.node_id or n.address,
        "address": n.address,
        "engine": st.model.engine or "-",
        "state": common_pb2.Lifecycle.Name(st.lifecycle).removeprefix("LIFECYCLE_")
        if n.HasField("status")
        else "-",
        "cordoned": st.cordoned,
        "health": fleet_pb2.NodeHealth.Name(n.health).removeprefix("NODE_HEALTH_"),
        "reason": n.health_reason
        if n.health != fleet_pb2.NODE_HEALTH_HEALTHY
        else st.lifecycle_reason,
        "routable": n.routable,
        "model": f"{st.model.model_id}@{st.model.version}"
        if st.model.version
        else st.model.model_id or "-",
        "digest": st.model.weights_digest[7:19],
        "running": st.load.running,
        "queued": st.load.queued,
        "in_flight": n.in_flight,
        "tokens_per_s": round(st.load.decode_tokens_per_s, 1),
        "memory_used": sum(g.memory_used_bytes for g in mem.gpus) if gpu_total else used,
        "memory_total": gpu_total or mem.total_bytes,
        "status_age_s": round(n.last_status_age_s, 1),
    }


def _event(e: fleet_pb2.FleetEvent) -> dict:
    out = {
        "seq": e.seq,
        "time": e.time_unix_s,
        "kind": fleet_pb2.EventKind.Name(e.kind).removeprefix("EVENT_KIND_").lower(),
        "node": e.node_id or e.address,
        "reason": e.reason,
    }
    for key in ("request_id", "to_node_id", "rollout_id", "step"):
        if getattr(e, key, ""):
            out[key] = getattr(e, key)
    return out


def _rollout(co: Source) -> dict | None:
    row = co.rollouts.latest if co.rollouts is not None else None
    if row is None:
        return None
    steps: dict[str, int] = {}
    for n in row.nodes:
        steps[n.step] = steps.get(n.step, 0) + 1
    return {
        "id": row.id,
        "state": row.state,
        "message": row.message,
        "steps": steps,
        "nodes": [{"node": n.node_id, "step": n.step} for n in row.nodes],
    }
