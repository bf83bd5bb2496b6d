"""`fleetctl plan`: how many nodes, what time per note, what it costs (docs/capacity.md).

Simulates the given fleet on the day's busiest hours, searches the smallest fleet of each
profile that meets the p95 target (or says why none can, and what would), prices it against
a hosted API, and optionally plots both."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import typer

from cluster.capacity import costs as costmod
from cluster.capacity import plan as planmod
from cluster.capacity.profile import Profile, ProfileError, resolve_profile
from cluster.capacity.simulate import OVERFLOW_QUEUE_WAIT_S, OverflowSettings
from cluster.capacity.workload import Workload
from cluster.fleetctl import workload_opts as wo
from cluster.fleetctl.exits import EXIT_BAD_INPUT
from cluster.traffic import CLASS_RE, HEADROOM, QUEUE, Policy, PolicyError, parse_spec

CMD = "plan"
COST_VOLUME_POINTS = 8


def _bad(flag: str, message: str) -> typer.Exit:
    return wo.bad(CMD, flag, message)


def parse_fleet(specs: list[str]) -> list[tuple[Profile, int]]:
    """--profile FILE_OR_NAME[=COUNT] ...: profiles in order, counts summed for repeats."""
    if not specs:
        raise _bad(
            "--profile",
            "name at least one profile: a profile file or a reference profile's name "
            "(FILE_OR_NAME[=COUNT])",
        )
    fleet: dict[str, tuple[Profile, int]] = {}
    for spec in specs:
        name, sep, count_text = spec.rpartition("=") if "=" in spec else (spec, "", "")
        count = 1
        if sep:
            if not count_text.strip().isdigit() or not name.strip():
                raise _bad(
                    "--profile",
                    f"expected FILE_OR_NAME=COUNT with a whole number of nodes, not {spec!r}",
                )
            count = int(count_text)
            if count < 1:
                raise _bad(
                    "--profile",
                    f"a fleet needs at least 1 node of a profile, not {count} in {spec!r}",
                )
        try:
            prof = resolve_profile(name)
        except ProfileError as exc:
            raise _bad("--profile", str(exc)) from None
        have = fleet.get(prof.name)
        fleet[prof.name] = (prof, count + (have[1] if have else 0))
    return list(fleet.values())


def parse_traffic(
    spec: str | None, tags: list[str], fleet: list[tuple[Profile, int]]
) -> tuple[Policy | None, dict[str, str]]:
    """--traffic 'MODEL: CLASS=WEIGHT ...' (as fleet-coordinator takes it) and --node-class
    PROFILE=CLASS ...: the policy to simulate and each named profile's class."""
    names = {p.name for p, _ in fleet}
    classes: dict[str, str] = {}
    for tag in tags:
        name, sep, cls = tag.rpartition("=")
        if not sep or name not in names:
            raise _bad(
                "--node-class",
                f"expected PROFILE=CLASS with PROFILE one of {', '.join(sorted(names))}, "
                f"not {tag[:80]!r}",
            )
        if not CLASS_RE.match(cls):
            raise _bad(
                "--node-class",
                f"class {cls[:40]!r} must be 1-32 lower-case letters, digits, - or _",
            )
        classes[name] = cls
    if spec is None:
        if classes:
            raise _bad("--node-class", "node classes need a policy to route by: give --traffic")
        return None, classes
    try:
        model, weights, overflow = parse_spec(spec)
        policy = Policy.parse(model, weights, overflow)
    except PolicyError as exc:
        raise _bad("--traffic", f"{exc.field}: {exc}") from None
    return policy, classes


def _nonneg(flag: str, value: float | None, positive: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise _bad(flag, f"must be a number {'> 0' if positive else '>= 0'}, not {value:g}")


def plan(
    profile: list[str] = typer.Option(
        [],
        "--profile",
        "-p",
        metavar="FILE_OR_NAME[=COUNT]",
        help="FILE_OR_NAME[=COUNT]: a profile file or a "
        "reference profile's name, and how many such nodes (default 1). Repeat for "
        "a mixed fleet.",
    ),
    notes_per_day: float | None = wo.NOTES_PER_DAY,
    hours: str = wo.HOURS,
    peak_factor: float = wo.PEAK_FACTOR,
    arrivals_csv: Path | None = wo.ARRIVALS_CSV,
    prompt_tokens: str = wo.PROMPT_TOKENS,
    output_tokens: str = wo.OUTPUT_TOKENS,
    tokens_from: Path | None = wo.TOKENS_FROM,
    shared_prefix_tokens: int = wo.SHARED_PREFIX,
    seed: int = wo.SEED,
    sla_p95_s: float = typer.Option(
        8.0,
        "--sla-p95-s",
        help="Target: 95% of notes complete within this many seconds of arriving.",
    ),
    search: bool = typer.Option(
        True,
        "--search/--no-search",
        help="Search the smallest fleet of each profile that meets --sla-p95-s.",
    ),
    window_hours: float = typer.Option(
        3.0,
        "--window-hours",
        help="Hours of the busiest part of the day to simulate and measure (0.25-24).",
    ),
    node_cost_usd: float | None = typer.Option(
        None,
        "--node-cost-usd",
        help="Purchase price of one machine (overrides the profile's [cost]); a node group counts each.",
    ),
    amortize_months: float | None = typer.Option(
        None,
        "--amortize-months",
        help=f"Months to spread the price over (default {costmod.DEFAULT_AMORTIZE_MONTHS:g}).",
    ),
    power_w: float | None = typer.Option(
        None, "--power-w", help="Average power of one machine, watts (a node group: each machine)."
    ),
    usd_per_kwh: float | None = typer.Option(
        None,
        "--usd-per-kwh",
        help=f"Electricity price (default {costmod.DEFAULT_USD_PER_KWH:g}, US commercial average).",
    ),
    hosting_usd_month: float | None = typer.Option(
        None,
        "--hosting-usd-month",
        help="Rack space, network and support per machine per month (default 0).",
    ),
    rent_usd_hour: float | None = typer.Option(
        None,
        "--rent-usd-hour",
        help="A rented machine's price per hour instead of a purchase price.",
    ),
    api_usd_per_m_input: float = typer.Option(
        costmod.DEFAULT_API_USD_PER_M_INPUT,
        "--api-usd-per-m-input",
        help="Hosted API price per 1M input tokens (default: the field "
        "report's $45/day; GPT-4o's list price is 2.50).",
    ),
    api_usd_per_m_output: float = typer.Option(
        costmod.DEFAULT_API_USD_PER_M_OUTPUT,
        "--api-usd-per-m-output",
        help="Hosted API price per 1M output tokens (GPT-4o list: 10).",
    ),
    plot_dir: Path | None = typer.Option(
        None,
        "--plot-dir",
        metavar="DIR",
        help="Write capacity-p95 and capacity-cost charts (PNG and SVG) here.",
    ),
    traffic: str | None = typer.Option(
        None,
        "--traffic",
        metavar="'MODEL: CLASS=WEIGHT ...'",
        help="Route the given fleet's notes by this traffic policy (as fleet-coordinator "
        "--traffic takes it; overflow on --overflow-signal, SLA --sla-p95-s) and "
        "report each class's share and p95.",
    ),
    overflow_signal: str = typer.Option(
        "headroom",
        "--overflow-signal",
        metavar="headroom|queue",
        help="What turns overflow on, as the coordinator decides: headroom (it runs with "
        "--capacity-profile: the local nodes' predicted p95 at the arrival rate against "
        "--sla-p95-s) or queue (without profiles: the oldest local note's wait in its queue).",
    ),
    overflow_queue_wait_s: float = typer.Option(
        OVERFLOW_QUEUE_WAIT_S,
        "--overflow-queue-wait-s",
        metavar="S",
        help="With --overflow-signal queue: a local note waiting longer than this starts "
        "overflow (the coordinator's --traffic-overflow-queue-wait-s).",
    ),
    node_class: list[str] = typer.Option(
        [],
        "--node-class",
        metavar="PROFILE=CLASS",
        help="The traffic class of a profile's nodes (default: upstream for the upstream "
        "engine, else local). Repeat for each profile.",
    ),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
) -> None:
    """Plan a fleet: simulate the day's busiest hours on the given nodes (SimPy: Poisson
    arrivals, the coordinator's admission queue and router, each node's continuous
    batching from its profile), report p50/p95/p99 time per note, queue wait, time to first
    token and utilisation, the smallest fleet of each profile meeting --sla-p95-s (or why
    none can and what would), and $/day, $/1,000 notes and break-even against a hosted API."""
    if output not in ("table", "json"):
        raise _bad("--output", f"must be table or json, not {output!r}")
    if not (sla_p95_s > 0 and math.isfinite(sla_p95_s)):
        raise _bad("--sla-p95-s", f"must be a number of seconds > 0, not {sla_p95_s:g}")
    if not (0.25 <= window_hours <= 24):
        raise _bad("--window-hours", f"must be 0.25 to 24, not {window_hours:g}")
    for flag, value in (
        ("--node-cost-usd", node_cost_usd),
        ("--power-w", power_w),
        ("--usd-per-kwh", usd_per_kwh),
        ("--hosting-usd-month", hosting_usd_month),
        ("--rent-usd-hour", rent_usd_hour),
        ("--api-usd-per-m-input", api_usd_per_m_input),
        ("--api-usd-per-m-output", api_usd_per_m_output),
    ):
        _nonneg(flag, value)
    _nonneg("--amortize-months", amortize_months, positive=True)
    workload = wo.workload_from_flags(
        CMD,
        notes_per_day=notes_per_day,
        hours=hours,
        peak_factor=peak_factor,
        arrivals_csv=arrivals_csv,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        tokens_from=tokens_from,
        shared_prefix_tokens=shared_prefix_tokens,
    )
    fleet = parse_fleet(profile)
    policy, classes = parse_traffic(traffic, node_class, fleet)
    if overflow_signal not in (HEADROOM, QUEUE):
        raise _bad("--overflow-signal", f"must be headroom or queue, not {overflow_signal!r}")
    if not (overflow_queue_wait_s > 0 and math.isfinite(overflow_queue_wait_s)):
        raise _bad(
            "--overflow-queue-wait-s",
            f"must be a number of seconds > 0, not {overflow_queue_wait_s:g}",
        )
    if (policy is None or not policy.overflow) and (
        overflow_signal != HEADROOM or overflow_queue_wait_s != OVERFLOW_QUEUE_WAIT_S
    ):
        raise _bad(
            "--overflow-signal",
            "there is no overflow to signal: give --traffic with an overflow class "
            "('MODEL: local=100 upstream=0 overflow=upstream')",
        )
    overflow = OverflowSettings(
        sla_p95_s=sla_p95_s, queue_wait_s=overflow_queue_wait_s, signal=overflow_signal
    )
    if plot_dir is not None and plot_dir.exists() and not plot_dir.is_dir():
        raise _bad("--plot-dir", f"{plot_dir} exists and is not a directory")

    def progress(msg: str) -> None:
        typer.echo(f"plan: {msg}", err=True)

    cost_flags = dict(
        node_cost_usd=node_cost_usd,
        amortize_months=amortize_months,
        power_w=power_w,
        usd_per_kwh=usd_per_kwh,
        hosting_usd_month=hosting_usd_month,
        rent_usd_hour=rent_usd_hour,
    )
    api = costmod.ApiPrice(api_usd_per_m_input, api_usd_per_m_output)
    report = build_report(
        fleet,
        workload,
        sla_p95_s,
        seed=seed,
        search=search,
        window_hours=window_hours,
        cost_flags=cost_flags,
        api=api,
        plot_dir=plot_dir,
        progress=progress,
        traffic=policy,
        classes=classes,
        overflow=overflow,
    )
    if output == "json":
        typer.echo(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    else:
        typer.echo(render(report))


def _overflow_doc(traffic: Policy | None, overflow: OverflowSettings | None) -> dict:
    """What turns the policy's overflow on, for the report (nothing without overflow)."""
    if traffic is None or not traffic.overflow or overflow is None:
        return {}
    doc: dict = {"traffic_overflow_signal": overflow.signal}
    if overflow.signal == QUEUE:
        doc["traffic_overflow_queue_wait_s"] = overflow.queue_wait_s
    return doc


def build_report(
    fleet: list[tuple[Profile, int]],
    workload: Workload,
    sla_s: float,
    *,
    seed: int,
    search: bool,
    window_hours: float,
    cost_flags: dict,
    api: costmod.ApiPrice,
    plot_dir: Path | None,
    progress: planmod.Progress,
    traffic: Policy | None = None,
    classes: dict[str, str] | None = None,
    overflow: OverflowSettings | None = None,
) -> dict:
    """Everything the plan says, as plain data (the -o json document)."""
    window = planmod.busiest_window(workload, window_hours)
    requests = planmod.traffic(workload, window, seed)
    progress(f"{len(requests)} notes drawn for {window.describe()}")
    size = sum(n for _, n in fleet)
    progress(f"simulating the given fleet ({_fleet_text(fleet)})")
    given = planmod.outcome(
        fleet,
        requests,
        window,
        traffic=traffic,
        classes=classes,
        sla_p95_s=sla_s,
        overflow=overflow,
    )
    progress(f"  given fleet: p95 {_s(given.time_per_note.p95)} per note")
    bounds = {p.name: planmod.single_note_bound(p, workload, sla_s, seed) for p, _ in fleet}
    searches: list[planmod.Search] = []
    levers: dict[str, list[str]] = {}
    for p, _ in fleet:
        b = bounds[p.name]
        if search:
            searches.append(
                planmod.smallest_fleet(
                    p, workload, requests, window, sla_s, bound=b, progress=progress
                )
            )
        if not b.feasible:
            levers[p.name] = planmod.what_would(p, b, workload, sla_s)

    node_costs = {p.name: costmod.node_cost(p, **cost_flags) for p, _ in fleet}
    mean_p, mean_o = workload.mean_prompt_tokens, workload.mean_output_tokens

    def price(
        counts: list[tuple[str, int]], notes: float = workload.notes_per_day
    ) -> costmod.CostReport:
        return costmod.fleet_costs(
            [(name, node_costs[name], n) for name, n in counts],
            notes_per_day=notes,
            prompt_tokens=mean_p,
            output_tokens=mean_o,
            api=api,
        )

    fleet_cost = price([(p.name, n) for p, n in fleet])
    smallest_costs = {}
    for s in searches:
        count = s.smallest or s.relaxed_smallest
        if count:
            target = s.sla_s if s.smallest else s.relaxed_sla_s
            smallest_costs[s.profile] = {
                "count": count,
                "machines": count * next(p.machines for p, _ in fleet if p.name == s.profile),
                "sla_p95_s": target,
                **price([(s.profile, count)]).as_dict(),
            }

    doc = {
        "workload": {
            "description": workload.describe(),
            "notes_per_day": workload.notes_per_day,
            "peak_notes_per_min": round(workload.peak_rate * 60, 3),
            "mean_prompt_tokens": round(mean_p, 1),
            "mean_output_tokens": round(mean_o, 1),
            "shared_prefix_tokens": workload.shared_prefix_tokens,
        },
        "simulated": {
            **window.as_dict(),
            "description": window.describe(),
            "notes_drawn": len(requests),
            "seed": seed,
        },
        "sla_p95_s": sla_s,
        "fleet": {
            **given.as_dict(),
            "size": size,
            "machines": sum(p.machines * n for p, n in fleet),
            "groups": [_group_doc(p, n) for p, n in fleet if p.group is not None],
            "meets_sla": given.meets(sla_s),
            **({"traffic_policy": traffic.spec()} if traffic is not None else {}),
            **_overflow_doc(traffic, overflow),
        },
        "single_note_bounds": {name: b.as_dict() for name, b in bounds.items()},
        "searches": [s.as_dict() for s in searches],
        "what_would_meet_sla": levers,
        "costs": {
            "fleet": fleet_cost.as_dict(),
            "smallest_fleets": smallest_costs,
            "node_usd_day": {name: c.per_day() for name, c in node_costs.items()},
            "api_usd_per_m_input": api.usd_per_m_input,
            "api_usd_per_m_output": api.usd_per_m_output,
            "field_report": {
                "api_usd_day_at_report_volume": round(costmod.report_api_usd_day(api), 2),
                "report_api_usd_day": costmod.REPORT_API_USD_DAY,
                "report_rented_a100_usd_day": costmod.REPORT_RENTED_A100_USD_DAY,
                "report_break_even_notes_day": costmod.REPORT_BREAK_EVEN_NOTES,
            },
        },
        "plots": [],
    }
    if plot_dir is not None:
        doc["plots"] = [
            str(p)
            for p in _plots(
                fleet,
                workload,
                sla_s,
                seed,
                window_hours,
                searches,
                bounds,
                node_costs,
                api,
                price,
                plot_dir,
                progress,
            )
        ]
    return doc


def _plots(
    fleet,
    workload: Workload,
    sla_s: float,
    seed: int,
    window_hours: float,
    searches,
    bounds,
    node_costs,
    api: costmod.ApiPrice,
    price,
    plot_dir: Path,
    progress,
) -> list[Path]:
    from cluster.capacity import plot

    window = planmod.busiest_window(workload, window_hours)
    requests = planmod.traffic(workload, window, seed)
    series = {}
    found = {s.profile: s for s in searches}
    for p, n in fleet:
        points = {
            o.size: o.time_per_note.p95 for o in (found[p.name].tried if p.name in found else [])
        }
        keeps_up = math.ceil(workload.peak_rate / planmod.node_notes_per_s(p, workload))
        top = max(
            [n, 8, 3 * keeps_up]
            + [k for k in points]
            + ([found[p.name].smallest + 2] if found.get(p.name) and found[p.name].smallest else [])
        )
        for k in sorted(set([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]) | {n}):
            if k <= min(top, 64) and k not in points:
                progress(f"plot: simulating {k} x {p.name}")
                points[k] = planmod.outcome([(p, k)], requests, window).time_per_note.p95
        series[p.name] = sorted(points.items())
    paths = plot.p95_vs_fleet(
        series,
        sla_s,
        {k: b.p95_s for k, b in bounds.items()},
        plot_dir,
        f"p95 time per note vs fleet size: {workload.describe()}",
    )
    top_v = max(2 * workload.notes_per_day, costmod.REPORT_BREAK_EVEN_NOTES * 2)
    volumes = [top_v * (i + 1) / COST_VOLUME_POINTS for i in range(COST_VOLUME_POINTS)]
    api_line = [
        v * api.per_note(workload.mean_prompt_tokens, workload.mean_output_tokens) for v in volumes
    ]
    fleets = {
        f"this fleet ({_fleet_text(fleet)})": [price([(p.name, n) for p, n in fleet]).fleet_usd_day]
        * len(volumes)
    }
    for p, _ in fleet:
        per_node = node_costs[p.name].per_day()["total"]
        if per_node <= 0:
            continue
        counts, target = [], sla_s
        for v in volumes:
            w = replace(workload, notes_per_day=v)
            b = planmod.single_note_bound(p, w, sla_s, seed)
            progress(f"plot: sizing {p.name} for {v:.0f} notes/day")
            win = planmod.busiest_window(w, window_hours)
            s = planmod.smallest_fleet(p, w, planmod.traffic(w, win, seed), win, sla_s, bound=b)
            count = s.smallest if b.feasible else s.relaxed_smallest
            target = sla_s if b.feasible else (s.relaxed_sla_s or target)
            counts.append(count if count else math.nan)
        label = (
            f"{p.name}, smallest fleet for p95 {sla_s:g} s"
            if bounds[p.name].feasible
            else f"{p.name}, smallest fleet for p95 {target:g} s ({sla_s:g} s unmeetable)"
        )
        fleets[label] = [c * per_node for c in counts]
    marks = {
        "field report: API ~$45/day at 6,000 notes": (6000.0, costmod.REPORT_API_USD_DAY),
        "field report: rented A100s ~$28/day at 6,000 notes": (
            6000.0,
            costmod.REPORT_RENTED_A100_USD_DAY,
        ),
    }
    paths += plot.cost_vs_volume(
        volumes,
        api_line,
        fleets,
        plot_dir,
        f"$ per day vs notes per day (API ${api.usd_per_m_input:g} / "
        f"${api.usd_per_m_output:g} per 1M in / out)",
        marks,
    )
    for path in paths:
        progress(f"wrote {path}")
    return paths


def _group_doc(p: Profile, count: int) -> dict:
    """A node-group profile in the plan: what one routing target is, and the machines it takes."""
    g = p.group
    return {
        "profile": p.name,
        "size": g.size,
        "mode": g.mode,
        "backend": g.backend,
        "link": g.link,
        "chip": p.node.chip,
        "count": count,
        "machines": count * g.size,
    }


def _json_safe(value):
    """JSON has no inf or NaN: None stands for them (a refused note's time, an undefined ratio)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fleet_text(fleet) -> str:
    return " + ".join(f"{n} x {p.name}" for p, n in fleet)


def _s(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.1f} s"


def render(doc: dict) -> str:
    """The plan as text for a person."""
    lines = []
    w, sim, f = doc["workload"], doc["simulated"], doc["fleet"]
    sla = doc["sla_p95_s"]
    lines.append(f"Workload: {w['description']} (peak {w['peak_notes_per_min']:.2f} notes/min)")
    lines.append(
        f"Simulated: {sim['description']}; {f['notes']} notes measured, seed {sim['seed']}"
    )
    lines.append("")
    fleet_text = " + ".join(f"{x['count']} x {x['profile']}" for x in f["fleet"])
    lines.append(f"Fleet: {fleet_text}")
    for g in f.get("groups", []):
        lines.append(
            f"  {g['profile']} is a node group: {g['size']} x {g['chip']}, {g['mode']} parallel over "
            f"{g['backend']}" + (f" ({g['link']})" if g["link"] else "") + f", one routing target; "
            f"{g['count']} such = {g['machines']} machines"
        )
    lines.append(f"  {'':<16}{'p50':>9}{'p95':>9}{'p99':>9}{'mean':>9}")
    for label, key in (
        ("time per note", "time_per_note_s"),
        ("queue wait", "queue_wait_s"),
        ("first token", "ttft_s"),
    ):
        q = f[key]
        lines.append(
            f"  {label:<16}" + "".join(f"{_s(q[k]):>9}" for k in ("p50", "p95", "p99", "mean"))
        )
    refused = sum(f["refused"].values())
    lines.append(
        f"  throughput {f['throughput_notes_per_h']:.0f} notes/h; refused {refused}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in f['refused'].items())}; shown as '-' = never)"
            if refused
            else ""
        )
    )
    for n in f["nodes"]:
        lines.append(
            f"  {n['node']:<48} busy {n['busy'] * 100:5.1f}%  batch {n['mean_running']:5.2f} running "
            f"({n['slot_occupancy'] * 100:4.1f}% of slots)  {n['notes']} notes"
        )
    if "traffic_classes" in f:
        lines.append(
            f"  traffic policy {f['traffic_policy']}; {f['traffic_fallbacks']} notes fell back "
            "(their class had no node)"
            + (
                f"; overflow (on the {f.get('traffic_overflow_signal', HEADROOM)} signal"
                + (
                    f", waits over {f['traffic_overflow_queue_wait_s']:g} s"
                    if "traffic_overflow_queue_wait_s" in f
                    else ""
                )
                + f") turned on {f['traffic_overflow_episodes']} times and took "
                f"{f['traffic_overflow_routed']} notes"
                if "overflow=" in f["traffic_policy"]
                else ""
            )
        )
        for c in f["traffic_classes"]:
            lines.append(
                f"  class {c['node_class']:<16} {c['nodes']} nodes  {c['share'] * 100:5.1f}% of "
                f"notes  p50 {_s(c['p50_s'])}  p95 {_s(c['p95_s'])}  busy {c['busy'] * 100:5.1f}%"
            )
    verdict = "meets" if f["meets_sla"] else "does NOT meet"
    lines.append(
        f"  p95 time per note {_s(f['time_per_note_s']['p95'])}: {verdict} the {sla:g} s target"
    )
    lines.append("")
    for name, b in doc["single_note_bounds"].items():
        lines.append(
            f"Single-note bound, {name}: per-stream decode {b['stream_decode_tok_s']:.1f} tok/s; a note "
            f"alone takes {_s(b['median_note_s'])} (median), {_s(b['p95_note_s'])} (p95 note); "
            f"{b['notes_beyond_sla'] * 100:.0f}% of notes exceed {sla:g} s even alone"
        )
    for s in doc["searches"]:
        tried = ", ".join(f"{t['count']}: {_s(t['p95_time_per_note_s'])}" for t in s["tried"])
        by_size = f" (p95 by fleet size: {tried})" if tried else ""
        if s["smallest_count"]:
            lines.append(
                f"Smallest fleet of {s['profile']} meeting p95 <= {sla:g} s: {s['smallest_count']} nodes{by_size}"
            )
            continue
        why = s["why_not"]
        lines.append(
            why[0].upper() + why[1:]
            if why.startswith("no fleet")
            else f"No fleet of {s['profile']} meets p95 <= {sla:g} s: {why}"
        )
        if s["relaxed_sla_p95_s"] is not None:
            best = s["relaxed_smallest_count"]
            lines.append(
                f"The best it can do: p95 <= {s['relaxed_sla_p95_s']:g} s ({planmod.RELAXED_FACTOR:g}x its "
                f"single-note bound) takes "
                + (f"{best} nodes{by_size}" if best else f"more nodes than were tried{by_size}")
            )
    for name, items in doc["what_would_meet_sla"].items():
        lines.append(f"What would meet {sla:g} s instead of {name}:")
        lines += [f"  - {item}" for item in items]
    c = doc["costs"]
    fc = c["fleet"]
    lines.append("")
    parts = ", ".join(f"{k} ${v:.2f}" for k, v in fc["fleet_usd_day_parts"].items() if v)
    lines.append(
        f"Cost of this fleet: ${fc['fleet_usd_day']:.2f}/day ({parts or 'nothing priced'}), "
        f"${fc['fleet_usd_per_1000_notes']:.2f} per 1,000 notes"
    )
    if f.get("machines", f["size"]) != f["size"]:
        per = ", ".join(
            f"{name} ${d['total']:.2f}/day" for name, d in c["node_usd_day"].items() if d["total"]
        )
        lines.append(
            f"  {f['machines']} machines in all: a node group costs its size x one machine's price, "
            f"power and hosting" + (f" (per routing target: {per})" if per else "")
        )
    for item in fc["not_priced"]:
        lines.append(f"  not priced: {item}")
    lines.append(
        f"Hosted API (${c['api_usd_per_m_input']:g} / ${c['api_usd_per_m_output']:g} per 1M input / output "
        f"tokens): ${fc['api_usd_day']:.2f}/day, ${fc['api_usd_per_1000_notes']:.2f} per 1,000 notes"
    )
    be = fc["break_even_notes_day"]
    if fc["not_priced"] and any("no node price" in item for item in fc["not_priced"]):
        lines.append("Break-even: needs a node price (--node-cost-usd or --rent-usd-hour)")
    elif be is None:
        lines.append("Break-even: none (the API is free at these prices)")
    else:
        lines.append(f"Break-even: this fleet costs what the API does at {be:,.0f} notes/day")
    for name, sc in c["smallest_fleets"].items():
        be = sc["break_even_notes_day"]
        lines.append(
            f"Smallest fleet of {name} for p95 <= {sc['sla_p95_s']:g} s ({sc['count']} nodes"
            + (
                f", {sc['machines']} machines"
                if sc.get("machines", sc["count"]) != sc["count"]
                else ""
            )
            + "): "
            f"${sc['fleet_usd_day']:.2f}/day, ${sc['fleet_usd_per_1000_notes']:.2f} per 1,000 notes"
            + (f", break-even {be:,.0f} notes/day" if be is not None else "")
        )
    r = c["field_report"]
    lines.append(
        f"Field report for comparison: API ${r['report_api_usd_day']:g}/day and rented A100s "
        f"${r['report_rented_a100_usd_day']:g}/day at 6,000 notes (3M in + 1.5M out tokens; these API "
        f"prices give ${r['api_usd_day_at_report_volume']:.2f}/day there), break-even ~"
        f"{r['report_break_even_notes_day']:,} notes/day"
    )
    for p in doc["plots"]:
        lines.append(f"Plot: {p}")
    return "\n".join(lines)


__all__ = ["plan", "parse_fleet", "build_report", "render", "EXIT_BAD_INPUT"]
