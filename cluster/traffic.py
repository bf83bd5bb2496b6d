"""The traffic policy (docs/traffic.md): pure decisions over node classes, tested without sockets.

A node's class is what its operator named it (fleet-node --node-class), else "upstream" for
the upstream engine and "local" for the rest. A policy, per model id (or "*" for any other),
shares new requests across classes by weight (smooth weighted round robin: exact shares, no
randomness; a session key picks its class by hash, so a session stays in one class) and may
name an overflow class. Overflow turns on when the local classes (the weighted ones other
than the overflow class) would miss the SLA: their predicted p95 time per note at the arrival
rate now (the live headroom model), or, where no routable local node has a capacity profile,
the oldest local request's wait in the admission queue. While it is on, a share of new
requests goes to the overflow class (the excess over the rate the SLA holds to, headroom
signal) and a request that finds every local node full goes there instead of waiting (both
signals). It turns off once the pressure has stayed clear for the hold time.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from cluster.capacity.headroom import NodeModel, TokenMix

LOCAL, UPSTREAM = "local", "upstream"
ANY_MODEL = "*"
MAX_CLASSES = 8
MAX_WEIGHT = 10_000
CLASS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MODEL_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127})$")


class PolicyError(ValueError):
    """A policy that cannot be used; `field` names what is wrong (model, weights, overflow)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def class_of(node_class: str, engine: str) -> str:
    """A node's traffic class: the one its operator named, else by engine."""
    return node_class or (UPSTREAM if engine == UPSTREAM else LOCAL)


@dataclass(frozen=True)
class Policy:
    model: str  # a model id, or "*"
    weights: tuple[tuple[str, int], ...]  # (class, weight), by class name
    overflow: str = ""  # the class that takes overflow; "" for none

    @classmethod
    def parse(cls, model: str, weights: Mapping[str, int], overflow: str = "") -> Policy:
        """A checked policy; raises PolicyError naming the field at fault."""
        if not MODEL_RE.match(model or ""):
            raise PolicyError(
                "model",
                f"model {model[:80]!r} is not a model id (letters, digits, '._:/+-', at most "
                "128) or '*' for every model without a policy of its own",
            )
        if not weights:
            raise PolicyError(
                "weights", "give at least one CLASS=WEIGHT, e.g. local=90 upstream=10"
            )
        if len(weights) > MAX_CLASSES:
            raise PolicyError("weights", f"at most {MAX_CLASSES} classes, not {len(weights)}")
        for name, weight in weights.items():
            if not CLASS_RE.match(name):
                raise PolicyError(
                    "weights",
                    f"class {name[:40]!r} must be 1-32 lower-case letters, digits, '-' or '_', "
                    "starting with a letter or digit",
                )
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise PolicyError("weights", f"{name}: the weight must be a whole number")
            if not 0 <= weight <= MAX_WEIGHT:
                raise PolicyError("weights", f"{name}={weight}: weights run from 0 to {MAX_WEIGHT}")
        if sum(weights.values()) <= 0:
            raise PolicyError("weights", "at least one class needs a weight above 0")
        if overflow and not CLASS_RE.match(overflow):
            raise PolicyError(
                "overflow", f"overflow class {overflow[:40]!r} is not a class name (see weights)"
            )
        if overflow and not any(w > 0 for c, w in weights.items() if c != overflow):
            raise PolicyError(
                "overflow",
                f"overflow to {overflow} needs another class with a weight above 0 (the local "
                "fleet whose SLA it protects)",
            )
        return cls(model, tuple(sorted(weights.items())), overflow)

    @property
    def total(self) -> int:
        return sum(w for _, w in self.weights)

    @property
    def local(self) -> frozenset[str]:
        """The classes whose SLA overflow protects: weighted, other than the overflow class."""
        return frozenset(c for c, w in self.weights if w > 0 and c != self.overflow)

    @property
    def local_share(self) -> float:
        """The share of the policy's requests the weights send to the local classes."""
        return sum(w for c, w in self.weights if c in self.local) / self.total

    def spec(self) -> str:
        """'local=90 upstream=10 overflow=upstream': the words `fleetctl traffic set` takes."""
        text = " ".join(f"{c}={w}" for c, w in self.weights)
        return f"{text} overflow={self.overflow}" if self.overflow else text


def parse_weights(words: list[str]) -> dict[str, int]:
    """['local=90', 'upstream=10'] -> {'local': 90, 'upstream': 10}; raises PolicyError."""
    out: dict[str, int] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not value.strip().isdigit():
            raise PolicyError(
                "weights", f"{word[:40]!r} is not CLASS=WEIGHT (a whole number), e.g. local=90"
            )
        if name in out:
            raise PolicyError("weights", f"class {name} is given twice")
        out[name] = int(value)
    return out


def parse_spec(text: str) -> tuple[str, dict[str, int], str]:
    """'MODEL: macs=90 upstream=10 overflow=upstream' -> (model, weights, overflow), as
    fleet-coordinator --traffic takes it; raises PolicyError."""
    model, sep, rest = text.rpartition(":")
    if not sep:
        raise PolicyError("model", f"{text[:80]!r} is not 'MODEL: CLASS=WEIGHT ...'")
    words = rest.replace(",", " ").split()
    overflow = [w.partition("=")[2] for w in words if w.startswith("overflow=")]
    weights = parse_weights([w for w in words if not w.startswith("overflow=")])
    return model.strip(), weights, overflow[-1] if overflow else ""


def model_key(model: str) -> str:
    """The policy key of a request's model (GenerateRequest.model): its id without @VERSION."""
    return model.partition("@")[0]


def policy_for(policies: Mapping[str, Policy], model: str) -> Optional[Policy]:
    """The model's own policy, else the '*' policy, else None (no class constraint)."""
    return policies.get(model_key(model)) or policies.get(ANY_MODEL)


class Chooser:
    """Smooth weighted round robin (nginx's) over a policy's weighted classes: over any run of
    `total` picks each class gets exactly its weight, spread out rather than in runs."""

    def __init__(self, policy: Policy):
        self._weights = [(c, w) for c, w in policy.weights if w > 0]
        self._current = {c: 0 for c, _ in self._weights}
        self._total = sum(w for _, w in self._weights)

    def next(self) -> str:
        for c, w in self._weights:
            self._current[c] += w
        best = max(self._weights, key=lambda cw: (self._current[cw[0]], cw[1], cw[0]))[0]
        self._current[best] -= self._total
        return best


def class_for_session(policy: Policy, session_key: str) -> str:
    """The class a session's requests go to: by hash, in proportion to the weights."""
    h = int.from_bytes(hashlib.blake2b(session_key.encode(), digest_size=8).digest(), "big")
    point = h % policy.total
    for c, w in policy.weights:
        if point < w:
            return c
        point -= w
    raise AssertionError("unreachable: the weights add up to total")


def fallback_order(policy: Policy, chosen: str, overflow_on: bool) -> tuple[str, ...]:
    """The classes to try, in order, when `chosen` has no node for a request: the other
    weighted classes by weight, then the overflow class while overflow is on."""
    order = [c for c, w in sorted(policy.weights, key=lambda cw: (-cw[1], cw[0])) if w > 0]
    order = [c for c in order if c != chosen]
    extra = policy.overflow
    if overflow_on and extra and extra != chosen and extra not in order:
        order.append(extra)
    return tuple(order)


# -- overflow ---------------------------------------------------------------------------------

HEADROOM, QUEUE = "headroom", "queue"
TICK_S = 0.25  # the overflow switches are evaluated this often, and on every new request
EVALUATE_EVERY_S = 0.05  # ... at most this often per policy


@dataclass(frozen=True)
class Pressure:
    """The local classes of one policy now, as the overflow controller sees them."""

    signal: str  # HEADROOM (a routable local node has a profile) or QUEUE
    sla_p95_s: float
    predicted_p95_s: float = math.nan  # HEADROOM: at the local classes' arrival rate
    arrival_rate_per_s: float = 0.0  # the policy's, over the overflow window
    local_rate_per_s: float = 0.0  # ... times the local classes' weighted share
    sla_rate_per_s: float = 0.0  # HEADROOM: the local rate at which the p95 reaches the SLA
    queue_wait_s: float = 0.0  # the oldest local request's wait in the admission queue now
    queue_limit_s: float = 1.0  # QUEUE: a wait past this breaks the SLA
    spare_slots: int = 0  # QUEUE: places free on routable local nodes now

    @property
    def breach(self) -> bool:
        if self.signal == HEADROOM:
            return self.predicted_p95_s > self.sla_p95_s  # nan (no node) is no breach
        return self.queue_wait_s > self.queue_limit_s

    @property
    def clear(self) -> bool:
        """Nothing calls for overflow now (not the same as `not breach`: hysteresis)."""
        if self.signal == HEADROOM:
            return not self.breach
        return self.queue_wait_s == 0.0 and self.spare_slots > 0

    @property
    def share(self) -> float:
        """HEADROOM: the share of local-bound requests beyond the SLA's rate; QUEUE: 0 (only
        requests that find every local node full spill)."""
        if self.signal != HEADROOM or not self.breach:
            return 0.0
        if self.local_rate_per_s <= 0 or self.sla_rate_per_s <= 0:
            return 1.0
        return max(0.0, min(1.0, 1.0 - self.sla_rate_per_s / self.local_rate_per_s))

    def describe(self) -> str:
        if self.signal == HEADROOM:
            p95 = (
                "overloaded"
                if math.isinf(self.predicted_p95_s)
                else f"{self.predicted_p95_s:.2f} s"
            )
            return (
                f"predicted p95 {p95} vs the {self.sla_p95_s:g} s SLA at "
                f"{self.local_rate_per_s * 60:.1f} local notes/min (SLA holds to "
                f"{self.sla_rate_per_s * 60:.1f})"
            )
        return (
            f"oldest local request waited {self.queue_wait_s:.2f} s (limit {self.queue_limit_s:g} s), "
            f"{self.spare_slots} local places free"
        )


def pressure_of(
    policy: Policy,
    *,
    sla_p95_s: float,
    rate_per_s: float,
    models: Sequence[NodeModel],
    mix: TokenMix,
    queue_wait_s: float,
    queue_limit_s: float,
    spare_slots: int,
) -> Pressure:
    """The policy's local classes now, from what the caller measured: the policy's arrival
    rate, the capacity models of its routable local nodes that have a profile, the token mix,
    the oldest local request's wait and the places free on local nodes. With any model, the
    live headroom's prediction at the local classes' share of the rate (HEADROOM); else the
    queue's wait (QUEUE). The coordinator and the capacity planner both call this."""
    local_rate = rate_per_s * policy.local_share
    if models:
        from cluster.capacity.headroom import headroom

        h = headroom(models, local_rate, mix, sla_p95_s)
        return Pressure(
            HEADROOM,
            sla_p95_s,
            predicted_p95_s=h.predicted_p95_s,
            arrival_rate_per_s=rate_per_s,
            local_rate_per_s=local_rate,
            sla_rate_per_s=h.sla_rate_per_s,
        )
    return Pressure(
        QUEUE,
        sla_p95_s,
        arrival_rate_per_s=rate_per_s,
        local_rate_per_s=local_rate,
        queue_wait_s=queue_wait_s,
        queue_limit_s=queue_limit_s,
        spare_slots=spare_slots,
    )


@dataclass(frozen=True)
class Overflow:
    """One policy's overflow switch: on at the first breach, off after `hold_s` of clear."""

    on: bool = False
    since: float = 0.0  # when it last turned on (controller clock)
    clear_since: Optional[float] = None  # while on: when the pressure last became clear
    episodes: int = 0
    reason: str = "no breach seen"


def step(state: Overflow, p: Pressure, now: float, *, hold_s: float) -> Overflow:
    """The switch after seeing `p` at `now`."""
    if not state.on:
        if p.breach:
            return Overflow(True, now, None, state.episodes + 1, f"on: {p.describe()}")
        return state
    if not p.clear:
        return replace(state, clear_since=None, reason=f"on: {p.describe()}")
    since = state.clear_since if state.clear_since is not None else now
    if now - since >= hold_s:
        return Overflow(False, state.since, None, state.episodes, f"off: {p.describe()}")
    return replace(
        state, clear_since=since, reason=f"on, clear for {now - since:.1f} s: {p.describe()}"
    )


class Spiller:
    """Sends `share` of a stream of decisions one way, deterministically (an accumulator)."""

    def __init__(self, start: float = 0.0) -> None:
        self._acc = start  # 1.0: the first decision with any share goes that way

    def take(self, share: float) -> bool:
        if share <= 0:
            self._acc = 0.0
            return False
        self._acc += share
        if self._acc >= 1.0:
            self._acc -= 1.0
            return True
        return False
