"""The Python client for clinical apps: stream or generate, with typed errors.

    client = FleetClient(["10.0.0.1:7700", "10.0.0.2:7700"])   # or one "HOST:PORT"
    result = client.generate(prompt="...", max_tokens=400, timeout_s=60)

    async with AsyncFleetClient("127.0.0.1:7700") as client:
        async for chunk in client.stream(build_request(prompt="...", max_tokens=400), timeout_s=60):
            ...

Both clients retry a call that failed before its first chunk (UNAVAILABLE on the next
address, RESOURCE_EXHAUSTED after the server's hint) within one deadline; see retry.py.
Modules: results (requests, GenerateResult), retry (the decision), errors (the tree),
sync_client, async_client.
"""

from __future__ import annotations

from cluster.client.async_client import AsyncFleetClient
from cluster.client.errors import (
    DeadlineExceededError,
    FleetError,
    GenerationInterruptedError,
    InvalidRequestError,
    OverloadedError,
    ResumeImpossibleError,
    SchemaViolationError,
    UnavailableError,
)
from cluster.client.results import GenerateResult, Quality, ResultBuilder, build_request
from cluster.client.retry import RetryDecision, RetryPolicy, decide_retry
from cluster.client.sync_client import FleetClient

__all__ = [
    "AsyncFleetClient",
    "DeadlineExceededError",
    "FleetClient",
    "FleetError",
    "GenerateResult",
    "GenerationInterruptedError",
    "InvalidRequestError",
    "OverloadedError",
    "Quality",
    "SchemaViolationError",
    "ResultBuilder",
    "ResumeImpossibleError",
    "RetryDecision",
    "RetryPolicy",
    "UnavailableError",
    "build_request",
    "decide_retry",
]
