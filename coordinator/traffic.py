"""The coordinator's traffic policy (docs/traffic.md): which node class each new request
goes to, and the overflow switch per policy. The decisions are cluster/traffic.py's pure
functions; this keeps their state (policies, round-robin positions, arrival meters, the
switches and counters), evaluates the local classes' pressure, and reports. Admission
(coordinator/admission.py) asks `route` once per new request and `elsewhere` when the chosen
class has no room; everything runs on the event loop: no locks."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster.api import fleet_pb2
from cluster.capacity.headroom import ArrivalMeter, NodeModel, TokenMix, match_profile
from cluster.config import TrafficSection
from cluster.routing import Candidate, Want, pick, serving
from cluster.traffic import (
    EVALUATE_EVERY_S,
    HEADROOM,
    TICK_S,
    Chooser,
    Overflow,
    Policy,
    Pressure,
    Spiller,
    class_for_session,
    fallback_order,
    policy_for,
    pressure_of,
    step,
)

log = logging.getLogger(__name__)

SYNC_S = 2.0  # policies other coordinators set are read from the state database this often
SHARE_WINDOW_S = 60.0  # `fleetctl top` and the dashboard show each class's share over this


@dataclass(eq=False)
class _Run:
    """One policy's running state."""

    policy: Policy
    set_by: str
    set_at: float  # unix seconds
    meter: ArrivalMeter
    chooser: Chooser
    spiller: Spiller = field(default_factory=Spiller)
    overflow: Overflow = field(default_factory=Overflow)
    overflow_since_unix: float = 0.0
    pressure: Optional[Pressure] = None
    evaluated_at: float = -math.inf
    overflow_routed: int = 0
    fallbacks: int = 0


class TrafficControl:
    def __init__(
        self,
        *,
        settings: TrafficSection,
        sla_p95_s: float,
        profiles,
        fleet,
        events,
        waiting: Callable[[], Iterable[tuple[Want, float]]],
        on_overflow: Callable[[], None],
        mix: Callable[[], object],
        store=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._s = settings
        self.sla_p95_s = sla_p95_s
        self._profiles = profiles  # -> the coordinator's capacity profiles (--capacity-profile)
        self._fleet = fleet
        self._events = events
        self._waiting = waiting  # (want, enqueued at) of requests in the admission queue
        self._on_overflow = on_overflow  # overflow turned on: re-place the queue
        self._mix = mix  # the token mix of the notes that ended (the live headroom's)
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        self.policies: dict[str, Policy] = {}
        self.routed: Counter[str] = Counter()  # placements per node class
        self._recent: deque[tuple[float, str]] = deque()
        self._task: Optional[asyncio.Task] = None
        # coordinator/traffic_store.TrafficStore (may be set before start); None: memory only
        self.store = store
        self._synced: dict[str, float] = {}  # model -> set_at of the row installed from the store
        for model, rule in settings.traffic.items():
            self._install(Policy.parse(model, rule.weights, rule.overflow), "config")

    # -- policies ---------------------------------------------------------------------
    def _install(self, policy: Policy, who: str, set_at: Optional[float] = None) -> None:
        old = self._runs.get(policy.model)
        run = _Run(
            policy,
            who,
            set_at if set_at is not None else time.time(),
            meter=old.meter if old else ArrivalMeter(self._s.traffic_overflow_window_s),
            chooser=Chooser(policy),
        )
        if old is not None:  # the switch and its counters carry over a change of weights
            run.overflow, run.overflow_since_unix = old.overflow, old.overflow_since_unix
            run.overflow_routed, run.fallbacks = old.overflow_routed, old.fallbacks
            if not policy.overflow:
                run.overflow = replace(old.overflow, on=False, clear_since=None)
        self._runs[policy.model] = run
        self.policies[policy.model] = policy

    async def change(self, model: str, policy: Optional[Policy], who: str) -> None:
        """Set (or, `policy` None, clear) a model's policy: saved to the state database first
        (raises its error), then in effect here at the next request, and on the coordinators
        sharing the database within SYNC_S."""
        set_at = time.time()
        if self.store is not None:
            await asyncio.to_thread(self.store.save, model, policy, who, set_at)
            self._synced[model] = set_at
        if policy is None:
            self.clear(model, who)
        else:
            self.set(policy, who, set_at)

    def set(self, policy: Policy, who: str, set_at: Optional[float] = None, how: str = "") -> None:
        """Install (or replace) a model's policy now: the next request follows it."""
        self._install(policy, who, set_at)
        self._events.emit(
            fleet_pb2.EVENT_KIND_TRAFFIC,
            reason=f"traffic policy for {policy.model} set to {policy.spec()} by {who}{how}",
        )

    def clear(self, model: str, who: str, how: str = "") -> bool:
        """Remove a model's policy; False if it had none."""
        if self._runs.pop(model, None) is None:
            return False
        del self.policies[model]
        self._events.emit(
            fleet_pb2.EVENT_KIND_TRAFFIC,
            reason=f"traffic policy for {model} removed by {who}{how}",
        )
        self._on_overflow()  # requests waiting for a class of it may go anywhere now
        return True

    async def sync(self) -> None:
        """Take up the policies set through any coordinator sharing the state database (they
        override the config file's for their model; a cleared one is removed)."""
        if self.store is None:
            return
        for row in await asyncio.to_thread(self.store.load):
            if self._synced.get(row.model) == row.set_at:
                continue
            self._synced[row.model] = row.set_at
            how = " (from the state database)"
            if row.policy is not None:
                self.set(row.policy, row.set_by, row.set_at, how)
            else:
                self.clear(row.model, row.set_by, how)

    # -- routing (called by Admission) ---------------------------------------------------
    def route(self, want: Want) -> Want:
        """A new request (not a retry or resume): the class it should go to, as its Want."""
        policy = policy_for(self.policies, want.model)
        if policy is None:
            return want
        run = self._runs[policy.model]
        now = self._clock()
        run.meter.observe(time.time(), time.time(), completed=False)
        self._evaluate(run, now)
        if want.session_key:
            cls = class_for_session(policy, want.session_key)
        else:
            cls = run.chooser.next()
        p = run.pressure
        if run.overflow.on and cls in policy.local and p is not None and run.spiller.take(p.share):
            cls = policy.overflow
            run.overflow_routed += 1
        return replace(want, node_class=cls)

    def elsewhere(
        self, candidates: list[Candidate], want: Want, load_factor: float
    ) -> Optional[str]:
        """The chosen class has no room for the request: while overflow is on, a local-bound
        request goes to the overflow class rather than wait; a class with no node that could
        serve it at all falls back to the other classes (counted). None: wait for it."""
        policy = policy_for(self.policies, want.model)
        if policy is None:
            return pick(candidates, replace(want, node_class=""), load_factor=load_factor)
        run = self._runs[policy.model]
        if run.overflow.on and want.node_class in policy.local:
            node = pick(
                candidates, replace(want, node_class=policy.overflow), load_factor=load_factor
            )
            if node is not None:
                run.overflow_routed += 1
                return node
        if any(serving(c, want) for c in candidates):
            return None  # it has nodes for it, all busy: wait for one
        for cls in fallback_order(policy, want.node_class, run.overflow.on):
            node = pick(candidates, replace(want, node_class=cls), load_factor=load_factor)
            if node is not None:
                run.fallbacks += 1
                log.debug(
                    "model=%s class %s has no node for the request; placed in %s",
                    policy.model,
                    want.node_class,
                    cls,
                )
                return node
        return None

    def placed(self, node_class: str) -> None:
        """A request (or a retry or resume of one) was placed on a node of `node_class`."""
        now = self._clock()
        self.routed[node_class] += 1
        self._recent.append((now, node_class))
        self._prune(now)

    def _prune(self, now: float) -> None:
        cut = now - SHARE_WINDOW_S
        while self._recent and self._recent[0][0] < cut:
            self._recent.popleft()

    # -- the overflow switch -------------------------------------------------------------
    def _evaluate(self, run: _Run, now: float, *, force: bool = False) -> None:
        policy = run.policy
        if not policy.overflow:
            run.pressure = None
            return
        if not force and now - run.evaluated_at < EVALUATE_EVERY_S:
            return
        run.evaluated_at = now
        p = self.pressure(policy, run.meter)
        run.pressure = p
        was = run.overflow.on
        run.overflow = step(run.overflow, p, now, hold_s=self._s.traffic_overflow_hold_s)
        if run.overflow.on == was:
            return
        if run.overflow.on:
            run.overflow_since_unix = time.time()
            run.spiller = Spiller(start=1.0)  # the first local-bound request overflows at once
        self._events.emit(
            fleet_pb2.EVENT_KIND_TRAFFIC,
            reason=f"overflow for {policy.model} to {policy.overflow} {run.overflow.reason}",
        )
        if run.overflow.on:
            self._on_overflow()

    def pressure(self, policy: Policy, meter: ArrivalMeter) -> Pressure:
        """The policy's local classes now: the live headroom's prediction where a routable local
        node has a capacity profile, else the admission queue's wait."""
        local = [
            e
            for e in self._fleet.routable()
            if e.node_class in policy.local and (policy.model == "*" or e.model_id == policy.model)
        ]
        models = []
        for e in local:
            prof = match_profile(self._profiles(), e.node_id, e.model_id)
            if prof is not None:
                slots = e.status.capacity.max_running or prof.limits.max_running
                models.append(NodeModel(e.node_id, prof.fit, slots, prof.name, "coordinator"))
        waits = []
        if not models:
            loop_now = asyncio.get_running_loop().time()
            waits = [
                loop_now - since
                for want, since in self._waiting()
                if want.node_class in policy.local
                and policy_for(self.policies, want.model) is policy
            ]
        return pressure_of(
            policy,
            sla_p95_s=self.sla_p95_s,
            rate_per_s=meter.rate_per_s(),
            models=models,
            mix=self._mix() if models else TokenMix(),
            queue_wait_s=max(waits, default=0.0),
            queue_limit_s=self._s.traffic_overflow_queue_wait_s,
            spare_slots=sum(max(0, c.slots - c.in_flight) for c in (e.candidate() for e in local)),
        )

    async def run(self) -> None:
        """Evaluate every policy's switch each tick, so it also turns off with no requests;
        read the state database's policies every SYNC_S."""
        synced = self._clock()
        while True:
            await asyncio.sleep(TICK_S)  # a period, not synchronisation
            if self._clock() - synced >= SYNC_S:
                synced = self._clock()
                await self._sync_logged()
            for run in list(self._runs.values()):
                try:
                    self._evaluate(run, self._clock())
                except Exception:  # noqa: BLE001 - the loop must outlive a bug in one policy
                    log.exception(
                        "traffic policy for %s: overflow evaluation failed", run.policy.model
                    )

    async def _sync_logged(self) -> None:
        try:
            await self.sync()
        except Exception as exc:  # noqa: BLE001 - the database may be away; policies stay as they are
            log.warning(
                "traffic policies not read from the state database (%s: %s); keeping the ones in "
                "effect, retrying in %.0f s",
                type(exc).__name__,
                exc,
                SYNC_S,
            )

    async def start(self) -> None:
        """Take up the state database's policies, then run the switches."""
        await self._sync_logged()
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -- reports -------------------------------------------------------------------------
    def classes(self) -> list[fleet_pb2.TrafficClass]:
        """Every class known (in a policy, on a routable node, or routed to) and its traffic."""
        self._prune(self._clock())
        recent = Counter(c for _, c in self._recent)
        nodes = Counter(e.node_class for e in self._fleet.routable())
        names = set(recent) | set(nodes) | set(self.routed)
        for p in self.policies.values():
            names |= {c for c, _ in p.weights} | ({p.overflow} if p.overflow else set())
        total = sum(recent.values())
        return [
            fleet_pb2.TrafficClass(
                node_class=n,
                routed_total=self.routed[n],
                routed_recent=recent[n],
                share=recent[n] / total if total else 0.0,
                routable_nodes=nodes[n],
                window_s=SHARE_WINDOW_S,
            )
            for n in sorted(names)
        ]

    def to_proto(self) -> fleet_pb2.TrafficPolicies:
        out = fleet_pb2.TrafficPolicies(
            classes=self.classes(),
            sla_p95_s=self.sla_p95_s,
            overflow_window_s=self._s.traffic_overflow_window_s,
            overflow_hold_s=self._s.traffic_overflow_hold_s,
            overflow_queue_wait_s=self._s.traffic_overflow_queue_wait_s,
        )
        for model in sorted(self._runs):
            run = self._runs[model]
            self._evaluate(run, self._clock())
            p, o = run.pressure, run.overflow
            st = out.policies.add(
                policy=policy_proto(run.policy),
                set_by=run.set_by,
                set_unix_s=run.set_at,
                overflow_active=o.on,
                overflow_since_unix_s=run.overflow_since_unix,
                overflow_episodes=o.episodes,
                overflow_routed_total=run.overflow_routed,
                fallbacks_total=run.fallbacks,
                arrival_rate_per_s=run.meter.rate_per_s(),
            )
            if p is not None:
                st.overflow_signal = p.signal
                st.queue_wait_s = p.queue_wait_s
                st.overflow_share = p.share if o.on else 0.0
                st.sla_rate_per_s = p.sla_rate_per_s
                st.reason = o.reason if o.episodes else f"off: {p.describe()}"
                if p.signal == HEADROOM:
                    st.predicted_p95_s = p.predicted_p95_s
        return out

    def collector(self) -> Collector:
        return _Metrics(self)


def policy_proto(p: Policy) -> fleet_pb2.TrafficPolicy:
    return fleet_pb2.TrafficPolicy(model=p.model, weights=dict(p.weights), overflow=p.overflow)


class _Metrics(Collector):
    """The traffic policy's series (docs/traffic.md "Metrics"), read at scrape time."""

    def __init__(self, control: TrafficControl):
        self._c = control

    def describe(self):
        return ()

    def collect(self):
        c = self._c
        routed = CounterMetricFamily(
            "studiofleet_traffic_routed",
            "Requests (retries and resumes included) placed on a node of each traffic class.",
            labels=["node_class"],
        )
        for name, count in sorted(list(c.routed.items())):
            routed.add_metric([name], count)
        yield routed
        active = GaugeMetricFamily(
            "studiofleet_traffic_overflow_active",
            "1 while the model's policy sends overflow to its overflow class.",
            labels=["model", "overflow_class"],
        )
        spilled = CounterMetricFamily(
            "studiofleet_traffic_overflow_routed",
            "Requests sent to the overflow class because the local classes would miss the SLA.",
            labels=["model"],
        )
        episodes = CounterMetricFamily(
            "studiofleet_traffic_overflow_episodes",
            "Times overflow turned on.",
            labels=["model"],
        )
        fallbacks = CounterMetricFamily(
            "studiofleet_traffic_fallbacks",
            "Requests placed outside the class the policy chose: it had no node for them.",
            labels=["model"],
        )
        for model, run in sorted(list(c._runs.items())):
            if run.policy.overflow:
                active.add_metric([model, run.policy.overflow], 1.0 if run.overflow.on else 0.0)
            spilled.add_metric([model], run.overflow_routed)
            episodes.add_metric([model], run.overflow.episodes)
            fallbacks.add_metric([model], run.fallbacks)
        yield from (active, spilled, episodes, fallbacks)
