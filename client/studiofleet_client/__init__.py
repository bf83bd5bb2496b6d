"""StudioFleet's Python client for clinical apps: stream or generate, with typed errors.

    client = FleetClient(["10.0.0.1:7700", "10.0.0.2:7700"], tls=ClientTLS("/etc/studiofleet", "notes-app"))
    result = client.generate(prompt="...", max_tokens=400, timeout_s=60)

    async with AsyncFleetClient("127.0.0.1:7700", tls=...) as client:
        async for chunk in client.stream(build_request(prompt="...", max_tokens=400), timeout_s=60):
            ...

Both clients retry a call that failed before its first chunk (UNAVAILABLE on the next
address, RESOURCE_EXHAUSTED after the server's hint) within one deadline; see retry.py.
Modules: results (requests, GenerateResult), retry (the decision), errors (the tree),
tls (credentials and channels), sync_client, async_client; api holds the generated gRPC
code. Needs only grpcio and protobuf.
"""

from __future__ import annotations

from studiofleet_client.async_client import AsyncFleetClient
from studiofleet_client.errors import (
    DeadlineExceededError,
    DuplicateRequestError,
    FleetError,
    GenerationInterruptedError,
    InvalidRequestError,
    OverloadedError,
    PermissionDeniedError,
    PreconditionError,
    RequestCancelledError,
    ResumeImpossibleError,
    SchemaViolationError,
    UnauthenticatedError,
    UnavailableError,
)
from studiofleet_client.results import GenerateResult, Quality, ResultBuilder, build_request
from studiofleet_client.retry import RetryDecision, RetryPolicy, decide_retry
from studiofleet_client.sync_client import FleetClient
from studiofleet_client.tls import ClientTLS, TLSConfigError

__version__ = "0.1.0"

__all__ = [
    "AsyncFleetClient",
    "ClientTLS",
    "DeadlineExceededError",
    "DuplicateRequestError",
    "FleetClient",
    "FleetError",
    "GenerateResult",
    "GenerationInterruptedError",
    "InvalidRequestError",
    "OverloadedError",
    "PermissionDeniedError",
    "PreconditionError",
    "Quality",
    "RequestCancelledError",
    "ResultBuilder",
    "ResumeImpossibleError",
    "RetryDecision",
    "RetryPolicy",
    "SchemaViolationError",
    "TLSConfigError",
    "UnauthenticatedError",
    "UnavailableError",
    "build_request",
    "decide_retry",
]
