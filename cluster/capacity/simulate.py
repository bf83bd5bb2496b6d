"""The fleet simulator behind `fleetctl plan` (docs/capacity.md "How the planner models a fleet").

A discrete-event model on SimPy: notes arrive (a list of `Request`s, e.g. a thinned Poisson
day from `Workload.requests`), the coordinator places each one with the router's own
`pick` (cluster.routing, the function the coordinator calls: least outstanding work per
slot) or queues it FIFO (bounded depth and wait, as coordinator.admission does), and each
node batches continuously as mlx-lm's BatchGenerator does: a step prefills the next chunk
(`prefill_chunk` tokens) of every prompt in the prompt batch (up to `prefill_batch` prompts,
in free slots) and decodes one token for every running sequence, the prompts whose prefill
it finishes included; the profile's StepModel gives the step's time, its context term taken
as the running count times the longest context on MLX (mlx-lm left-pads its batch cache) and
as the sum on vLLM (paged). Between admissions and
completions a node's batch does not change, so the simulator
runs those steps as one event (interrupted at the next step boundary when a note arrives
for a free slot), which keeps a busy day to a few events per note.

Nodes that share one host (`NodeSpec.host`: a test rig of several agents on one machine; a
Mac or a GPU runs one node) share its compute: a step that starts while k nodes of the host
are busy takes max(1, k / P) times its profiled time, P being how many nodes the host runs
at full speed at once (`host_parallelism`, measured: 1 when one node alone keeps the whole
host busy). When a node of the host starts or stops being busy, the others re-plan at their
next step boundary.

With a traffic policy (cluster.traffic.Policy, docs/traffic.md) each note is given a node
class as the coordinator gives it: the policy's own Chooser (smooth weighted round robin),
then the router's `pick` among that class's nodes; a class with no node at all falls back in
`fallback_order`; a class whose nodes are busy keeps the note waiting, while notes for other
classes go ahead of it. A policy with an overflow class runs the coordinator's overflow switch
on the simulated clock (`pressure_of`, `step`, `Spiller`; evaluated every TICK_S and on each
arrival): with the HEADROOM signal the live headroom's prediction over the local nodes'
profiles at the arrival rate measured over the overflow window, with QUEUE the oldest local
note's wait. While it is on, the excess share goes to the overflow class and a local-bound
note that finds every local node full goes there instead of waiting.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import simpy

from cluster.capacity.headroom import DEFAULT_WINDOW_S, ArrivalMeter, NodeModel, TokenMix
from cluster.capacity.profile import Profile
from cluster.capacity.workload import Request
from cluster.config import CoordinatorSettings, NodeSettings
from cluster.metrics import percentile
from cluster.routing import Candidate, Want, pick, serving
from cluster.traffic import (
    EVALUATE_EVERY_S,
    HEADROOM,
    QUEUE,
    TICK_S,
    Chooser,
    Overflow,
    Policy,
    Spiller,
    class_of,
    fallback_order,
    pressure_of,
    step,
)

_ANY = Want()
_EPS = 1e-9


def _default(settings, name: str):
    return settings.model_fields[name].default


# The daemons' own defaults, read from their settings (not copied).
NODE_MAX_QUEUED = _default(NodeSettings, "max_queued")
PREFILL_BATCH = _default(NodeSettings, "prefill_batch_size")
PREFILL_STEP = _default(NodeSettings, "prefill_step_size")
QUEUE_MAX_DEPTH = _default(CoordinatorSettings, "queue_max_depth")
QUEUE_MAX_WAIT_S = _default(CoordinatorSettings, "queue_max_wait_s")
LOAD_FACTOR = _default(CoordinatorSettings, "affinity_load_factor")
SLA_P95_S = _default(CoordinatorSettings, "sla_p95_s")
OVERFLOW_WINDOW_S = _default(CoordinatorSettings, "traffic_overflow_window_s")
OVERFLOW_HOLD_S = _default(CoordinatorSettings, "traffic_overflow_hold_s")
OVERFLOW_QUEUE_WAIT_S = _default(CoordinatorSettings, "traffic_overflow_queue_wait_s")


@dataclass(frozen=True)
class NodeSpec:
    """One routing target (a node or a node group) running `profile`."""

    profile: Profile
    node_id: str
    max_queued: int = NODE_MAX_QUEUED  # the node's own queue beyond its running slots
    prefill_batch: int = PREFILL_BATCH  # prompts prefilled together (the prompt batch)
    prefill_chunk: int = PREFILL_STEP  # prompt tokens of each prompt prefilled in one step
    host: str = ""  # nodes with the same host share its compute ("" = a host of its own)
    host_parallelism: float = 1.0  # nodes that host runs at full speed at once
    node_class: str = ""  # its traffic class ("" = by engine: upstream or local; class_of)

    @property
    def traffic_class(self) -> str:
        return class_of(self.node_class, self.profile.node.engine)


@dataclass(frozen=True)
class CoordinatorLimits:
    queue_max_depth: float = QUEUE_MAX_DEPTH
    queue_max_wait_s: float = QUEUE_MAX_WAIT_S
    load_factor: float = LOAD_FACTOR


@dataclass(frozen=True)
class OverflowSettings:
    """The coordinator's overflow settings (docs/traffic.md) and which signal it would use:
    HEADROOM when it runs with --capacity-profile for the local nodes, else QUEUE."""

    sla_p95_s: float = SLA_P95_S
    window_s: float = OVERFLOW_WINDOW_S
    hold_s: float = OVERFLOW_HOLD_S
    queue_wait_s: float = OVERFLOW_QUEUE_WAIT_S
    signal: str = HEADROOM

    def __post_init__(self):
        if self.signal not in (HEADROOM, QUEUE):
            raise ValueError(f"signal must be {HEADROOM} or {QUEUE}, not {self.signal!r}")


def fleet_of(
    counts: Sequence[tuple[Profile, int]],
    nodes_per_host: int = 1,
    host_parallelism: float = 1.0,
    **node_kw,
) -> list[NodeSpec]:
    """NodeSpecs for (profile, count) pairs, named profile-name/1, /2, ...; with
    `nodes_per_host` > 1, consecutive nodes share hosts of that many nodes each, each host
    running `host_parallelism` of them at full speed at once."""
    if nodes_per_host < 1:
        raise ValueError(f"nodes per host must be >= 1, not {nodes_per_host}")
    if not host_parallelism > 0:
        raise ValueError(f"host parallelism must be > 0, not {host_parallelism}")
    specs: list[NodeSpec] = []
    for p, n in counts:
        for i in range(n):
            host = f"host-{len(specs) // nodes_per_host + 1}" if nodes_per_host > 1 else ""
            specs.append(
                NodeSpec(
                    p, f"{p.name}/{i + 1}", host=host, host_parallelism=host_parallelism, **node_kw
                )
            )
    return specs


class _Host:
    """The nodes of one host and which of them are busy (have sequences to step)."""

    def __init__(self, parallelism: float):
        self.parallelism = parallelism
        self.nodes: list[_Node] = []
        self.busy: set[int] = set()

    def set_busy(self, node: _Node, busy: bool) -> None:
        if (node.index in self.busy) == busy:
            return
        (self.busy.add if busy else self.busy.discard)(node.index)
        for other in self.nodes:  # their step times change: re-plan at the next step boundary
            if other is not node and other.index in self.busy:
                other.nudge()


class _Seq:
    __slots__ = (
        "req",
        "measured",
        "remaining",
        "ctx",
        "node",
        "placed_at",
        "admitted_at",
        "first_at",
        "done_at",
        "refused",
        "prefill_left",
        "want",
    )

    def __init__(self, req: Request, measured: bool):
        self.req = req
        self.measured = measured
        self.remaining = req.output_tokens
        self.ctx = 0
        self.node: int | None = None
        self.placed_at = self.admitted_at = self.first_at = self.done_at = math.nan
        self.refused = ""
        self.prefill_left = 0
        self.want = _ANY  # the node class the traffic policy chose (_ANY without one)


class _Node:
    def __init__(
        self,
        env: simpy.Environment,
        index: int,
        spec: NodeSpec,
        window: tuple[float, float],
        on_done: Callable[[_Node, _Seq], None],
        host: _Host | None = None,
    ):
        self.env, self.index, self.spec, self.host = env, index, spec, host
        self.fit = spec.profile.fit
        # mlx-lm's batch KV cache is left-padded: every running sequence attends over the
        # batch's longest context, so a step costs as n x the longest, not the sum (the
        # profile measures equal contexts, where the two agree). vLLM pages: the sum.
        self.padded = spec.profile.node.engine == "mlx"
        self.max_running = spec.profile.limits.max_running
        self.slots = self.max_running + spec.max_queued
        self.queue: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.prefilling: list[
            _Seq
        ] = []  # the prompt batch: admitted, prompts not yet fully prefilled
        self.in_flight = 0  # the coordinator's requests placed here, not yet finished
        self.outstanding = 0  # tokens they may still generate (as of the last applied step)
        self.routed_total = 0
        self.wake: simpy.Event | None = None
        self._macro: tuple[float, int, float, float, float] | None = (
            None  # a run of steps: (t0, n, a, b, lead)
        )
        self._window = window
        self._on_done = on_done
        self.busy_s = 0.0  # inside the window
        self.seq_s = 0.0  # running sequences x seconds, inside the window
        self.steps = 0
        env.process(self._run())

    def candidate(self) -> Candidate:
        return Candidate(
            self.spec.node_id,
            "",
            self.in_flight,
            self._outstanding_now(),
            len(self.queue),
            self.max_running,
            self.slots,
            self.routed_total,
            node_class=self.spec.traffic_class,
        )

    def enqueue(self, seq: _Seq) -> None:
        self.queue.append(seq)
        self.nudge()

    def nudge(self) -> None:
        """Something changed (an arrival, a co-located node's load): wake the node, which
        re-plans at its next step boundary."""
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def _scale(self) -> float:
        """How many times longer than profiled a step starting now takes: the busy nodes
        sharing this node's host (itself included) over how many it runs at full speed."""
        if self.host is None:
            return 1.0
        return max(1.0, len(self.host.busy) / self.host.parallelism)

    def _steps(self, lead: float, k: int, a: float, b: float, interruptible: bool):
        """Run a first step of `lead` seconds (0: none) and then k steps (the j-th taking
        a + b*j) as one event; woken (interruptible), stop at the next step boundary instead.
        Returns how many steps ran, the lead counted."""
        env, t0 = self.env, self.env.now
        total = lead + _span(k, a, b)
        if not interruptible:
            yield env.timeout(total)
            return k + (1 if lead else 0)
        self.wake = env.event()
        yield env.timeout(total) | self.wake
        self.wake = None
        elapsed = env.now - t0
        if elapsed >= total - _EPS:
            return k + (1 if lead else 0)
        if lead and elapsed < lead - _EPS:
            steps, end = 1, t0 + lead
        else:
            m = min(k, _steps_within(elapsed - lead, a, b) + 1)
            steps, end = m + (1 if lead else 0), t0 + lead + _span(m, a, b)
        if end > env.now + _EPS:
            yield env.timeout(end - env.now)
        return steps

    def _outstanding_now(self) -> int:
        if self._macro is None:
            return self.outstanding
        t0, n, a, b, lead = self._macro
        elapsed = self.env.now - t0
        if lead:
            if elapsed < lead - _EPS:
                return self.outstanding
            return self.outstanding - n * (1 + _steps_within(elapsed - lead, a, b))
        return self.outstanding - n * _steps_within(elapsed, a, b)

    def _account(self, t0: float, t1: float, n: int) -> None:
        lo, hi = max(t0, self._window[0]), min(t1, self._window[1])
        if hi > lo:
            self.busy_s += hi - lo
            self.seq_s += n * (hi - lo)

    def _advance(self, steps: int) -> None:
        """Every running sequence gained `steps` tokens; the ones done leave."""
        now = self.env.now
        self.outstanding -= steps * len(self.running)
        self.steps += steps
        done = []
        for s in self.running:
            s.ctx += steps
            s.remaining -= steps
            if s.first_at != s.first_at:  # NaN: this step gave its first token
                s.first_at = now
            if s.remaining <= 0:
                done.append(s)
        if done:
            self.running = [s for s in self.running if s.remaining > 0]
            for s in done:
                s.done_at = now
                self._on_done(self, s)

    def _run(self):
        env, fit, chunk = self.env, self.fit, self.spec.prefill_chunk
        shared = self.host is not None and len(self.host.nodes) > 1
        while True:
            while not self.running and not self.prefilling and not self.queue:
                if self.host is not None:
                    self.host.set_busy(self, False)
                self.wake = env.event()
                yield self.wake
                self.wake = None
            if self.host is not None:
                self.host.set_busy(self, True)
            scale = self._scale()
            # Admit waiting prompts into the prompt batch while slots are free.
            while (
                self.queue
                and len(self.prefilling) < self.spec.prefill_batch
                and len(self.prefilling) + len(self.running) < self.max_running
            ):
                s = self.queue.popleft()
                s.admitted_at = env.now
                s.prefill_left = s.req.prompt_tokens - s.req.cached_tokens
                self.prefilling.append(s)
            free = self.max_running - len(self.running) - len(self.prefilling)
            if self.prefilling:
                # A step with prefill: the next chunk of every prompt in the prompt batch, and one
                # decode token for every running sequence and for the prompts this step finishes.
                prefill, joining = 0.0, []
                for s in self.prefilling:
                    part = min(chunk, s.prefill_left)
                    if (
                        s.prefill_left == s.req.prompt_tokens - s.req.cached_tokens
                    ):  # its first chunk
                        prefill += fit.prefill_s(0, s.req.cached_tokens)
                    prefill += fit.prefill_per_token_s * part
                    s.prefill_left -= part
                    if s.prefill_left == 0:
                        joining.append(s)
                if joining:
                    self.prefilling = [s for s in self.prefilling if s.prefill_left > 0]
                    for s in joining:
                        s.ctx = s.req.prompt_tokens
                    self.running.extend(joining)
                n = len(self.running)
                ctx = self._context()
                lead = scale * (prefill + fit.decode_step_s(n, ctx))
                t0 = env.now
                if self.prefilling or n < self.max_running:
                    yield env.timeout(lead)
                    self._account(t0, env.now, n)
                    self._advance(1)
                    continue
                # A full batch cannot change before its next completion: run this step and the
                # decode steps after it as one event (re-planned early only when the host's
                # load changes).
                k = min(s.remaining for s in self.running) - 1
                a = scale * fit.decode_step_s(n, ctx + n)
                b = scale * fit.decode_per_ctx_token_s * n
                self._macro = (t0, n, a, b, lead)
                steps = yield from self._steps(lead, k, a, b, interruptible=shared)
                self._macro = None
                first = t0 + lead
                for s in self.running:
                    if s.first_at != s.first_at:
                        s.first_at = first
                self._account(t0, env.now, n)
                self._advance(steps)
                continue
            # Decode steps with an unchanged batch until the next sequence finishes: step j takes
            # a + b*j; an arrival for a free slot (or a change in the host's load) cuts it short.
            n = len(self.running)
            k = min(s.remaining for s in self.running)
            a = scale * fit.decode_step_s(n, self._context())
            b = scale * fit.decode_per_ctx_token_s * n
            t0 = env.now
            self._macro = (t0, n, a, b, 0.0)
            steps = yield from self._steps(0.0, k, a, b, interruptible=free > 0 or shared)
            self._macro = None
            self._account(t0, env.now, n)
            self._advance(steps)

    def _context(self) -> float:
        """The context a decode step of the running batch attends over (see `padded`)."""
        if not self.running:
            return 0.0
        if self.padded:
            return len(self.running) * max(s.ctx for s in self.running)
        return float(sum(s.ctx for s in self.running))


def _span(m: int, a: float, b: float) -> float:
    """Seconds for m steps whose j-th (from 0) takes a + b*j."""
    return m * a + b * m * (m - 1) / 2.0


def _steps_within(dt: float, a: float, b: float) -> int:
    """How many whole steps (j-th taking a + b*j) end within dt seconds."""
    if dt <= 0:
        return 0
    if b <= 0:
        m = int(dt / a + _EPS)
    else:
        c = a - b / 2.0  # m steps take (b/2) m^2 + c m
        m = int((math.sqrt(c * c + 2.0 * b * dt) - c) / b)
    while _span(m + 1, a, b) <= dt + _EPS:
        m += 1
    while m > 0 and _span(m, a, b) > dt + _EPS:
        m -= 1
    return m


class _Coordinator:
    """coordinator.admission's policy: place now if nobody waits and a node has room (router.pick),
    else wait FIFO up to `queue_max_depth` deep and `queue_max_wait_s` long."""

    def __init__(
        self,
        env: simpy.Environment,
        limits: CoordinatorLimits,
        traffic: Policy | None = None,
        overflow: OverflowSettings = OverflowSettings(),
    ):
        self.env, self.limits, self.traffic, self.cfg = env, limits, traffic, overflow
        self.chooser = Chooser(traffic) if traffic is not None else None
        self.nodes: list[_Node] = []
        self.by_id: dict[str, _Node] = {}
        self.waiting: deque[_Seq] = deque()
        self.max_waiting = 0
        self.fallbacks = 0
        # The overflow switch, as coordinator.traffic runs it (only with an overflow class).
        self.spills = traffic is not None and bool(traffic.overflow)
        self.switch, self.spiller, self.pressure = Overflow(), Spiller(), None
        self.evaluated_at = -math.inf
        self.overflow_routed = 0  # measured notes only
        self.overflow_episodes = 0  # ... that began inside the window
        self.window = (-math.inf, math.inf)
        clock = lambda: env.now  # noqa: E731
        self.meter = ArrivalMeter(overflow.window_s, clock=clock)  # the policy's arrivals
        self.mixer = ArrivalMeter(DEFAULT_WINDOW_S, clock=clock)  # the live headroom's token mix

    def evaluate(self, *, force: bool = False) -> None:
        """The overflow switch after looking at the local classes now (coordinator.traffic's
        _evaluate over the simulated fleet)."""
        now, policy, cfg = self.env.now, self.traffic, self.cfg
        if not force and now - self.evaluated_at < EVALUATE_EVERY_S:
            return
        self.evaluated_at = now
        local = [n for n in self.nodes if n.spec.traffic_class in policy.local]
        models = (
            [NodeModel(n.spec.node_id, n.fit, n.max_running, n.spec.profile.name) for n in local]
            if cfg.signal == HEADROOM
            else []
        )
        waits = [now - s.req.at_s for s in self.waiting if s.want.node_class in policy.local]
        self.pressure = pressure_of(
            policy,
            sla_p95_s=cfg.sla_p95_s,
            rate_per_s=self.meter.rate_per_s(),
            models=models,
            mix=self.mixer.mix() if models else TokenMix(),
            queue_wait_s=max(waits, default=0.0),
            queue_limit_s=cfg.queue_wait_s,
            spare_slots=sum(max(0, n.slots - n.in_flight) for n in local),
        )
        was = self.switch
        self.switch = step(was, self.pressure, now, hold_s=cfg.hold_s)
        if self.switch.on and not was.on:
            self.spiller = Spiller(start=1.0)  # the first local-bound note overflows at once
            self.overflow_episodes += self.window[0] <= now < self.window[1]
            self._dispatch()  # the waiting ones may go to the overflow class now

    def route(self, seq: _Seq) -> None:
        """A new note's class: the policy's round robin, or the overflow class for the excess."""
        cls = self.chooser.next()
        policy = self.traffic
        if self.spills:
            now = self.env.now
            self.meter.observe(now, now, completed=False)
            self.evaluate()
            p = self.pressure
            if self.switch.on and cls in policy.local and p is not None:
                if self.spiller.take(p.share):
                    cls = policy.overflow
                    self.overflow_routed += seq.measured
        seq.want = Want(node_class=cls)

    def _place(self, seq: _Seq) -> bool:
        if not any(n.in_flight < n.slots for n in self.nodes):
            return False  # pick's own answer when every node is full, without building candidates
        candidates = [n.candidate() for n in self.nodes]
        node_id = pick(candidates, seq.want, load_factor=self.limits.load_factor)
        if node_id is None and self.traffic is not None:
            node_id = self._elsewhere(candidates, seq)
        if node_id is None:
            return False
        node = self.by_id[node_id]
        node.in_flight += 1
        node.outstanding += seq.req.output_tokens
        node.routed_total += 1
        seq.node = node.index
        seq.placed_at = self.env.now
        node.enqueue(seq)
        return True

    def _elsewhere(self, candidates: list[Candidate], seq: _Seq) -> str | None:
        """coordinator.traffic's fallback: a class with no node that could serve the note at
        all sends it to the other classes in fallback_order; a busy class keeps it waiting."""
        policy, want = self.traffic, seq.want
        if self.switch.on and want.node_class in policy.local:
            node_id = pick(
                candidates, Want(node_class=policy.overflow), load_factor=self.limits.load_factor
            )
            if node_id is not None:
                self.overflow_routed += seq.measured
                return node_id
        if any(serving(c, want) for c in candidates):
            return None
        for cls in fallback_order(policy, want.node_class, self.switch.on):
            node_id = pick(candidates, Want(node_class=cls), load_factor=self.limits.load_factor)
            if node_id is not None:
                self.fallbacks += seq.measured
                return node_id
        return None

    def _dispatch(self) -> None:
        """Place waiting notes in arrival order while nodes have room: without a policy the
        first that does not fit stops it (every note wants the same nodes); with one, notes
        for another class go ahead (coordinator.admission.dispatch)."""
        if self.traffic is None:
            while self.waiting and self._place(self.waiting[0]):
                self.waiting.popleft()
            return
        if self.waiting:
            self.waiting = deque(s for s in self.waiting if not self._place(s))

    def _expire(self) -> None:
        now = self.env.now
        while self.waiting and now - self.waiting[0].req.at_s >= self.limits.queue_max_wait_s:
            self._refuse(self.waiting.popleft(), "waited_too_long")

    def _refuse(self, seq: _Seq, why: str) -> None:
        seq.refused = why
        seq.done_at = self.env.now
        self.on_end(seq)

    def arrive(self, seq: _Seq) -> None:
        self._expire()
        if self.chooser is not None:
            self.route(seq)
        if not self.waiting and self._place(seq):
            return
        if len(self.waiting) >= self.limits.queue_max_depth:
            self._refuse(seq, "queue_full")
            return
        self.waiting.append(seq)
        self.max_waiting = max(self.max_waiting, len(self.waiting))
        if self.traffic is not None:
            self._dispatch()  # its class may have room while others' notes wait

    def release(self, node: _Node, seq: _Seq) -> None:
        node.in_flight -= 1
        if self.spills:
            now = self.env.now
            self.mixer.observe(
                now,
                now,
                completed=True,
                counted=False,
                prompt_tokens=seq.req.prompt_tokens,
                completion_tokens=seq.req.output_tokens,
            )
        self.on_end(seq)
        self._expire()
        self._dispatch()

    on_end: Callable[[_Seq], None]


@dataclass(frozen=True)
class NodeUse:
    node_id: str
    profile: str
    busy: float  # fraction of the window spent in steps
    mean_running: float  # time-averaged sequences in the batch
    occupancy: float  # mean_running / max_running
    served: int  # measured notes it served
    node_class: str = ""  # its traffic class


@dataclass(frozen=True)
class ClassUse:
    """One traffic class over the window: its share of the measured notes it served, the
    time per note there, and its nodes' mean busy fraction."""

    node_class: str
    nodes: int
    served: int
    share: float  # of the measured notes served anywhere
    p50_s: float
    p95_s: float
    busy: float  # mean over its nodes

    def as_dict(self) -> dict:
        return {
            "node_class": self.node_class,
            "nodes": self.nodes,
            "served": self.served,
            "share": round(self.share, 4),
            "p50_s": self.p50_s if math.isfinite(self.p50_s) else None,
            "p95_s": self.p95_s if math.isfinite(self.p95_s) else None,
            "busy": round(self.busy, 4),
        }


@dataclass
class SimResult:
    """Per measured note (arrival inside the window): queue wait (arrival to admission into a
    batch: coordinator queue plus node queue), time to first token and time per note, in
    seconds; refused notes have inf there."""

    window: tuple[float, float]
    waits: list[float]
    ttfts: list[float]
    totals: list[float]
    refused: dict[str, int]
    nodes: list[NodeUse]
    simulated_notes: int
    wall_s: float = 0.0  # the simulation's own run time
    max_coordinator_queue: int = 0
    completed_in_window: int = 0
    served_by: list[int | None] | None = None  # per measured note: its node's index (None: refused)
    fallbacks: int = 0  # measured notes placed outside the class the traffic policy chose
    overflow_routed: int = 0  # measured notes sent to the overflow class because of overflow
    overflow_episodes: int = 0  # times overflow turned on inside the window

    def by_class(self) -> list[ClassUse]:
        """Each traffic class's share, time per note and busy fraction (ordered by class)."""
        served_by = self.served_by or []
        classes = sorted({n.node_class for n in self.nodes})
        done = sum(1 for i in served_by if i is not None)
        out = []
        for cls in classes:
            members = {i for i, n in enumerate(self.nodes) if n.node_class == cls}
            times = [t for t, i in zip(self.totals, served_by) if i is not None and i in members]
            out.append(
                ClassUse(
                    cls,
                    len(members),
                    len(times),
                    len(times) / done if done else 0.0,
                    percentile(times, 0.50) if times else math.nan,
                    percentile(times, 0.95) if times else math.nan,
                    sum(self.nodes[i].busy for i in members) / len(members),
                )
            )
        return out

    @property
    def notes(self) -> int:
        return len(self.totals)

    def q(self, values: list[float], p: float) -> float:
        return percentile(values, p)

    def mean(self, values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    @property
    def throughput_per_s(self) -> float:
        """Notes completed inside the window per second of window."""
        return self.completed_in_window / max(_EPS, self.window[1] - self.window[0])


def simulate(
    fleet: Sequence[NodeSpec],
    requests: Sequence[Request],
    *,
    window: tuple[float, float],
    limits: CoordinatorLimits = CoordinatorLimits(),
    traffic: Policy | None = None,
    overflow: OverflowSettings = OverflowSettings(),
) -> SimResult:
    """Run `requests` (sorted by arrival) through the fleet; statistics are kept for the notes
    arriving inside `window` and for node use inside it. Runs until every such note has ended.
    `traffic`: the coordinator's traffic policy for these notes (weights across node classes,
    and overflow under `overflow`'s settings)."""
    if not fleet:
        raise ValueError("a fleet needs at least one node")
    started = time.perf_counter()
    env = simpy.Environment(initial_time=min([window[0]] + [r.at_s for r in requests[:1]]))
    coord = _Coordinator(env, limits, traffic, overflow)
    coord.window = window
    seqs = [_Seq(r, window[0] <= r.at_s < window[1]) for r in requests]
    pending = sum(1 for s in seqs if s.measured)
    all_done = env.event()
    completed_in_window = 0

    def on_end(seq: _Seq) -> None:
        nonlocal pending, completed_in_window
        if not seq.refused and window[0] <= seq.done_at < window[1]:
            completed_in_window += 1
        if seq.measured:
            pending -= 1
            if pending == 0 and not all_done.triggered:
                all_done.succeed()

    coord.on_end = on_end
    hosts: dict[str, _Host] = {}
    for spec in fleet:
        if spec.host and spec.host not in hosts:
            hosts[spec.host] = _Host(spec.host_parallelism)
    coord.nodes = [
        _Node(env, i, spec, window, coord.release, hosts.get(spec.host))
        for i, spec in enumerate(fleet)
    ]
    for node in coord.nodes:
        if node.host is not None:
            node.host.nodes.append(node)
    coord.by_id = {n.spec.node_id: n for n in coord.nodes}
    if len(coord.by_id) != len(coord.nodes):
        raise ValueError("node ids in a fleet must be unique")

    def arrivals():
        for s in seqs:
            if s.req.at_s > env.now:
                yield env.timeout(s.req.at_s - env.now)
            coord.arrive(s)

    env.process(arrivals())

    def ticks():  # coordinator.traffic's run(): the switch also turns off with no arrivals
        while True:
            yield env.timeout(TICK_S)
            coord.evaluate()

    if coord.spills:
        env.process(ticks())
    if pending:
        env.run(until=all_done)
    measured = [s for s in seqs if s.measured]
    inf = math.inf
    waits = [inf if s.refused else s.admitted_at - s.req.at_s for s in measured]
    ttfts = [inf if s.refused else s.first_at - s.req.at_s for s in measured]
    totals = [inf if s.refused else s.done_at - s.req.at_s for s in measured]
    refused: dict[str, int] = {}
    for s in measured:
        if s.refused:
            refused[s.refused] = refused.get(s.refused, 0) + 1
    span = max(_EPS, window[1] - window[0])
    served = [0] * len(fleet)
    for s in measured:
        if s.node is not None and not s.refused:
            served[s.node] += 1
    uses = [
        NodeUse(
            n.spec.node_id,
            n.spec.profile.name,
            n.busy_s / span,
            n.seq_s / span,
            n.seq_s / span / n.max_running,
            served[n.index],
            n.spec.traffic_class,
        )
        for n in coord.nodes
    ]
    return SimResult(
        window,
        waits,
        ttfts,
        totals,
        refused,
        uses,
        len(seqs),
        wall_s=time.perf_counter() - started,
        max_coordinator_queue=coord.max_waiting,
        completed_in_window=completed_in_window,
        served_by=[None if s.refused else s.node for s in measured],
        fallbacks=coord.fallbacks,
        overflow_routed=coord.overflow_routed,
        overflow_episodes=coord.overflow_episodes,
    )
