"""The Fleet admin service: the node table, the event stream, node operations and
rollouts (what fleetctl calls). Every call is audited with the operator's identity, durably
before it acts or answers: a call that changes something writes an `accepted` record first
and its outcome after (both with its operation_id); one that cannot be audited is refused."""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
import uuid

import grpc

from cluster.api import fleet_pb2, fleet_pb2_grpc, node_pb2
from cluster.capacity.headroom import to_proto
from cluster.security.identity import Identity
from coordinator import health_policy as hp
from coordinator.admission import Admission
from coordinator.events import EventLog
from coordinator.fleet import Fleet, NodeEntry
from coordinator.node_ops import CALL_TIMEOUT_S
from coordinator.rollouts import RolloutRefused, Rollouts

log = logging.getLogger(__name__)
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
        address=entry.address,
        source=entry.source,
        mdns_name=entry.mdns_name,
        health=_HEALTH[h.verdict],
        health_reason=h.reason,
        routable=entry.routable,
        consecutive_failures=h.failures,
        ejections=h.ejections,
        ejected_for_s=max(0.0, h.ejected_until - now) if h.verdict is hp.Verdict.EJECTED else 0.0,
        in_flight=entry.in_flight,
        outstanding_tokens=max(0, entry.outstanding_tokens),
        routed_total=entry.routed_total,
        failovers_total=entry.failovers_total,
        last_status_age_s=now - entry.status_at if entry.status is not None else 0.0,
    )
    if entry.status is not None:
        node.status.CopyFrom(entry.status)
    return node


def fleet_nodes(fleet: Fleet) -> list[fleet_pb2.FleetNode]:
    """Every node the coordinator knows, verified ones by id first (`fleetctl nodes`, the dashboard)."""
    now = time.monotonic()
    return [
        describe(e, now)
        for e in sorted(fleet.entries.values(), key=lambda e: (e.node_id or "~", e.address))
    ]


def traffic(
    request_log, relay, window_s: int = 3600, bucket_s: int = 60, headroom=None, control=None
) -> fleet_pb2.Traffic:
    """The last `window_s` in buckets (from the request log, empty without one), the load
    now and the live headroom: what `fleetctl top` (GetTraffic) and the dashboard draw."""
    out = (
        request_log.traffic_reply(window_s, bucket_s)
        if request_log is not None
        else fleet_pb2.Traffic(bucket_s=bucket_s)
    )
    out.running, out.queued = relay.load()
    if headroom is not None:
        out.headroom.CopyFrom(to_proto(headroom.snapshot()))
    if control is not None:  # coordinator/traffic.TrafficControl (docs/traffic.md)
        out.classes.extend(control.classes())
    return out


async def dashboard_link(http, identity: Identity) -> fleet_pb2.DashboardLink:
    """A one-time login URL for `identity` on the monitoring port's dashboard. A port bound
    to every interface is named by this host's fully qualified name (set --http-listen to a
    name the browser resolves)."""
    from cluster.http_server import TOKEN_TTL_S  # aiohttp: loaded only with a monitoring port

    host, _, port = http.address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    token = await http.sessions.issue(identity)
    return fleet_pb2.DashboardLink(
        url=f"{http.scheme}://{host}:{port}/login?token={token}", expires_in_s=TOKEN_TTL_S
    )


class FleetAdmin(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self,
        *,
        fleet: Fleet,
        admission: Admission,
        events: EventLog,
        relay,
        identify,
        audit,
        rollouts: Rollouts,
        settings=None,
        request_log=None,
        http=None,
        tokens=None,
        headroom=None,
        traffic=None,
    ):
        self._s = settings
        self._traffic = traffic  # coordinator/traffic.TrafficControl
        self._headroom = headroom  # cluster.capacity.headroom.LiveHeadroom
        self._tokens = tokens  # coordinator/api_tokens.TokenStore; None with --openai-listen off
        self._request_log = request_log  # None: --no-request-log
        self._http = http or (lambda: None)  # -> the monitoring port (MonitorHTTP), once started
        self._rollouts = rollouts
        self._identify = identify
        self._audit = audit
        self._fleet = fleet
        self._admission = admission
        self._events = events
        self._relay = relay

    async def _record(
        self, context, ident, peer, action: str, *, done: bool = False, **fields
    ) -> None:
        """The call's record, durable before it goes on; else UNAVAILABLE naming the cause
        (`done`: the call has already acted, and the message says so)."""
        await self._audit.admin_or_abort(context, ident, peer, action, done=done, **fields)

    async def _failed(self, ident, peer, action: str, **fields) -> None:
        """The record of a call that ends in an error: durable (or logged) before the error goes out."""
        await self._audit.write_or_log(self._audit.admin_record(ident, peer, action, **fields))

    async def ListNodes(self, request, context) -> fleet_pb2.ListNodesResponse:
        await self._record(context, self._identify(context), context.peer(), "fleet.list_nodes")
        return fleet_pb2.ListNodesResponse(
            nodes=fleet_nodes(self._fleet),
            queued=self._admission.depth,
            in_flight=self._relay.in_flight,
            coordinator_version=COORDINATOR_VERSION,
        )

    async def WatchEvents(self, request, context):
        await self._record(
            context,
            self._identify(context),
            context.peer(),
            "fleet.watch_events",
            replay=request.replay,
        )
        async for event in self._events.subscribe(request.replay):
            yield event

    # -- node operations --------------------------------------------------------------
    async def CordonNode(self, request, context) -> fleet_pb2.NodeOperationReply:
        def call(stub, op):
            return stub.Cordon(
                node_pb2.CordonRequest(  # noqa: E731
                    operation_id=op, cordoned=request.cordoned, reason=request.reason
                ),
                timeout=CALL_TIMEOUT_S,
            )

        return await self._node_op(
            context, "cordon" if request.cordoned else "uncordon", request, call
        )

    async def DrainNode(self, request, context) -> fleet_pb2.NodeOperationReply:
        def call(stub, op):
            return stub.Drain(
                node_pb2.DrainRequest(  # noqa: E731
                    operation_id=op, timeout_s=request.timeout_s, reason=request.reason
                ),
                timeout=CALL_TIMEOUT_S,
            )

        return await self._node_op(context, "drain", request, call)

    async def _node_op(self, context, action: str, request, call) -> fleet_pb2.NodeOperationReply:
        """Forward to the node (which keeps the state), take its reply as the latest status,
        and record the operation in the audit chain and the event stream."""
        ident, peer = self._identify(context), context.peer()
        op = request.operation_id or f"op-{uuid.uuid4().hex[:12]}"
        entry = self._fleet.by_id(request.node_id)
        if entry is None:
            known = (
                ", ".join(sorted(e.node_id for e in self._fleet.entries.values() if e.node_id))
                or "none"
            )
            await self._failed(
                ident,
                peer,
                f"node.{action}",
                outcome="refused",
                code="NOT_FOUND",
                node_id=request.node_id[:64],
                operation_id=op,
            )
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no node {request.node_id!r} in this coordinator's fleet (known: {known}); "
                "see fleetctl nodes",
            )
        await self._record(
            context,
            ident,
            peer,
            f"node.{action}",
            outcome="accepted",
            code="",
            node_id=entry.node_id,
            operation_id=op,
            reason=request.reason,
        )
        try:
            reply = await call(entry.link.ops, op)
        except grpc.aio.AioRpcError as err:
            await self._failed(
                ident,
                peer,
                f"node.{action}",
                outcome="failed",
                code=err.code().name,
                node_id=entry.node_id,
                operation_id=op,
            )
            await context.abort(
                err.code(), f"node {entry.node_id} at {entry.address}: {err.details()}"
            )
        await self._record(
            context,
            ident,
            peer,
            f"node.{action}",
            done=True,
            node_id=entry.node_id,
            operation_id=op,
            reason=request.reason,
        )
        self._fleet.observe_reply(entry, reply.status)
        self._events.emit(
            fleet_pb2.EVENT_KIND_OPERATION,
            node_id=entry.node_id,
            address=entry.address,
            reason=f"{action} by {ident.name if ident else 'plaintext operator'} "
            f"(operation {op}): {reply.operation.message or 'running'}",
        )
        return fleet_pb2.NodeOperationReply(
            node_id=entry.node_id, operation=reply.operation, status=reply.status
        )

    # -- rollouts ---------------------------------------------------------------------
    async def StartRollout(self, request, context) -> fleet_pb2.Rollout:
        ident = self._identify(context)
        return await self._rollout(
            context,
            "rollout.start",
            lambda: self._rollouts.start(request, ident.name if ident else "plaintext operator"),
            target=request.target.model_path[:200],
            restart=request.target.restart,
        )

    async def GetRollout(self, request, context) -> fleet_pb2.Rollout:
        return await self._rollout(
            context,
            "rollout.get",
            lambda: self._rollouts.get(request.rollout_id),
            rollout_id=request.rollout_id[:64],
        )

    async def PauseRollout(self, request, context) -> fleet_pb2.Rollout:
        return await self._control(request, context, "pause")

    async def ResumeRollout(self, request, context) -> fleet_pb2.Rollout:
        return await self._control(request, context, "resume")

    async def AbortRollout(self, request, context) -> fleet_pb2.Rollout:
        return await self._control(request, context, "abort")

    async def _control(self, request, context, action: str) -> fleet_pb2.Rollout:
        return await self._rollout(
            context,
            f"rollout.{action}",
            lambda: self._rollouts.control(request.rollout_id, action),
            rollout_id=request.rollout_id[:64],
        )

    async def _rollout(self, context, action: str, work, **details) -> fleet_pb2.Rollout:
        """Run `work`, audited as `action` (a change: `accepted` first; its outcome, or a read's
        one record, before the reply); a refusal is answered with its code."""
        ident, peer = self._identify(context), context.peer()
        read = action == "rollout.get"
        if not read:
            details["operation_id"] = f"op-{uuid.uuid4().hex[:12]}"
            await self._record(context, ident, peer, action, outcome="accepted", code="", **details)
        try:
            row = work()
            row = await row if inspect.isawaitable(row) else row
        except RolloutRefused as exc:  # a refused call is recorded too, with why
            await self._failed(
                ident,
                peer,
                action,
                outcome="refused",
                code=exc.code.name,
                reason=str(exc)[:300],
                **details,
            )
            await context.abort(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. the state database: never UNKNOWN
            log.exception("%s failed", action)
            await self._failed(ident, peer, action, outcome="failed", code="INTERNAL", **details)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"the coordinator could not {action}"
                f" ({type(exc).__name__}); see its log, then retry",
            )
        details["rollout_id"] = row.id
        await self._record(context, ident, peer, action, done=not read, **details)
        return self._rollouts.to_proto(row)

    # -- monitoring (docs/monitoring.md) ----------------------------------------------
    async def ListRequests(self, request, context) -> fleet_pb2.ListRequestsResponse:
        await self._record(
            context,
            self._identify(context),
            context.peer(),
            "fleet.list_requests",
            since_s=request.since_s,
            slow_only=request.slow_only,
            failed_only=request.failed_only,
        )
        if self._request_log is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this coordinator runs without a request log (--no-request-log); "
                "the audit chain still has every request: `fleetctl audit query`",
            )
        if request.since_s < 0 or request.limit > 10_000:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "since_s must be >= 0 and limit at most 10000"
            )
        return await asyncio.to_thread(
            self._request_log.list_reply,
            request,
            slow_ttft_ms=self._s.slow_ttft_ms,
            slow_latency_ms=self._s.slow_latency_ms,
        )

    async def GetTraffic(self, request, context) -> fleet_pb2.Traffic:
        # Not audited: aggregate counts and timings, polled every few seconds by `fleetctl top`.
        window, bucket = request.window_s or 3600, request.bucket_s or 60
        if not 1 <= bucket <= window <= 86_400 or window // bucket > 1440:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "need 1 <= bucket_s <= window_s <= 86400 and at most 1440 buckets",
            )
        return traffic(
            self._request_log, self._relay, window, bucket, self._headroom, self._traffic
        )

    # -- the traffic policy (docs/traffic.md) ----------------------------------------------
    async def SetTrafficPolicy(self, request, context) -> fleet_pb2.TrafficPolicies:
        from coordinator.traffic_admin import set_policy

        return await set_policy(self, self._traffic, request, context)

    async def GetTrafficPolicies(self, request, context) -> fleet_pb2.TrafficPolicies:
        # Not audited: the policy and aggregate counts, polled every few seconds by `fleetctl top`.
        return self._traffic.to_proto()

    async def OpenDashboard(self, request, context) -> fleet_pb2.DashboardLink:
        ident = self._identify(context)
        http = self._http()
        if http is None or http.sessions is None:
            await self._failed(
                ident,
                context.peer(),
                "fleet.open_dashboard",
                outcome="failed",
                code="FAILED_PRECONDITION",
            )
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this coordinator runs without its monitoring port (--http-listen off); "
                "start it with --http-listen HOST:PORT",
            )
        await self._record(context, ident, context.peer(), "fleet.open_dashboard")
        return await dashboard_link(http, ident)

    # -- API tokens for the OpenAI-compatible front door ---------------------------------
    async def IssueApiToken(self, request, context) -> fleet_pb2.ApiTokenIssued:
        ident = self._identify(context)
        row, secret = await self._token_op(
            context,
            "token.issue",
            lambda tokens: tokens.issue(
                request.name, request.role, request.ttl_s, created_by=str(ident) if ident else ""
            ),
            name=request.name[:64],
            role=request.role[:16],
            ttl_s=request.ttl_s,
        )
        return fleet_pb2.ApiTokenIssued(token=row, secret=secret)

    async def RevokeApiToken(self, request, context) -> fleet_pb2.ApiToken:
        from coordinator.api_tokens import public_id

        return await self._token_op(
            context,
            "token.revoke",
            lambda tokens: tokens.revoke(request.id, request.reason),
            token_id=public_id(request.id),
            reason=request.reason[:200],
        )

    async def ListApiTokens(self, request, context) -> fleet_pb2.ListApiTokensResponse:
        rows = await self._token_op(
            context, "token.list", lambda tokens: tokens.list(request.all), read=True
        )
        return fleet_pb2.ListApiTokensResponse(tokens=rows)

    async def _token_op(self, context, action: str, work, *, read: bool = False, **details):
        """Run `work` on the token store, audited as `action` (the secret never is): a read
        with one record first, a change with `accepted` first and its outcome after."""
        from coordinator.api_tokens import TokenRequestError

        ident, peer = self._identify(context), context.peer()
        if self._tokens is None:
            await self._failed(
                ident, peer, action, outcome="failed", code="FAILED_PRECONDITION", **details
            )
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this coordinator runs without its OpenAI-compatible port (--openai-listen off), "
                "so it keeps no API tokens",
            )
        if not read:
            details["operation_id"] = f"op-{uuid.uuid4().hex[:12]}"
        await self._record(
            context,
            ident,
            peer,
            action,
            **({} if read else {"outcome": "accepted", "code": ""}),
            **details,
        )
        try:
            out = await asyncio.to_thread(
                work, self._tokens
            )  # a database round trip (docs/state.md)
        except TokenRequestError as exc:
            await self._failed(ident, peer, action, outcome="refused", code=exc.code, **details)
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        if isinstance(out, tuple):
            details["token_id"] = out[0].id
        if not read:
            await self._record(context, ident, peer, action, done=True, **details)
        return out
