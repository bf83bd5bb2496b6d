"""The written health policy, as pure functions of (verdict, signal, time).

- A node is PENDING until the coordinator has connected and read its status.
- A failed probe or a failure seen while routing counts against it; N consecutive
  failures (`eject_after_failures`) eject it. A hard signal (connection refused, a
  stream reset by a dead process) ejects at once.
- The last healthy node is never ejected on soft signals (Envoy: always keep one).
- Ejection n lasts `eject_base_s` x n, capped at `eject_max_s`; then the node is PROBING
  and needs `readmit_after_probes` consecutive passing probes to take traffic again.
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


@dataclass(frozen=True)
class Policy:
    eject_after_failures: int = 3
    eject_base_s: float = 2.0
    eject_max_s: float = 60.0
    readmit_after_probes: int = 3

    @classmethod
    def from_settings(cls, s) -> "Policy":
        return cls(s.eject_after_failures, s.eject_base_s, s.eject_max_s, s.readmit_after_probes)

    def ejection_s(self, ejections: int) -> float:
        return min(self.eject_base_s * ejections, self.eject_max_s)


@dataclass(frozen=True)
class Health:
    verdict: Verdict = Verdict.PENDING
    reason: str = "discovered; not yet connected"
    failures: int = 0          # consecutive
    ejections: int = 0
    ejected_until: float = 0.0
    passes: int = 0            # consecutive passing probes while PROBING


def on_success(h: Health, *, policy: Policy) -> Health:
    """A probe passed (status read) or a request completed."""
    if h.verdict is Verdict.PENDING:
        return replace(h, verdict=Verdict.HEALTHY, reason="connected; status read", failures=0)
    if h.verdict is Verdict.SUSPECT:
        return replace(h, verdict=Verdict.HEALTHY, reason="recovered", failures=0)
    if h.verdict is Verdict.PROBING:
        passes = h.passes + 1
        if passes >= policy.readmit_after_probes:
            return replace(h, verdict=Verdict.HEALTHY, failures=0, passes=0,
                           reason=f"readmitted after {passes} passing probes")
        return replace(h, passes=passes)
    if h.verdict is Verdict.HEALTHY and h.failures:
        return replace(h, failures=0)
    return h


def on_failure(h: Health, *, reason: str, hard: bool, now: float, last_healthy: bool,
               policy: Policy) -> Health:
    """A probe failed or routing saw an error; `last_healthy` if no other node takes traffic."""
    if h.verdict in (Verdict.PENDING, Verdict.REJECTED):
        return replace(h, reason=reason)
    if h.verdict is Verdict.EJECTED:
        return h
    if h.verdict is Verdict.PROBING:
        return _eject(h, f"failed a readmission probe: {reason}", now, policy)
    failures = h.failures + 1
    if hard or failures >= policy.eject_after_failures:
        if last_healthy and not hard:
            return replace(h, verdict=Verdict.SUSPECT, failures=failures,
                           reason=f"{reason} ({failures} in a row); kept: last healthy node")
        why = reason if hard else f"{reason} ({failures} consecutive failures)"
        return _eject(h, why, now, policy)
    return replace(h, verdict=Verdict.SUSPECT, failures=failures, reason=f"{reason} ({failures} in a row)")


def _eject(h: Health, reason: str, now: float, policy: Policy) -> Health:
    n = h.ejections + 1
    span = policy.ejection_s(n)
    return Health(Verdict.EJECTED, f"{reason}; ejected for {span:g}s", failures=h.failures + 1,
                  ejections=n, ejected_until=now + span)


def on_tick(h: Health, *, now: float) -> Health:
    """Time passing: an ejection whose backoff is over becomes PROBING."""
    if h.verdict is Verdict.EJECTED and now >= h.ejected_until:
        return replace(h, verdict=Verdict.PROBING, passes=0, reason="backoff over; probing before readmission")
    return h


def rejected(reason: str) -> Health:
    return Health(Verdict.REJECTED, reason)
