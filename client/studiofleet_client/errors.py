"""The client library's exception tree; gRPC status codes are mapped here and only here.

Errors raised by FleetClient / AsyncFleetClient carry where and what: `target` (the
address of the last attempt), `request_id`, `attempts`, `targets_tried`, and a message
that ends with what to do next. They never contain prompt or completion text.
"""

from __future__ import annotations

from typing import Optional, Sequence

import grpc

from studiofleet_client.tls import tls_refusal

__all__ = [
    "DeadlineExceededError",
    "DuplicateRequestError",
    "FleetError",
    "GenerationInterruptedError",
    "InvalidRequestError",
    "OverloadedError",
    "PermissionDeniedError",
    "PreconditionError",
    "RequestCancelledError",
    "ResumeImpossibleError",
    "SchemaViolationError",
    "UnauthenticatedError",
    "UnavailableError",
    "add_context",
    "from_rpc_error",
    "pushback_ms",
]

PUSHBACK_KEY = "grpc-retry-pushback-ms"


class FleetError(Exception):
    """Any failure of a StudioFleet call; `code` is the gRPC status name."""

    code = "UNKNOWN"
    next_step = "retry once; if it fails again, report it with the request id and the server's log"

    def __init__(self, message: str, *, retry_after_ms: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.details = message  # the server's (or the client's) own words, without context
        self.retry_after_ms = retry_after_ms
        self.target = ""
        self.request_id = ""
        self.attempts = 0
        self.targets_tried: list[str] = []


class InvalidRequestError(FleetError):
    code = "INVALID_ARGUMENT"
    next_step = "fix the request; sending it again unchanged fails the same way"


class UnauthenticatedError(FleetError):
    code = "UNAUTHENTICATED"
    next_step = "check the client's credentials for this endpoint"


class PermissionDeniedError(FleetError):
    """The caller's role may not make this call; the server's message ends with the roles
    that may ("allowed: app"), so the next step names the certificate to use."""

    code = "PERMISSION_DENIED"

    @property
    def next_step(self) -> str:
        allowed = self.details.rpartition("allowed: ")[2] if "allowed: " in self.details else ""
        roles = [r.strip() for r in allowed.split(",") if r.strip() in ROLE_HINTS]
        if not roles:
            return "ask an operator for a certificate of a role that may make this call"
        return " or ".join(ROLE_HINTS[r] for r in roles)


ROLE_HINTS = {
    "app": "use an app certificate (--tls-name APP; issue one with `fleetctl certs issue --role app --name APP`)",
    "operator": (
        "use an operator certificate (--tls-name NAME; issue one with "
        "`fleetctl certs issue --role operator --name NAME`)"
    ),
    "coordinator": "call through the coordinator (nodes take this call from coordinators only)",
    "monitor": "use a monitor certificate or token (--role monitor)",
}


class OverloadedError(FleetError):
    """The fleet is at capacity; `retry_after_ms` says when to try again."""

    code = "RESOURCE_EXHAUSTED"
    next_step = (
        "retry after retry_after_ms, send fewer requests at once, or use "
        "priority='batch' for background work"
    )


class UnavailableError(FleetError):
    code = "UNAVAILABLE"
    next_step = (
        "check that a node or coordinator is serving at the addresses tried, "
        "or give the client more addresses"
    )


class GenerationInterruptedError(UnavailableError):
    """The node ended the stream early (shutdown, engine failure); `partial` holds what
    was generated, so the request can be resumed elsewhere with its token ids."""

    next_step = (
        "resume elsewhere with partial.token_ids as prefix_token_ids, or retry the whole request"
    )

    def __init__(self, message: str, *, partial=None, finish_reason: str = ""):
        super().__init__(message)
        self.partial = partial
        self.finish_reason = finish_reason


class DeadlineExceededError(FleetError):
    code = "DEADLINE_EXCEEDED"
    next_step = "raise timeout_s or lower max_tokens"


class RequestCancelledError(FleetError):
    """The call was cancelled (by the caller, or by the server on its way down)."""

    code = "CANCELLED"
    next_step = "the call was cancelled; send it again if the result is still needed"


class PreconditionError(FleetError):
    """The request needs something the target lacks (e.g. other model weights)."""

    code = "FAILED_PRECONDITION"
    next_step = "send it to a target that serves what the request requires"


class DuplicateRequestError(FleetError):
    code = "ALREADY_EXISTS"
    next_step = "use a new request_id for each request"


class ResumeImpossibleError(FleetError):
    """The coordinator could not finish a request it had started streaming: no node
    serving the same weights was left, or its failover budget ran out. Retry it whole."""

    code = "ABORTED"
    next_step = "retry the whole request (discard the tokens already received)"


class SchemaViolationError(FleetError):
    """The completion does not satisfy the request's output format. `rule` is the rule
    that failed ("truncated", "json", or a JSON Schema keyword such as "required"), `path`
    where (a JSON pointer); `result` is the whole result, quality score included."""

    code = "SCHEMA_VIOLATION"
    next_step = (
        "raise max_tokens if it was truncated; otherwise review the schema or the prompt template"
    )

    def __init__(self, message: str, *, rule: str = "", path: str = "", result=None):
        super().__init__(message)
        self.rule = rule
        self.path = path
        self.result = result


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        UnauthenticatedError,
        PermissionDeniedError,
        OverloadedError,
        UnavailableError,
        DeadlineExceededError,
        RequestCancelledError,
        PreconditionError,
        DuplicateRequestError,
        ResumeImpossibleError,
    )
}


def pushback_ms(err: grpc.RpcError) -> Optional[int]:
    """The server's `grpc-retry-pushback-ms` trailer; None if absent or not a whole number."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    value = None
    for key, raw in trailers or ():
        if key == PUSHBACK_KEY:
            text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
            value = int(text) if text.isdigit() else None
    return value


def from_rpc_error(
    err: grpc.RpcError,
    *,
    target: str = "",
    request_id: str = "",
    attempts: int = 0,
    targets_tried: Sequence[str] = (),
) -> FleetError:
    """Map a gRPC error to the tree; with `target`, the message also says where, which
    request, and what to do next."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    code = code if code is not None else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code.name, FleetError)
    refusal = tls_refusal(details or "") if code == grpc.StatusCode.UNAVAILABLE else None
    if refusal:
        details = (
            f"TLS handshake refused: {refusal}. Check that this client's certificate is from the fleet's "
            f"CA, unexpired and not revoked ({details})"
        )
    elif code == grpc.StatusCode.UNAVAILABLE and "Connection refused" in (details or ""):
        details = (
            f"nothing answers at {target or 'the address given'} (connection refused): the daemon is not "
            "running there, or listens on another port; check the address (-c, STUDIOFLEET_COORDINATOR "
            "or the config file)"
        )
    exc = cls(details or code.name, retry_after_ms=pushback_ms(err))
    if cls is FleetError:
        exc.code = code.name
    if target:
        add_context(
            exc,
            target=target,
            request_id=request_id,
            attempts=attempts,
            targets_tried=targets_tried,
        )
    return exc


def add_context(
    exc: FleetError,
    *,
    target: str,
    request_id: str,
    attempts: int = 0,
    targets_tried: Sequence[str] = (),
) -> FleetError:
    """Record where the call went and rewrite `message` to name it and the next step."""
    exc.target, exc.request_id, exc.attempts = target, request_id, attempts
    exc.targets_tried = list(dict.fromkeys(targets_tried or [target]))
    where = (
        f"target {target}"
        if len(exc.targets_tried) <= 1
        else f"targets {', '.join(exc.targets_tried)} (last {target})"
    )
    tries = f", {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
    step = exc.next_step
    if isinstance(exc, OverloadedError) and exc.retry_after_ms is not None:
        step = step.replace("retry_after_ms", f"{exc.retry_after_ms} ms")
    exc.message = f"{exc.details} [{where}, request {request_id or '(no id)'}{tries}]; next: {step}"
    exc.args = (exc.message,)
    return exc
