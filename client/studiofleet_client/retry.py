"""When to try a Generate call again: one pure decision shared by both clients.

gRPC A6 semantics, narrowed to what is safe for a token stream:
  * never after a chunk was received (tokens were delivered; a retry would repeat them):
    such a stream is resumed on the next coordinator instead (resume.py), at most
    `max_coordinator_failovers` times;
  * UNAVAILABLE: on the next address, after an exponential backoff (0.1 s, x2, at most
    1 s; jittered as in A6 unless the policy turns jitter off);
  * RESOURCE_EXHAUSTED: on the same address, after the server's grpc-retry-pushback-ms
    hint, only if the hint is present, at most `max_pushback_s`, and still fits in the
    caller's deadline;
  * ALREADY_EXISTS while resuming: on the same address, after the UNAVAILABLE backoff
    (the node may still be winding down the broken stream's run of the same request id);
  * anything else (INVALID_ARGUMENT, DEADLINE_EXCEEDED, CANCELLED, FAILED_PRECONDITION,
    ABORTED, ...): never;
  * at most `max_attempts` attempts in all, within one overall deadline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import grpc

from studiofleet_client.errors import from_rpc_error
from studiofleet_client.resume import StreamState

__all__ = ["Attempts", "Deadline", "RetryDecision", "RetryPolicy", "decide_retry", "parse_targets"]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    max_pushback_s: float = 2.0
    # An attempt needs at least this much of the deadline left to be worth starting.
    min_attempt_s: float = 0.05
    jitter: bool = True
    # Times one stream may move to another coordinator after its first chunk (0: never).
    max_coordinator_failovers: int = 3

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.max_coordinator_failovers < 0:
            raise ValueError(
                f"max_coordinator_failovers must be 0 or more, got {self.max_coordinator_failovers}"
            )


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_s: float = 0.0
    next_target: bool = False  # move on to the next address (round robin)
    reason: str = ""


def decide_retry(
    code: Union[str, grpc.StatusCode],
    *,
    received_chunk: bool,
    attempt: int,
    time_left_s: Optional[float],
    pushback_ms: Optional[int] = None,
    policy: RetryPolicy = RetryPolicy(),
    jitter: float = 1.0,
    resuming: bool = False,
) -> RetryDecision:
    """Whether to make another attempt after attempt number `attempt` (1-based) failed.

    `time_left_s` is what remains of the overall deadline (None: no deadline); `jitter`
    in [0, 1] scales the UNAVAILABLE backoff (pass random.random(), or 1.0 for none);
    `resuming`: the attempt continues a stream another coordinator lost (resume.py).
    """
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    if received_chunk:
        return RetryDecision(
            False, reason="chunks were already received; a retry would repeat tokens"
        )
    if name == "UNAVAILABLE" or (resuming and name == "ALREADY_EXISTS"):
        delay = min(
            policy.initial_backoff_s * policy.backoff_multiplier ** max(attempt - 1, 0),
            policy.max_backoff_s,
        ) * min(max(jitter, 0.0), 1.0)
        next_target = name == "UNAVAILABLE"
    elif name == "RESOURCE_EXHAUSTED":
        if pushback_ms is None:
            return RetryDecision(False, reason="overloaded and the server gave no retry hint")
        delay = pushback_ms / 1000.0
        if delay > policy.max_pushback_s:
            return RetryDecision(
                False,
                reason=f"the server asks to wait {pushback_ms} ms, "
                f"more than the client's {policy.max_pushback_s:g} s cap",
            )
        next_target = False
    else:
        return RetryDecision(False, reason=f"{name} is not retryable")
    if attempt >= policy.max_attempts:
        return RetryDecision(False, reason=f"all {policy.max_attempts} attempts used")
    if time_left_s is not None and delay + policy.min_attempt_s > time_left_s:
        return RetryDecision(
            False,
            reason=f"waiting {delay:.3f} s would not leave time for another "
            f"attempt before the deadline ({time_left_s:.3f} s left)",
        )
    return RetryDecision(
        True, delay_s=delay, next_target=next_target, reason=f"{name}: attempt {attempt + 1}"
    )


class Deadline:
    """One overall deadline across attempts; None means none."""

    def __init__(self, timeout_s: Optional[float]):
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> Optional[float]:
        return None if self._end is None else max(self._end - time.monotonic(), 0.0)


def parse_targets(targets: Union[str, Sequence[str]]) -> list[str]:
    """'HOST:PORT', 'A:1,B:2' or a list of them -> a non-empty list of addresses."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out = [t.strip() for t in items if t and t.strip()]
    if not out:
        raise ValueError(f"expected one or more HOST:PORT addresses, got {targets!r}")
    return out


def client_setup(
    targets: Union[str, Sequence[str]],
    channel,
    retry_policy: Optional["RetryPolicy"],
    max_attempts: Optional[int],
) -> tuple[list[str], "RetryPolicy"]:
    """The addresses and retry policy both clients start from; `channel` needs one address."""
    addresses = parse_targets(targets)
    if channel is not None and len(addresses) != 1:
        raise ValueError("channel= needs exactly one target address")
    policy = retry_policy or RetryPolicy()
    if max_attempts is not None:
        policy = RetryPolicy(**{**policy.__dict__, "max_attempts": max_attempts})
    return addresses, policy


class Attempts:
    """The bookkeeping of one call across attempts: which address, how many tries, how
    much time is left, and the error to raise when no retry is left."""

    def __init__(
        self,
        targets: Sequence[str],
        start: int,
        policy: RetryPolicy,
        timeout_s: Optional[float],
        request_id: str,
    ):
        self.targets, self.index, self.policy = list(targets), start % len(targets), policy
        self.deadline = Deadline(timeout_s)
        self.request_id = request_id
        self.attempt = 0
        self.phase_start = 0  # attempts before the current stream's resume (retries count from it)
        self.tried: list[str] = []

    @property
    def target(self) -> str:
        return self.targets[self.index]

    def begin(self) -> Optional[float]:
        """Start the next attempt; returns its timeout (what is left of the deadline)."""
        self.attempt += 1
        self.tried.append(self.target)
        return self.deadline.remaining()

    def failed(
        self, err: grpc.RpcError, *, received_chunk: bool, stream: Optional[StreamState] = None
    ) -> float:
        """The delay before the next attempt; raises the mapped FleetError if there is none
        (ResumeImpossibleError when the attempt was to resume `stream` after a failover)."""
        exc = from_rpc_error(
            err,
            target=self.target,
            request_id=self.request_id,
            attempts=self.attempt,
            targets_tried=self.tried,
        )
        resuming = stream is not None and stream.failovers > 0
        decision = decide_retry(
            exc.code,
            received_chunk=received_chunk,
            attempt=self.attempt - self.phase_start,
            time_left_s=self.deadline.remaining(),
            pushback_ms=exc.retry_after_ms,
            policy=self.policy,
            jitter=random.random() if self.policy.jitter else 1.0,
            resuming=resuming,
        )
        exc.retry_decision = decision
        if not decision.retry:
            if resuming:
                raise stream.failed_resume(exc, self.target, self.tried, self.attempt) from None
            raise exc from None
        if decision.next_target:
            self.index = (self.index + 1) % len(self.targets)
        return decision.delay_s

    def broke(self, err: grpc.RpcError, stream: StreamState) -> None:
        """The stream broke after its first chunk: continue it on the next address (the
        retry budget starts again there), or raise why it cannot be continued."""
        stream.broke(err, self.target, self.targets, self.tried, self.attempt)
        self.index = (self.index + 1) % len(self.targets)
        self.phase_start = self.attempt
