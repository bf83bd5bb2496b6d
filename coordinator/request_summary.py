"""One request as monitoring sees it once it has ended: who, when, how long each phase
took, where it ran and how it ended. Metadata only: never the prompt or the completion,
never text a caller wrote (the request id is limited to a safe alphabet by validation).

The relay makes exactly one per request, at the moment its audit record is final; the
metrics (coordinator/metrics.py) and the request log (coordinator/request_log.py) both
take it from `Monitor.request_ended`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Optional

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """How a request (or an admin call) ended; the values are the words the audit chain,
    the request log and the metrics have always carried, so a member compares equal to them."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"  # the caller's deadline passed
    REJECTED = "rejected"  # the caller's input (400, 404)
    REFUSED = "refused"  # the caller's quota, a full queue, an audit log that cannot be written
    ACCEPTED = "accepted"  # audit only: routed (a request) or about to act (an admin call)
    DENIED = "denied"  # audit only: the caller's certificate, token or role
    OK = "ok"  # audit only: an admin call done


# How requests ended, in the two groups monitoring keeps apart everywhere (the alert rules,
# the traffic buckets, `fleetctl requests --failed/--rejected`, the dashboard): the fleet's
# failures, and refusals of the caller's own input or quota (400s, 404s, 429s), which are not.
FAILED_OUTCOMES = (Outcome.FAILED, Outcome.DEADLINE)
REJECTED_OUTCOMES = (Outcome.REJECTED, Outcome.REFUSED)


@dataclass
class RequestSummary:
    request_id: str
    caller: str  # role/name of the caller's certificate
    priority: str  # "interactive" or "batch"
    started_at: float  # unix seconds, when the coordinator accepted it
    ended_at: float
    outcome: Outcome  # completed, failed, cancelled, deadline, rejected, refused (a str)
    code: str  # gRPC status name
    duration_s: float  # accepted -> end
    queue_s: Optional[float] = None  # waiting for a node, summed over hops (None: never queued)
    ttft_s: Optional[float] = None  # accepted -> first token sent (None: no token sent)
    decode_s: float = 0.0  # first token -> last token
    prompt_tokens: int = 0
    completion_tokens: int = 0
    nodes: list[str] = field(default_factory=list)  # every node that served part of it, in order
    failovers: int = 0
    retries: int = 0
    restarts: int = 0
    finish_reason: str = ""
    quality_score: Optional[float] = None
    quality_parts: dict[str, float] = field(default_factory=dict)  # sub-score name -> 0..1
    schema_valid: Optional[bool] = None  # output_format requests that completed
    output_format: str = ""  # note template or json_schema:<digest>
    template: str = ""  # prompt template version, e.g. soap-note@qwen2/v2 (or the name asked for)
    token_gaps: list[float] = field(
        default_factory=list
    )  # seconds between tokens sent (metrics only)


class Monitor:
    """Where ended requests go: any of metrics and the request log, each optional (a
    coordinator may run with either off). Never raises into the relay."""

    def __init__(self) -> None:
        self.sinks: list[Callable[[RequestSummary], None]] = []

    def request_ended(self, summary: RequestSummary) -> None:
        for sink in self.sinks:
            try:
                sink(summary)
            except Exception:  # noqa: BLE001 - monitoring must never fail a request
                log.exception("monitoring sink %s failed", getattr(sink, "__qualname__", sink))
