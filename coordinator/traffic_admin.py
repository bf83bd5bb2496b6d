"""Fleet.SetTrafficPolicy (docs/traffic.md): validate, audit (`accepted` first, the outcome
after, both with the operation id; a refusal with why), then install or remove the policy:
the next request follows it, no restart."""

from __future__ import annotations

import logging
import uuid

import grpc

from cluster.api import fleet_pb2
from cluster.traffic import MODEL_RE, Policy, PolicyError

ACTION = "traffic.set"
log = logging.getLogger(__name__)


async def set_policy(admin, control, request, context) -> fleet_pb2.TrafficPolicies:
    """`admin` is the FleetAdmin (its audit helpers); `control` the TrafficControl."""
    ident, peer = admin._identify(context), context.peer()
    who = ident.name if ident else "plaintext operator"
    p = request.policy
    details = {
        "model": p.model[:80],
        "clear": request.clear,
        "operation_id": f"op-{uuid.uuid4().hex[:12]}",
    }
    try:
        if request.clear:
            if not MODEL_RE.match(p.model):
                raise PolicyError("model", f"model {p.model[:80]!r} is not a model id or '*'")
            policy = None
        else:
            policy = Policy.parse(p.model, dict(p.weights), p.overflow)
    except PolicyError as exc:
        await admin._failed(
            ident,
            peer,
            ACTION,
            outcome="refused",
            code="INVALID_ARGUMENT",
            field=exc.field,
            **details,
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc}")
    if policy is None and p.model not in control.policies:
        await admin._failed(ident, peer, ACTION, outcome="refused", code="NOT_FOUND", **details)
        known = ", ".join(sorted(control.policies)) or "none"
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"no traffic policy for {p.model[:80]!r} to clear (policies: {known}); "
            "see fleetctl traffic show",
        )
    if policy is not None:
        details["policy"] = policy.spec()
    await admin._record(context, ident, peer, ACTION, outcome="accepted", code="", **details)
    try:
        await control.change(p.model, policy, who)
    except Exception as exc:  # noqa: BLE001 - the state database: say so, never UNKNOWN
        log.error("%s: the state database did not take the policy: %s", ACTION, exc)
        await admin._failed(ident, peer, ACTION, outcome="failed", code="UNAVAILABLE", **details)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"the traffic policy for {p.model[:80]!r} was not changed: the state database did "
            f"not take it ({type(exc).__name__}); check it (docs/state.md) and retry",
        )
    await admin._record(context, ident, peer, ACTION, done=True, **details)
    return control.to_proto()
