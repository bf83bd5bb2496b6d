"""Which role may call which RPC, per daemon (default deny; health and reflection are
added by authz.policy). app -> inference only; operator -> admin; coordinator -> node
operations; node -> nothing but its own identity."""

from cluster.api import FLEET_SERVICE, INFERENCE_SERVICE, NODE_SERVICE, SHADOW_SERVICE
from cluster.security.identity import Role

APP, OPERATOR, COORDINATOR, MONITOR = Role.APP, Role.OPERATOR, Role.COORDINATOR, Role.MONITOR

NODE_TABLE = {
    # Only a coordinator: it audits every request and applies per-caller quotas, so an app
    # reaching a node directly would leave PHI traffic with no audit record.
    f"/{INFERENCE_SERVICE}/Generate": frozenset({COORDINATOR}),
    f"/{NODE_SERVICE}/GetStatus": frozenset({COORDINATOR, OPERATOR}),
    # Operations: coordinators run rollouts and forward operators' commands; an operator
    # may also act on a node directly (a host with no coordinator reachable).
    **{
        f"/{NODE_SERVICE}/{m}": frozenset({COORDINATOR, OPERATOR})
        for m in (
            "Cordon",
            "Drain",
            "StageModel",
            "BeginPush",
            "PushWeights",
            "Activate",
            "Restart",
        )
    },
}

COORDINATOR_TABLE = {
    f"/{INFERENCE_SERVICE}/Generate": frozenset({APP}),
    f"/{FLEET_SERVICE}/ListNodes": frozenset({OPERATOR}),
    f"/{FLEET_SERVICE}/WatchEvents": frozenset({OPERATOR}),
    **{
        f"/{FLEET_SERVICE}/{m}": frozenset({OPERATOR})
        for m in (
            "CordonNode",
            "DrainNode",
            "StartRollout",
            "GetRollout",
            "PauseRollout",
            "ResumeRollout",
            "AbortRollout",
            "ListRequests",
            "GetTraffic",
            "OpenDashboard",
            "IssueApiToken",
            "RevokeApiToken",
            "ListApiTokens",
            "SetTrafficPolicy",
            "GetTrafficPolicies",
        )
    },
    # Shadow evaluation (docs/shadow.md): start, stop and read its report.
    **{
        f"/{SHADOW_SERVICE}/{m}": frozenset({OPERATOR})
        for m in ("StartShadow", "StopShadow", "GetShadow")
    },
}

# The monitoring HTTP(S) port (cluster/http_server.py), by path prefix, longest first.
# A browser holding a dashboard session (from OpenDashboard) counts as its operator.
NODE_HTTP_TABLE = {
    "/metrics": frozenset({COORDINATOR, OPERATOR, MONITOR}),
}
COORDINATOR_HTTP_TABLE = {
    "/metrics": frozenset({OPERATOR, MONITOR}),
    "/api/": frozenset({OPERATOR}),
    "/": frozenset({OPERATOR}),
}

# The OpenAI-compatible front door (coordinator/openai_http.py): bearer tokens
# (`fleetctl tokens issue`) or client certificates. Monitor tokens may list models only.
COORDINATOR_API_TABLE = {
    "/v1/chat/completions": frozenset({APP}),
    "/v1/completions": frozenset({APP}),
    "/v1/models": frozenset({APP, MONITOR, OPERATOR}),
}
