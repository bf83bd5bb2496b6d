"""The capacity plan (`fleetctl plan`): simulate a fleet on a day's busiest hours, find the
smallest fleet of a profile that meets a p95 time-per-note target, and when none can, say
why with the single-note bound and what would (docs/capacity.md "Reading the plan").
Pure of I/O apart from the `progress` callback.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from cluster.capacity.profile import (
    Profile,
    ProfileError,
    StepModel,
    load_profile,
    reference_profiles,
)
from cluster.capacity.simulate import (
    SLA_P95_S,
    CoordinatorLimits,
    OverflowSettings,
    SimResult,
    fleet_of,
    simulate,
)
from cluster.capacity.workload import Request, Workload
from cluster.metrics import percentile
from cluster.traffic import Policy

Progress = Callable[[str], None]
SLA_QUANTILE = 0.95
BOUND_DRAWS = 20_000
MAX_SEARCH_NODES = 512
RELAXED_FACTOR = 1.25
DEFAULT_LIMITS = CoordinatorLimits()  # the coordinator's own queue bounds


@dataclass(frozen=True)
class Window:
    """What is simulated: arrivals from `start_s` (warm-up) to `end_s` (cool-down), statistics
    over the notes arriving in [measure_from_s, measure_to_s)."""

    start_s: float
    measure_from_s: float
    measure_to_s: float
    end_s: float

    def describe(self) -> str:
        return (
            f"notes arriving {_clock(self.measure_from_s)}-{_clock(self.measure_to_s)} (the busiest "
            f"{(self.measure_to_s - self.measure_from_s) / 3600:g} h of the day), after "
            f"{(self.measure_from_s - self.start_s) / 60:g} min of warm-up traffic and with arrivals "
            f"continuing {(self.end_s - self.measure_to_s) / 60:g} min after"
        )

    def as_dict(self) -> dict:
        return {
            "measured_from": _clock(self.measure_from_s),
            "measured_to": _clock(self.measure_to_s),
            "warmup_s": self.measure_from_s - self.start_s,
            "cooldown_s": self.end_s - self.measure_to_s,
        }


def _clock(t_s: float) -> str:
    minutes = int(round(t_s / 60.0))
    if minutes == 1440:
        return "24:00"
    return f"{minutes // 60 % 24:02d}:{minutes % 60:02d}" + (" (+1 day)" if minutes > 1440 else "")


def busiest_window(
    workload: Workload, hours: float = 3.0, warmup_s: float = 1800.0, cooldown_s: float = 1800.0
) -> Window:
    start, end = workload.busiest_window(hours * 3600.0)
    return Window(start - warmup_s, start, end, end + cooldown_s)


def traffic(workload: Workload, window: Window, seed: int) -> list[Request]:
    """The notes of the simulated span; the same seed gives every fleet the same notes."""
    return workload.requests(random.Random(seed), window.start_s, window.end_s)


@dataclass(frozen=True)
class Quantiles:
    p50: float
    p95: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Quantiles:
        finite = [v for v in values if math.isfinite(v)]
        return cls(
            percentile(list(values), 0.5),
            percentile(list(values), 0.95),
            percentile(list(values), 0.99),
            sum(finite) / len(finite) if finite else math.nan,
        )

    def as_dict(self) -> dict:
        return {k: _num(getattr(self, k)) for k in ("p50", "p95", "p99", "mean")}


def _num(v: float):
    """JSON has no inf or NaN: None stands for 'never' (refused notes) or 'none'."""
    return None if v is None or not math.isfinite(v) else round(v, 4)


@dataclass(frozen=True)
class FleetOutcome:
    fleet: tuple[tuple[str, int], ...]
    notes: int
    refused: dict[str, int]
    time_per_note: Quantiles
    queue_wait: Quantiles
    ttft: Quantiles
    nodes: tuple
    throughput_per_h: float
    wall_s: float
    classes: tuple = ()  # simulate.ClassUse per traffic class, with a traffic policy
    fallbacks: int = 0  # notes placed outside the class the policy chose (no node in it)
    overflow_routed: int = 0  # notes the overflow switch sent to the overflow class
    overflow_episodes: int = 0

    @property
    def size(self) -> int:
        return sum(n for _, n in self.fleet)

    def meets(self, sla_s: float) -> bool:
        return self.time_per_note.p95 <= sla_s

    def as_dict(self) -> dict:
        return {
            "fleet": [{"profile": p, "count": n} for p, n in self.fleet],
            "notes": self.notes,
            "refused": dict(self.refused),
            "time_per_note_s": self.time_per_note.as_dict(),
            "queue_wait_s": self.queue_wait.as_dict(),
            "ttft_s": self.ttft.as_dict(),
            "throughput_notes_per_h": round(self.throughput_per_h, 2),
            "nodes": [
                {
                    "node": u.node_id,
                    "profile": u.profile,
                    "busy": round(u.busy, 4),
                    "mean_running": round(u.mean_running, 3),
                    "slot_occupancy": round(u.occupancy, 4),
                    "notes": u.served,
                }
                for u in self.nodes
            ],
            **(
                {
                    "traffic_classes": [c.as_dict() for c in self.classes],
                    "traffic_fallbacks": self.fallbacks,
                    "traffic_overflow_routed": self.overflow_routed,
                    "traffic_overflow_episodes": self.overflow_episodes,
                }
                if self.classes
                else {}
            ),
        }


def outcome(
    fleet: Sequence[tuple[Profile, int]],
    requests: Sequence[Request],
    window: Window,
    limits: CoordinatorLimits = DEFAULT_LIMITS,
    *,
    traffic: Policy | None = None,
    classes: Mapping[str, str] | None = None,
    sla_p95_s: float = SLA_P95_S,
    overflow: OverflowSettings | None = None,
) -> FleetOutcome:
    """The fleet simulated on `requests`; with `traffic`, the coordinator's traffic policy
    routes them across node classes (`classes`: profile name -> class; a profile not named
    is in the class its engine gives it) and the outcome has each class's figures; overflow
    runs as `overflow` says (default: the live headroom's signal against `sla_p95_s`)."""
    specs = fleet_of(fleet)
    if classes:
        specs = [replace(s, node_class=classes.get(s.profile.name, "")) for s in specs]
    r: SimResult = simulate(
        specs,
        requests,
        window=(window.measure_from_s, window.measure_to_s),
        limits=limits,
        traffic=traffic,
        overflow=overflow or OverflowSettings(sla_p95_s=sla_p95_s),
    )
    return FleetOutcome(
        tuple((p.name, n) for p, n in fleet),
        r.notes,
        r.refused,
        Quantiles.of(r.totals),
        Quantiles.of(r.waits),
        Quantiles.of(r.ttfts),
        tuple(r.nodes),
        r.throughput_per_s * 3600,
        r.wall_s,
        tuple(r.by_class()) if traffic is not None else (),
        r.fallbacks,
        r.overflow_routed,
        r.overflow_episodes,
    )


@dataclass(frozen=True)
class Bound:
    """The single-note bound of a profile for this workload: a note alone on a node takes its
    prefill plus one decode step per output token at the per-stream rate."""

    stream_tok_s: float
    median_s: float  # the bound for the median note
    p95_s: float  # the 95th percentile of the bound over the notes
    beyond_sla: float  # fraction of notes whose bound exceeds the SLA
    prompt_tokens: int  # the notes at the 95th percentile of the bound
    output_tokens: int
    prefill_s: float

    @property
    def feasible(self) -> bool:
        return self.beyond_sla <= 1.0 - SLA_QUANTILE + 1e-12

    def needed_stream_tok_s(self, sla_s: float, fit: StepModel) -> float:
        """The per-stream rate at which the p95 note's bound would meet the SLA (inf if its prefill alone can't)."""
        room = sla_s - self.prefill_s
        return math.inf if room <= 0 else self.output_tokens / room

    def as_dict(self) -> dict:
        return {
            "stream_decode_tok_s": _num(self.stream_tok_s),
            "median_note_s": _num(self.median_s),
            "p95_note_s": _num(self.p95_s),
            "notes_beyond_sla": round(self.beyond_sla, 4),
            "p95_note_prompt_tokens": self.prompt_tokens,
            "p95_note_output_tokens": self.output_tokens,
            "p95_note_prefill_s": _num(self.prefill_s),
        }


def single_note_bound(profile: Profile, workload: Workload, sla_s: float, seed: int = 1) -> Bound:
    rng = random.Random(seed)
    fit = profile.fit
    notes = []
    for _ in range(BOUND_DRAWS):
        p, o = workload.sample_tokens(rng)
        cached = min(p, workload.shared_prefix_tokens)
        notes.append((fit.single_note_s(p, o, cached), p, o, cached))
    notes.sort()
    median = notes[len(notes) // 2][0]
    at95 = notes[min(len(notes) - 1, int(round(SLA_QUANTILE * (len(notes) - 1))))]
    beyond = sum(1 for n in notes if n[0] > sla_s) / len(notes)
    _, p, o, cached = at95
    return Bound(
        fit.stream_decode_tok_s(), median, at95[0], beyond, p, o, fit.prefill_s(p - cached, cached)
    )


def node_notes_per_s(profile: Profile, workload: Workload) -> float:
    """An upper bound on a node's throughput: every slot busy, each note costing its prefill
    (which stalls the batch) plus its share of full-batch decode steps."""
    fit, m = profile.fit, profile.limits.max_running
    p, o = workload.mean_prompt_tokens, workload.mean_output_tokens
    cached = min(p, workload.shared_prefix_tokens)
    ctx = m * (p + o / 2.0)
    per_note = fit.prefill_s(p - cached, cached) + o * fit.decode_step_s(m, ctx) / m
    return 1.0 / per_note


@dataclass
class Search:
    profile: str
    sla_s: float
    smallest: int | None
    tried: list[FleetOutcome] = field(default_factory=list)
    why_not: str = ""
    relaxed_sla_s: float | None = None  # the target searched instead when sla_s is out of reach
    relaxed_smallest: int | None = None

    def as_dict(self) -> dict:
        return {
            "profile": self.profile,
            "sla_p95_s": self.sla_s,
            "smallest_count": self.smallest,
            "why_not": self.why_not or None,
            "relaxed_sla_p95_s": self.relaxed_sla_s,
            "relaxed_smallest_count": self.relaxed_smallest,
            "tried": [
                {
                    "count": o.size,
                    "p95_time_per_note_s": _num(o.time_per_note.p95),
                    "refused": sum(o.refused.values()),
                }
                for o in sorted(self.tried, key=lambda o: o.size)
            ],
        }


def smallest_fleet(
    profile: Profile,
    workload: Workload,
    requests: Sequence[Request],
    window: Window,
    sla_s: float,
    *,
    bound: Bound,
    progress: Progress = lambda _: None,
    max_nodes: int = MAX_SEARCH_NODES,
    limits: CoordinatorLimits = DEFAULT_LIMITS,
) -> Search:
    """The fewest nodes of `profile` whose simulated p95 time per note meets `sla_s`: from the
    throughput bound up, doubling until one meets it, then bisecting. When the single-note
    bound rules the target out, the search answers for the best this profile can do instead:
    RELAXED_FACTOR x its p95 single-note bound, rounded up to a second."""
    search = Search(profile.name, sla_s, None)
    target = sla_s
    if not bound.feasible:
        search.why_not = unmeetable_reason(profile, bound, sla_s)
        target = search.relaxed_sla_s = float(math.ceil(RELAXED_FACTOR * bound.p95_s))
    seen: dict[int, FleetOutcome] = {}

    def run(n: int) -> FleetOutcome:
        if n not in seen:
            progress(f"simulating {n} x {profile.name}")
            seen[n] = o = outcome([(profile, n)], requests, window, limits)
            search.tried.append(o)
            verdict = "meets" if o.meets(target) else "misses"
            progress(
                f"  {n} x {profile.name}: p95 {_secs(o.time_per_note.p95)} per note ({verdict} {target:g} s)"
            )
        return seen[n]

    lo = max(1, math.ceil(workload.peak_rate / node_notes_per_s(profile, workload)))
    n, last_p95, why = lo, math.inf, ""
    while not run(n).meets(target):
        p95 = run(n).time_per_note.p95
        if n >= max_nodes:
            why = (
                f"even {n} nodes give p95 {_secs(p95)} per note, over {target:g} s "
                f"(the single-note bound's p95 is {bound.p95_s:.1f} s)"
            )
            break
        if math.isfinite(p95) and p95 >= last_p95 * 0.995 and n >= 4 * lo:
            why = (
                f"p95 stops improving near {_secs(p95)} per note from {n // 2} to {n} nodes: "
                f"batching on this profile leaves notes above {target:g} s even on an idle fleet"
            )
            break
        last_p95 = p95
        n = min(max_nodes, n * 2)
    smallest = None
    if not why:
        hi = n
        known_bad = max(
            [m for m, o in seen.items() if not o.meets(target) and m < hi], default=lo - 1
        )
        while hi - known_bad > 1:
            mid = (hi + known_bad) // 2
            if run(mid).meets(target):
                hi = mid
            else:
                known_bad = mid
        smallest = hi
    if search.relaxed_sla_s is None:
        search.smallest, search.why_not = smallest, why
    else:
        search.relaxed_smallest = smallest
    return search


def _secs(v: float) -> str:
    return "never (refused)" if not math.isfinite(v) else f"{v:.1f} s"


def unmeetable_reason(profile: Profile, bound: Bound, sla_s: float) -> str:
    return (
        f"no fleet of {profile.name} can meet p95 <= {sla_s:g} s: per-stream decode "
        f"{bound.stream_tok_s:.1f} tok/s bounds a {bound.output_tokens}-token note at >= {bound.p95_s:.1f} s "
        f"(prefill of {bound.prompt_tokens} prompt tokens {bound.prefill_s:.1f} s + {bound.output_tokens} x "
        f"{profile.fit.decode_base_s * 1000:.1f} ms); {bound.beyond_sla * 100:.0f}% of notes take longer "
        f"than {sla_s:g} s even alone on an idle node, and more nodes only shorten the queue"
    )


def what_would(
    profile: Profile,
    bound: Bound,
    workload: Workload,
    sla_s: float,
    shipped: dict[str, Profile] | None = None,
) -> list[str]:
    """Levers that would meet the SLA when `profile` cannot: faster reference profiles, a
    smaller model, more parallelism per note (node groups), shorter notes."""
    out = []
    need = bound.needed_stream_tok_s(sla_s, profile.fit)
    if math.isinf(need):
        out.append(
            f"the p95 note's prefill alone ({bound.prefill_s:.1f} s) exceeds {sla_s:g} s: cache the shared "
            f"prompt prefix (--shared-prefix-tokens) or prefill faster"
        )
    else:
        factor = need / bound.stream_tok_s
        out.append(
            f"a per-stream decode rate >= {need:.0f} tok/s ({factor:.1f}x this profile's "
            f"{bound.stream_tok_s:.1f}) with the prefill unchanged"
        )
        have = profile.machines
        out.append(
            f"more parallelism per note: a node group (tensor parallelism over several machines, "
            f"group_size >= {max(2, math.ceil(factor * have))} even at ideal scaling"
            + (f", against this group's {have}" if have > 1 else "")
            + "), measured with fleetctl profile"
        )
    shipped = shipped if shipped is not None else load_reference_profiles()
    better, closest = [], []
    for name, other in sorted(shipped.items()):
        if other.name == profile.name:
            continue
        b = single_note_bound(other, workload, sla_s)
        smaller = 0 < other.model.params_b < profile.model.params_b
        text = f"{name} (p95 single-note bound {b.p95_s:.1f} s{', a smaller model' if smaller else ''})"
        (better if b.feasible else closest).append((b.p95_s, text))
    if better:
        out.append("reference profiles that can: " + "; ".join(t for _, t in sorted(better)))
    else:
        nearest = "; ".join(t for _, t in sorted(closest)[:3])
        out.append(
            "no shipped reference profile can"
            + (f" (the closest: {nearest})" if nearest else "")
            + "; a smaller model, shorter notes or a faster node, profiled with fleetctl profile"
        )
    return out


def load_reference_profiles() -> dict[str, Profile]:
    out = {}
    for name, path in reference_profiles().items():
        try:
            out[name] = load_profile(path)
        except ProfileError:
            continue
    return out
