"""The client library's exception tree; gRPC status codes are mapped here and only here."""

from __future__ import annotations

from typing import Optional

import grpc


class FleetError(Exception):
    """Any failure of a StudioFleet call; `code` is the gRPC status name."""

    code = "UNKNOWN"

    def __init__(self, message: str, *, retry_after_ms: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class InvalidRequestError(FleetError):
    code = "INVALID_ARGUMENT"


class UnauthenticatedError(FleetError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(FleetError):
    code = "PERMISSION_DENIED"


class OverloadedError(FleetError):
    """The fleet is at capacity; `retry_after_ms` says when to try again."""

    code = "RESOURCE_EXHAUSTED"


class UnavailableError(FleetError):
    code = "UNAVAILABLE"


class GenerationInterruptedError(UnavailableError):
    """The node ended the stream early (shutdown, engine failure); `partial` holds what
    was generated, so the request can be resumed elsewhere with its token ids."""

    def __init__(self, message: str, *, partial=None, finish_reason: str = ""):
        super().__init__(message)
        self.partial = partial
        self.finish_reason = finish_reason


class DeadlineExceededError(FleetError):
    code = "DEADLINE_EXCEEDED"


class CancelledError(FleetError):
    code = "CANCELLED"


class PreconditionError(FleetError):
    """The request needs something the target lacks (e.g. other model weights)."""

    code = "FAILED_PRECONDITION"


class DuplicateRequestError(FleetError):
    code = "ALREADY_EXISTS"


class ResumeImpossibleError(FleetError):
    """The coordinator could not finish a request it had started streaming: no node
    serving the same weights was left, or its failover budget ran out. Retry it whole."""

    code = "ABORTED"


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidRequestError, UnauthenticatedError, PermissionDeniedError, OverloadedError,
                UnavailableError, DeadlineExceededError, CancelledError, PreconditionError,
                DuplicateRequestError, ResumeImpossibleError)
}


def from_rpc_error(err: grpc.RpcError) -> FleetError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    retry = None
    for key, value in (err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else ():
        if key == "grpc-retry-pushback-ms" and str(value).isdigit():
            retry = int(value)
    cls = _BY_CODE.get(code.name, FleetError)
    exc = cls(details or code.name, retry_after_ms=retry)
    if cls is FleetError:
        exc.code = code.name
    return exc
