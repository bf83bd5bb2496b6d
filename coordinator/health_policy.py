"""The written health policy, as pure functions of (verdict, signal, time).

- A node is PENDING until the coordinator has connected and read its status.
- Failures are counted per source: status probes, and requests (failures seen while
  routing). A passing probe clears only the probe count and a completed request only the
  request count, so a node that answers status but fails every request is still ejected.
  N consecutive failures of either kind (`eject_after_failures`) eject the node. A hard
  signal (a stream reset by a dead process, the health Watch stream breaking) ejects at once.
- The last healthy node is never ejected on soft signals (Envoy: always keep one).
- Ejection n lasts `eject_base_s` x n, capped at `eject_max_s`; then the node is PROBING
  and needs `readmit_after_probes` consecutive passing probes to take traffic again.
  After `ejection_decay_s` healthy the count of ejections starts again from zero.
Every change of verdict is returned with its reason; the fleet turns it into an event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Verdict(enum.Enum):
    PENDING = "PENDING"
    HEALTHY = "HEALTHY"
    SUSPECT = "SUSPECT"
    EJECTED = "EJECTED"
    PROBING = "PROBING"
    REJECTED = "REJECTED"


ACCEPTING = (Verdict.HEALTHY, Verdict.SUSPECT)


class Source(enum.Enum):
    PROBE = "probe"  # the coordinator's status poll
    REQUEST = "request"  # what routing saw


@dataclass(frozen=True)
class Policy:
    eject_after_failures: int = 3
    eject_base_s: float = 2.0
    eject_max_s: float = 60.0
    readmit_after_probes: int = 3
    ejection_decay_s: float = 300.0

    @classmethod
    def from_settings(cls, s) -> "Policy":
        return cls(
            s.eject_after_failures,
            s.eject_base_s,
            s.eject_max_s,
            s.readmit_after_probes,
            s.ejection_decay_s,
        )

    def ejection_s(self, ejections: int) -> float:
        return min(self.eject_base_s * ejections, self.eject_max_s)


@dataclass(frozen=True)
class Health:
    verdict: Verdict = Verdict.PENDING
    reason: str = "discovered; not yet connected"
    probe_failures: int = 0  # consecutive failed status probes
    request_failures: int = 0  # consecutive failures seen while routing
    ejections: int = 0
    ejected_until: float = 0.0
    passes: int = 0  # consecutive passing probes while PROBING
    healthy_since: float = 0.0

    @property
    def failures(self) -> int:
        return max(self.probe_failures, self.request_failures)

    def _cleared(self, source: Source) -> "Health":
        return replace(self, **{f"{source.value}_failures": 0})


def on_success(h: Health, *, source: Source, now: float, policy: Policy) -> Health:
    """A probe passed (status read) or a request completed."""
    if h.verdict is Verdict.PENDING:
        return replace(
            h,
            verdict=Verdict.HEALTHY,
            reason="connected; status read",
            probe_failures=0,
            request_failures=0,
            healthy_since=now,
        )
    if h.verdict is Verdict.PROBING:
        if source is not Source.PROBE:
            return h
        passes = h.passes + 1
        if passes >= policy.readmit_after_probes:
            return replace(
                h,
                verdict=Verdict.HEALTHY,
                probe_failures=0,
                request_failures=0,
                passes=0,
                healthy_since=now,
                reason=f"readmitted after {passes} passing probes",
            )
        return replace(h, passes=passes)
    if h.verdict not in ACCEPTING:
        return h
    h = h._cleared(source)
    if h.verdict is Verdict.SUSPECT and not h.failures:
        h = replace(
            h,
            verdict=Verdict.HEALTHY,
            reason=f"recovered ({source.value} succeeded)",
            healthy_since=now,
        )
    if (
        h.ejections
        and h.verdict is Verdict.HEALTHY
        and now - h.healthy_since >= policy.ejection_decay_s
    ):
        h = replace(h, ejections=0)
    return h


def on_failure(
    h: Health,
    *,
    source: Source,
    reason: str,
    hard: bool,
    now: float,
    last_healthy: bool,
    policy: Policy,
) -> Health:
    """A probe failed or routing saw an error; `last_healthy` if no other node takes traffic."""
    if h.verdict in (Verdict.PENDING, Verdict.REJECTED):
        return replace(h, reason=reason)
    if h.verdict is Verdict.EJECTED:
        return h
    if h.verdict is Verdict.PROBING:
        return _eject(h, f"failed a readmission probe: {reason}", now, policy)
    field = f"{source.value}_failures"
    failures = getattr(h, field) + 1
    h = replace(h, **{field: failures})
    if hard or failures >= policy.eject_after_failures:
        if last_healthy and not hard:
            return replace(
                h,
                verdict=Verdict.SUSPECT,
                reason=f"{reason} ({failures} {source.value} failures in a row); kept: last healthy node",
            )
        why = reason if hard else f"{reason} ({failures} consecutive {source.value} failures)"
        return _eject(h, why, now, policy)
    return replace(
        h, verdict=Verdict.SUSPECT, reason=f"{reason} ({failures} {source.value} failures in a row)"
    )


def _eject(h: Health, reason: str, now: float, policy: Policy) -> Health:
    n = h.ejections + 1
    span = policy.ejection_s(n)
    return Health(
        Verdict.EJECTED,
        f"{reason}; ejected for {span:g}s",
        probe_failures=h.probe_failures,
        request_failures=h.request_failures,
        ejections=n,
        ejected_until=now + span,
    )


def on_tick(h: Health, *, now: float) -> Health:
    """Time passing: an ejection whose backoff is over becomes PROBING."""
    if h.verdict is Verdict.EJECTED and now >= h.ejected_until:
        return replace(
            h, verdict=Verdict.PROBING, passes=0, reason="backoff over; probing before readmission"
        )
    return h


def rejected(reason: str) -> Health:
    return Health(Verdict.REJECTED, reason)
