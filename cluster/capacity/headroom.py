"""Live headroom (issue 21 #5, docs/capacity.md "Live headroom"): the fleet's predicted p95
time per note at the arrival rate the coordinator measures now, and how much more traffic
it takes before that p95 passes the SLA.

The prediction is an analytic approximation derived from the planner's StepModel, not a
simulation: the coordinator evaluates it on every scrape in microseconds, on the event
loop, with no thread and no process (the coordinator must add next to nothing; a SimPy run
costs seconds of CPU). The planner (`fleetctl plan`, cluster.capacity.simulate) stays the
reference; tests/test_headroom.py checks the two agree.

The approximation, per node (rate l, its share of the fleet's rate by capacity):
- prefill of a note: pf = prefill_s(prompt - cached, cached); prefill takes a share
  r = l * pf of the node's time, and stretches every decode step around it by 1/(1 - r);
- a note shares its decode steps with the others running meanwhile, l * T of them on average
  (Poisson arrivals see time averages; Little's law), so T = (pf + L * step(1 + l * T)) / (1 - r),
  step(n) the fitted decode step with n running at mean context prompt + L/2: linear in T,
  solved in closed form, the others capped at max_running - 1;
- the fleet's slots are one pool (the coordinator queues and hands a request to the first
  node with a free slot): the wait is Erlang C over all slots, corrected for near-constant
  service times (Allen-Cunneen: (1 + cs^2) / 2 of M/M/c's wait);
- p95 = the slowest node's T at the 95th-percentile note length + the wait's 95th percentile.
"""

from __future__ import annotations

import bisect
import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cluster.api import fleet_pb2
from cluster.capacity.profile import Profile, StepModel

__all__ = [
    "ArrivalMeter",
    "FleetModel",
    "Headroom",
    "LiveHeadroom",
    "NodeModel",
    "RoutableNode",
    "TokenMix",
    "fleet_p95_s",
    "from_proto",
    "headroom",
    "match_profile",
    "sla_rate_per_s",
    "to_proto",
]

DEFAULT_SLA_P95_S = 8.0
DEFAULT_WINDOW_S = 300.0
MIN_NOTES_FOR_MIX = 20  # below this many completed notes in the window, the default mix
MIX_STEP = 5  # tokens: the measured mix is rounded to this


@dataclass(frozen=True)
class TokenMix:
    """The notes' token counts: means, 95th percentiles, and the cached prefix."""

    prompt_mean: float = 500.0
    prompt_p95: float = 500.0
    output_mean: float = 500.0
    output_p95: float = 590.0  # uniform 400:600 (the clinic's field report)
    cached_prefix: float = 0.0
    source: str = "default"  # "default" or "measured"

    @property
    def output_cv2(self) -> float:
        """Squared coefficient of variation of the output length (from the p95, as if normal)."""
        sd = max(0.0, self.output_p95 - self.output_mean) / 1.645
        return (sd / self.output_mean) ** 2 if self.output_mean > 0 else 0.0


@dataclass(frozen=True)
class NodeModel:
    """One routable node as the prediction sees it."""

    node_id: str
    fit: StepModel
    max_running: int
    profile: str = ""  # the profile's name
    source: str = ""  # "node" (its NodeStatus) or "coordinator" (--capacity-profile)


@dataclass(frozen=True)
class _NodeState:
    service_s: float  # mean time per note on the node at its rate
    service_p95_s: float  # ... for a 95th-percentile note
    busy: float  # mean running sequences
    stable: bool


def _node_state(node: NodeModel, rate: float, mix: TokenMix) -> _NodeState:
    fit, c = node.fit, max(1, node.max_running)
    cached = min(mix.cached_prefix, mix.prompt_mean)
    pf = fit.prefill_s(mix.prompt_mean - cached, cached)
    pf95 = fit.prefill_s(max(0.0, mix.prompt_p95 - cached), cached)
    share = rate * pf
    if share >= 1.0:
        return _NodeState(math.inf, math.inf, c, False)
    stretch = 1.0 / (1.0 - share)
    ctx = mix.prompt_mean + mix.output_mean / 2.0
    per_seq = (
        fit.decode_per_seq_s + fit.decode_per_ctx_token_s * ctx
    )  # what each running sequence adds
    alone = fit.decode_base_s + fit.decode_per_ctx_token_s * ctx  # the step with one sequence
    # A note shares its steps with the others running meanwhile: on average l * T of them
    # (Poisson arrivals see time averages), capped by the other slots.
    denom = 1.0 - stretch * mix.output_mean * per_seq * rate
    service = stretch * (pf + mix.output_mean * alone) / denom if denom > 0 else math.inf
    others = min(rate * service, float(c - 1))
    step = alone + per_seq * others
    service = stretch * (pf + mix.output_mean * step)
    service95 = stretch * (pf95 + mix.output_p95 * step)
    return _NodeState(service, service95, rate * service, rate * service < c)


def _erlang_c(servers: int, load: float) -> float:
    """P(wait) in M/M/c with `servers` and offered load `load` (< servers)."""
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1.0 - b))


def _capacity_rate(node: NodeModel, mix: TokenMix) -> float:
    """The rate a node takes with every slot full (its share of the fleet's rate)."""
    lo, hi = 0.0, 1.0
    while _node_state(node, hi, mix).stable and hi < 1e9:
        lo, hi = hi, hi * 2.0
    for _ in range(40):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if _node_state(node, mid, mix).stable else (lo, mid)
    return lo


@dataclass(frozen=True)
class FleetModel:
    """The routable, profiled nodes and their capacity shares at a token mix."""

    nodes: tuple[NodeModel, ...]
    mix: TokenMix
    capacities: tuple[float, ...]

    @classmethod
    def of(cls, nodes: Sequence[NodeModel], mix: TokenMix) -> FleetModel:
        caps: dict[tuple, float] = {}  # nodes of one profile and size share one computation
        for n in nodes:
            key = (n.fit, n.max_running)
            if key not in caps:
                caps[key] = _capacity_rate(n, mix)
        return cls(tuple(nodes), mix, tuple(caps[(n.fit, n.max_running)] for n in nodes))

    @property
    def capacity_per_s(self) -> float:
        return sum(self.capacities)


def fleet_p95_s(model: FleetModel, rate: float) -> float:
    """Predicted p95 time per note (seconds) at fleet arrival rate `rate` (notes/s); inf when
    the fleet cannot keep up, nan without nodes."""
    if not model.nodes:
        return math.nan
    total = model.capacity_per_s
    if rate >= total:
        return math.inf
    states = [
        _node_state(n, rate * cap / total, model.mix)
        for n, cap in zip(model.nodes, model.capacities, strict=True)
    ]
    if not all(s.stable for s in states):
        return math.inf
    slowest = max(s.service_p95_s for s in states)
    if rate <= 0:
        return slowest
    servers = sum(max(1, n.max_running) for n in model.nodes)
    load = sum(s.busy for s in states)
    if load >= servers:
        return math.inf
    p_wait = _erlang_c(servers, load)
    if p_wait <= 0.05:
        return slowest
    drain = (servers - load) * rate / load  # (c * mu - lambda), mu = rate / load per slot
    cs2 = model.mix.output_cv2
    return slowest + math.log(p_wait / 0.05) / drain * (1.0 + cs2) / 2.0


def sla_rate_per_s(model: FleetModel, sla_p95_s: float) -> float:
    """The highest arrival rate (notes/s) whose predicted p95 stays within the SLA; 0 when
    even a lone note misses it."""
    if not model.nodes or fleet_p95_s(model, 0.0) > sla_p95_s:
        return 0.0
    lo, hi = 0.0, model.capacity_per_s
    for _ in range(30):  # 1e-9 of the capacity
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if fleet_p95_s(model, mid) <= sla_p95_s else (lo, mid)
    return lo


@dataclass(frozen=True)
class Headroom:
    """What the coordinator exports: the rate now, the predicted p95 at it, and the room left."""

    known: bool  # at least one routable node has a profile
    arrival_rate_per_s: float
    predicted_p95_s: float  # inf: the fleet cannot keep up with this rate
    sla_p95_s: float
    sla_rate_per_s: float  # the rate at which the predicted p95 reaches the SLA
    capacity_per_s: float  # the rate that fills every slot
    profiled_nodes: int
    unprofiled_nodes: int
    mix: TokenMix = field(default_factory=TokenMix)
    window_s: float = DEFAULT_WINDOW_S

    @property
    def headroom_per_s(self) -> float:
        """Notes/s more the fleet takes before the SLA breaks (negative: past it)."""
        return self.sla_rate_per_s - self.arrival_rate_per_s

    @property
    def headroom_ratio(self) -> float:
        """The share of the SLA rate still free: 1 idle, 0 at the SLA, negative past it."""
        return (
            1.0 - self.arrival_rate_per_s / self.sla_rate_per_s
            if self.sla_rate_per_s > 0
            else -math.inf
        )

    @property
    def sla_met(self) -> bool:
        return self.known and self.predicted_p95_s <= self.sla_p95_s

    def line(self) -> str:
        """One line for `fleetctl top` and logs."""
        if not self.known:
            return "capacity: no routable node has a capacity profile (fleet-node/fleet-coordinator --capacity-profile)"
        p95 = "overloaded" if math.isinf(self.predicted_p95_s) else f"{self.predicted_p95_s:.1f} s"
        verdict = "within" if self.sla_met else "OVER"
        text = (
            f"capacity: {self.arrival_rate_per_s * 60:.1f} notes/min now, predicted p95 {p95} "
            f"({verdict} the {self.sla_p95_s:g} s SLA); SLA holds to {self.sla_rate_per_s * 60:.1f} notes/min, "
            f"headroom {self.headroom_per_s * 60:+.1f} notes/min"
        )
        if self.unprofiled_nodes:
            text += f"; {self.unprofiled_nodes} routable node(s) without a profile left out"
        return text


def to_proto(h: Headroom) -> fleet_pb2.Headroom:
    """Traffic.headroom, as GetTraffic answers it."""
    if not h.known:
        return fleet_pb2.Headroom(
            known=False,
            arrival_rate_per_s=h.arrival_rate_per_s,
            sla_p95_s=h.sla_p95_s,
            unprofiled_nodes=h.unprofiled_nodes,
            window_s=h.window_s,
            mix=h.mix.source,
        )
    return fleet_pb2.Headroom(
        known=True,
        arrival_rate_per_s=h.arrival_rate_per_s,
        predicted_p95_s=h.predicted_p95_s,
        sla_p95_s=h.sla_p95_s,
        sla_rate_per_s=h.sla_rate_per_s,
        capacity_per_s=h.capacity_per_s,
        profiled_nodes=h.profiled_nodes,
        unprofiled_nodes=h.unprofiled_nodes,
        window_s=h.window_s,
        mix=h.mix.source,
    )


def from_proto(msg: fleet_pb2.Headroom) -> Headroom:
    return Headroom(
        msg.known,
        msg.arrival_rate_per_s,
        msg.predicted_p95_s if msg.known else math.nan,
        msg.sla_p95_s,
        msg.sla_rate_per_s,
        msg.capacity_per_s,
        msg.profiled_nodes,
        msg.unprofiled_nodes,
        TokenMix(source=msg.mix or "default"),
        msg.window_s,
    )


@functools.lru_cache(maxsize=16)
def _fleet(
    nodes: tuple[NodeModel, ...], mix: TokenMix, sla_p95_s: float
) -> tuple[FleetModel, float]:
    """The fleet model and its SLA rate: they change only with the fleet or the token mix, so
    a scrape at a steady fleet costs one evaluation of the closed form."""
    model = FleetModel.of(nodes, mix)
    return model, sla_rate_per_s(model, sla_p95_s)


def headroom(
    nodes: Sequence[NodeModel],
    rate: float,
    mix: TokenMix,
    sla_p95_s: float,
    *,
    unprofiled: int = 0,
    window_s: float = DEFAULT_WINDOW_S,
) -> Headroom:
    if not nodes:
        return Headroom(False, rate, math.nan, sla_p95_s, 0.0, 0.0, 0, unprofiled, mix, window_s)
    model, sla_rate = _fleet(tuple(nodes), mix, sla_p95_s)
    return Headroom(
        True,
        rate,
        fleet_p95_s(model, rate),
        sla_p95_s,
        sla_rate,
        model.capacity_per_s,
        len(nodes),
        unprofiled,
        mix,
        window_s,
    )


class ArrivalMeter:
    """The arrival rate over a sliding window, and the token mix of the notes that completed
    in it. Fed with each ended request (thread-safe: the request log's sink runs on the loop,
    scrapes read from the metrics thread)."""

    def __init__(
        self, window_s: float = DEFAULT_WINDOW_S, *, clock: Callable[[], float] = time.time
    ):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, not {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._since = clock()
        self._arrivals: deque[float] = deque()
        self._notes: deque[tuple[float, int, int]] = deque()  # (ended_at, prompt, completion)
        self._lock = threading.Lock()

    def observe(
        self,
        started_at: float,
        ended_at: float,
        *,
        completed: bool,
        counted: bool = True,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """One ended request: `counted` False for the caller's own refusals (not load)."""
        with self._lock:
            if counted:
                bisect.insort(self._arrivals, started_at)
            if completed and completion_tokens > 0:
                self._notes.append((ended_at, prompt_tokens, completion_tokens))
            self._prune(self._clock())

    def _prune(self, now: float) -> None:
        cut = now - self.window_s
        while self._arrivals and self._arrivals[0] < cut:
            self._arrivals.popleft()
        while self._notes and self._notes[0][0] < cut:
            self._notes.popleft()

    def rate_per_s(self) -> float:
        """Arrivals per second over the window (or over the time since the meter started,
        when that is shorter)."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            count = len(self._arrivals)
        return count / max(1.0, min(self.window_s, now - self._since))

    def mix(self, default: TokenMix = TokenMix()) -> TokenMix:
        """The token mix of the window's completed notes; `default` with too few of them."""
        with self._lock:
            self._prune(self._clock())
            notes = list(self._notes)
        if len(notes) < MIN_NOTES_FOR_MIX:
            return default
        prompts = sorted(p for _, p, _ in notes)
        outputs = sorted(c for _, _, c in notes)
        q = lambda xs: xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]  # noqa: E731
        step = lambda v: MIX_STEP * round(v / MIX_STEP)  # noqa: E731 - a steady mix is one cache entry
        return TokenMix(
            prompt_mean=step(sum(prompts) / len(prompts)),
            prompt_p95=step(q(prompts)),
            output_mean=step(sum(outputs) / len(outputs)),
            output_p95=step(q(outputs)),
            cached_prefix=default.cached_prefix,
            source="measured",
        )


def match_profile(profiles: Sequence[Profile], node_id: str, model_id: str) -> Profile | None:
    """The profile for a node: the one measured on it ([node] node_id), else one for the
    model it serves ([model] id), else None. The first given wins a tie."""
    for p in profiles:
        if p.node.node_id and p.node.node_id == node_id:
            return p
    for p in profiles:
        if p.model.id == model_id:
            return p
    return None


@dataclass(frozen=True)
class RoutableNode:
    """What the live prediction needs of a routable node (the coordinator's fleet view)."""

    node_id: str
    model_id: str
    max_running: int = 0  # its slots as it reports them; 0: the profile's


class LiveHeadroom:
    """The coordinator's live headroom: profiles given to it (fleet-coordinator
    --capacity-profile), the arrival rate and token mix from ended requests (`observe`, a
    Monitor sink), the routable nodes read when asked (`nodes`). `snapshot()` is cheap (one
    evaluation of the closed form once the fleet and mix are cached) and may be cached for
    `cache_s` (0: computed on every call)."""

    def __init__(
        self,
        profiles: Sequence[Profile],
        *,
        nodes: Callable[[], Iterable[RoutableNode]],
        sla_p95_s: float = DEFAULT_SLA_P95_S,
        window_s: float = DEFAULT_WINDOW_S,
        default_mix: TokenMix = TokenMix(),
        clock: Callable[[], float] = time.time,
        cache_s: float = 0.0,
    ):
        if not (sla_p95_s > 0 and math.isfinite(sla_p95_s)):
            raise ValueError(f"sla_p95_s must be a number of seconds > 0, not {sla_p95_s}")
        self.profiles = tuple(profiles)
        self.sla_p95_s = sla_p95_s
        self.meter = ArrivalMeter(window_s, clock=clock)
        self._nodes = nodes
        self._default_mix = default_mix
        self._clock = clock
        self._cache_s = cache_s
        self._cached: tuple[float, Headroom] | None = None
        self._lock = threading.Lock()

    def observe(self, summary) -> None:
        """A RequestSummary-like ended request (started_at, ended_at, outcome, tokens)."""
        outcome = str(summary.outcome)
        self.meter.observe(
            summary.started_at,
            summary.ended_at,
            completed=outcome == "completed",
            counted=outcome not in REFUSALS,
            prompt_tokens=summary.prompt_tokens,
            completion_tokens=summary.completion_tokens,
        )

    def models(self) -> tuple[list[NodeModel], int]:
        """The routable nodes with a profile, and how many routable nodes have none."""
        have, missing = [], 0
        for node in self._nodes():
            p = match_profile(self.profiles, node.node_id, node.model_id)
            if p is None:
                missing += 1
                continue
            have.append(
                NodeModel(
                    node.node_id,
                    p.fit,
                    node.max_running or p.limits.max_running,
                    p.name,
                    "coordinator",
                )
            )
        return have, missing

    def snapshot(self) -> Headroom:
        now = self._clock()
        with self._lock:
            if (
                self._cache_s > 0
                and self._cached is not None
                and now - self._cached[0] < self._cache_s
            ):
                return self._cached[1]
        have, missing = self.models()
        result = headroom(
            have,
            self.meter.rate_per_s(),
            self.meter.mix(self._default_mix),
            self.sla_p95_s,
            unprofiled=missing,
            window_s=self.meter.window_s,
        )
        with self._lock:
            self._cached = (now, result)
        return result


REFUSALS = ("rejected", "refused", "denied")  # the caller's own refusals: not load on the fleet
