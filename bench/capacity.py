"""The capacity planner against a real fleet (issue 21): profile each node of a tiny-model
fleet with `fleetctl profile`'s module, then replay traffic (`fleetctl replay`'s engine) at
about 30 %, 60 % and 90 % of the planner's predicted capacity and print predicted against
measured p50 and p95 time per note and throughput, with the error in percent. The live
headroom's closed form (what the coordinator exports) is printed beside the simulator's p95.
Goal: the simulator's p95 error <= 10 % at all three loads. mTLS on every hop, as in
production; everything on this machine. The model is the Qwen-vocab tiny model (`fleetctl
model make-tiny --vocab qwen2.5`; --vocab trained: the 512-token one), whose steps are long
beside the relay's CPU per token, as a 72B's are. Each node runs on a CPU of its own where
the machine has one per node (`--node-cpus shared`: every process on every CPU), the
coordinator and callers on the rest or, with no CPU to spare, on all of them; the nodes still
share this machine's memory bandwidth and caches, so the planner takes them for one host
and the bench measures how many it runs at full speed at once (host parallelism, from a
note on each node alone and then on all at once). Each load prints the CPU each process used.

    .venv/bin/python bench/capacity.py                  # 2 nodes, ~7 min on 2 CPUs
    .venv/bin/python bench/capacity.py --nodes 1        # one node (~5 min)
    .venv/bin/python bench/capacity.py --seconds 45     # shorter windows, noisier p95s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from bench.capacity_rig import (  # noqa: E402
    cpu_seconds,
    host_parallelism,
    note_parallelism,
    profile_node,
)
from cluster.capacity import replay as rp  # noqa: E402
from cluster.capacity.headroom import FleetModel, NodeModel, TokenMix, fleet_p95_s  # noqa: E402
from cluster.capacity.plan import node_notes_per_s  # noqa: E402
from cluster.capacity.workload import build_workload  # noqa: E402
from cluster.client import AsyncFleetClient  # noqa: E402
from cluster.localfleet import HARNESS_APP, CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.security.ca import init_ca  # noqa: E402
from cluster.security.identity import Role  # noqa: E402
from cluster.tinymodel import TinyModelSpec, make_tiny_model, qwen25_spec  # noqa: E402

GOAL_P95_ERROR_PCT = 10.0


async def calibrate(coordinator: CoordinatorProcess) -> rp.PromptBuilder:
    """Prompts of the wanted lengths for the fleet's tokenizer (as fleetctl replay does)."""
    builder = rp.PromptBuilder(request_prefix=f"{rp.new_run_id()}-cal")
    async with AsyncFleetClient(
        coordinator.address, tls=coordinator.credentials(HARNESS_APP, Role.APP), max_attempts=1
    ) as client:
        await builder.calibrate(client)
    return builder


async def replay_at(
    coordinator: CoordinatorProcess,
    builder: rp.PromptBuilder,
    workload,
    seconds: float,
    seed: int,
    fleet,
    nodes_per_host: int,
    parallel: float,
) -> rp.ReplayReport:
    """`fleetctl replay --predict-with`, in process: `seconds` of the workload's arrivals."""
    notes, start, length = rp.plan_notes(
        workload, time_scale=1.0, duration_s=seconds, seed=seed, start_s=0.0
    )
    tls = coordinator.credentials(HARNESS_APP, Role.APP)
    run_id = rp.new_run_id()
    async with AsyncFleetClient(coordinator.address, tls=tls, max_attempts=1) as client:
        outcomes, wall = await rp.run_notes(client, builder, notes, run_id=run_id, timeout_s=300)
    report = rp.build_report(
        run_id,
        coordinator.address,
        outcomes,
        wall,
        notes,
        time_scale=1.0,
        window_start_s=start,
        window_s=length,
        calibration_requests=0,
    )
    rp.add_prediction(report, fleet, notes, nodes_per_host, parallel)
    return report


async def lone_notes(
    coordinator: CoordinatorProcess,
    builder: rp.PromptBuilder,
    workload,
    fleet,
    nodes_per_host: int,
    parallel: float,
    count: int = 5,
) -> tuple[float, float]:
    """`count` notes one at a time (nothing else in flight): the mean measured time per note
    and the simulator's for the same notes. Separates the fit's error from contention."""
    import random

    rng = random.Random(0)
    tls = coordinator.credentials(HARNESS_APP, Role.APP)
    measured, predicted = [], []
    async with AsyncFleetClient(coordinator.address, tls=tls, max_attempts=1) as client:
        for i in range(count):
            p, o = workload.sample_tokens(rng)
            note = rp.PlannedNote(i, 0.0, p, o)
            outcomes, _ = await rp.run_notes(
                client, builder, [note], run_id=f"{rp.new_run_id()}-lone", timeout_s=120
            )
            if outcomes[0].outcome == "completed":
                measured.append(outcomes[0].total_s)
                predicted.append(rp.predict(fleet, [note], nodes_per_host, parallel).p50_s)
    return sum(measured) / max(1, len(measured)), sum(predicted) / max(1, len(predicted))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--max-running", type=int, default=8, help="each node's slots")
    ap.add_argument(
        "--seconds",
        type=float,
        default=90.0,
        help="real seconds of arrivals per load (90: about 60, 110 and 175 notes on one tiny "
        "node, enough for a p95 near capacity)",
    )
    ap.add_argument("--prompt-tokens", default="500")
    ap.add_argument(
        "--output-tokens",
        default="100:150",
        help="the notes' output lengths (default 100:150, not the clinic's 400:600: the Qwen-vocab "
        "tiny model decodes one note at ~50-100 tokens/s, so 500-token notes would leave too few "
        "notes in a window for a p95)",
    )
    ap.add_argument("--loads", default="0.3,0.6,0.9", help="fractions of the planner's capacity")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--profile-together",
        action="store_true",
        help="profile every node at the same time (co-located nodes share this host's cores, as they "
        "do while serving) instead of one at a time with the others idle",
    )
    ap.add_argument(
        "--nodes-per-host",
        type=int,
        default=0,
        help="how many nodes the planner puts on one host, sharing its compute (default: all of "
        "them, since they all run on this machine; 1 models each node on a host of its own)",
    )
    ap.add_argument(
        "--host-parallelism",
        type=float,
        default=None,
        help="how many of a host's nodes run at full speed at once (default: measured, as "
        "--parallelism-from says)",
    )
    ap.add_argument(
        "--parallelism-from",
        choices=("notes", "decode"),
        default="notes",
        help="measure host parallelism from whole notes (prefill and decode, one per node alone "
        "and then all at once, through the fleet's coordinator) or from 8-sequence decode steps",
    )
    ap.add_argument(
        "--profile-through",
        choices=("coordinator", "node"),
        default="coordinator",
        help="profile each node through a coordinator of that node alone (the path the replayed "
        "notes take: the relay's cost per token is in the fit) or directly",
    )
    ap.add_argument(
        "--node-cpus",
        choices=("auto", "shared"),
        default="auto",
        help="auto: where this machine has a CPU for each node, each node runs on a CPU of its "
        "own and the coordinator and callers on the rest (on all CPUs when none is left); "
        "shared: everything on every CPU",
    )
    ap.add_argument(
        "--vocab",
        choices=("qwen2.5", "trained"),
        default="qwen2.5",
        help="the tiny model's vocabulary: qwen2.5 (`fleetctl model make-tiny --vocab qwen2.5`, "
        "Qwen2.5's tokenizer and 151,936-row embedding, so clinical text has its real token counts "
        "and a step's logits its real width) or trained (the 512-token test vocabulary, whose "
        "steps are so short that relaying the tokens costs about as much CPU as making them)",
    )
    ap.add_argument(
        "--full-profile",
        action="store_true",
        help="profile as `fleetctl profile` does (longer contexts, more points) rather than --quick",
    )
    args = ap.parse_args()
    # SIGTERM (a timeout) unwinds like Ctrl-C, so the finally below stops every daemon started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    loads = [float(x) for x in args.loads.split(",")]
    allowed = sorted(os.sched_getaffinity(0))
    pinned = args.node_cpus == "auto" and len(allowed) >= args.nodes
    node_cpus = [{allowed[-(i + 1)]} for i in range(args.nodes)] if pinned else []
    # With no CPU to spare, the coordinators and callers share the nodes' (the relay's CPU per
    # token, small beside a step of the Qwen-vocab model, then slows the nodes a little).
    rest = (set(allowed) - set().union(*node_cpus) or set(allowed)) if pinned else set(allowed)
    per_host = args.nodes_per_host or args.nodes  # one machine: its memory and caches are shared
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        work = Path(tmp)
        spec = qwen25_spec() if args.vocab == "qwen2.5" else TinyModelSpec()
        model = make_tiny_model(work / "model", spec)
        certs = work / "ca"
        init_ca(certs, fleet="bench")
        logs = work / "logs"
        nodes = [
            NodeProcess(
                model,
                "--max-running",
                str(args.max_running),
                "--max-queued",
                "256",
                node_id=f"cap-node-{i + 1}",
                tls_dir=certs,
            )
            for i in range(args.nodes)
        ]
        coordinator = None
        try:
            for i, node in enumerate(nodes):
                if pinned:  # the node (and every thread it starts) inherits this CPU
                    os.sched_setaffinity(0, node_cpus[i])
                node.start(logs)
            os.sched_setaffinity(0, rest)  # this process and the coordinators it starts
            for node in nodes:
                node.wait_serving()
            coordinator = CoordinatorProcess(
                nodes=[n.address for n in nodes], name="cap-coordinator", tls_dir=certs
            )
            coordinator.start(logs)
            coordinator.wait_routable(args.nodes)
            print(
                f"fleet: {args.nodes} tiny-model nodes ({args.vocab} vocabulary) ({args.max_running} slots each) behind a coordinator, mTLS; "
                f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes share them)",
                flush=True,
            )
            print(
                "CPUs: "
                + (
                    ", ".join(f"{n.node_id} on {sorted(c)}" for n, c in zip(nodes, node_cpus))
                    + f", coordinators and callers on {sorted(rest)}"
                    if pinned
                    else "every process on every CPU"
                ),
                flush=True,
            )
            vias = []
            if args.profile_through == "coordinator":
                for node in nodes:
                    via = CoordinatorProcess(
                        nodes=[node.address], name=f"profile-{node.node_id}", tls_dir=certs
                    )
                    vias.append(via)
                    via.start(logs)
                    via.wait_routable(1)
            t0 = time.monotonic()
            try:
                pairs = list(zip(nodes, vias or [None] * len(nodes), strict=True))
                if (
                    args.profile_together
                ):  # nodes sharing this host's cores, profiled as they serve: together

                    async def together():
                        return await asyncio.gather(
                            *(profile_node(n, v, not args.full_profile) for n, v in pairs)
                        )

                    profiles = list(asyncio.run(together()))
                else:
                    profiles = [
                        asyncio.run(profile_node(n, v, not args.full_profile)) for n, v in pairs
                    ]
                # From whole notes needs the fleet's coordinator to give each node one at once:
                # every node on one host. Otherwise from decode steps, per host.
                by_notes = args.parallelism_from == "notes" and per_host == args.nodes
                if per_host > 1 and args.host_parallelism is None and not by_notes:
                    parallel, alone, together = asyncio.run(
                        host_parallelism(pairs[:per_host], args.max_running)
                    )
                    print(
                        f"host parallelism {parallel:.2f}: {args.max_running}-sequence decode "
                        f"steps {', '.join(f'{a * 1e3:.2f}' for a in alone)} ms alone, "
                        f"{', '.join(f'{t * 1e3:.2f}' for t in together)} ms all at once",
                        flush=True,
                    )
                else:
                    parallel = args.host_parallelism or 1.0
            finally:
                for via in vias:
                    via.stop()
            how = ("through a coordinator of it alone" if vias else "directly") + (
                ", all nodes at once" if args.profile_together else ", one node at a time"
            )
            print(f"profiled {len(nodes)} nodes {how} in {time.monotonic() - t0:.0f} s", flush=True)
            for node, prof in zip(nodes, profiles, strict=True):
                f = prof.fit
                print(
                    f"  {node.node_id}: decode {f.decode_base_s * 1e3:.2f} ms + {f.decode_per_seq_s * 1e3:.3f} ms/seq "
                    f"+ {f.decode_per_ctx_token_s * 1e6:.3f} us/ctx token, prefill {f.prefill_base_s * 1e3:.1f} ms + "
                    f"{f.prefill_per_token_s * 1e6:.1f} us/token",
                    flush=True,
                )
            fleet = [(p, 1) for p in profiles]
            shape = build_workload(
                notes_per_day=1.0,
                hours="0-24",
                peak_factor=1.0,
                prompt_tokens=args.prompt_tokens,
                output_tokens=args.output_tokens,
            )
            builder = asyncio.run(calibrate(coordinator))
            if per_host > 1 and args.host_parallelism is None and by_notes:
                parallel, alone_s, together_s = asyncio.run(
                    note_parallelism(coordinator, builder, shape, per_host)
                )
                print(
                    f"host parallelism {parallel:.2f}: notes {alone_s:.2f} s alone, "
                    f"{together_s:.2f} s {per_host} at once (one per node), 3 rounds",
                    flush=True,
                )
            # Nodes sharing a host share its compute: a host does what its average node does
            # alone, times how many it runs at full speed at once.
            hosts = [profiles[i : i + per_host] for i in range(0, len(profiles), per_host)]
            capacity = sum(
                sum(node_notes_per_s(p, shape) for p in h) / len(h) * min(parallel, len(h))
                for h in hosts
            )
            print(
                f"planner's capacity: {capacity:.2f} notes/s (prompt {args.prompt_tokens}, output "
                f"{args.output_tokens} tokens; {per_host} node(s) per host sharing its compute, "
                f"{parallel:.2f} at full speed); "
                f"{args.seconds:g} s of Poisson arrivals per load",
                flush=True,
            )
            rows = []
            for i, load in enumerate(loads):
                if i == 0:  # a few lone notes first
                    lone_m, lone_p = asyncio.run(
                        lone_notes(coordinator, builder, shape, fleet, per_host, parallel)
                    )
                    print(
                        f"lone notes (one at a time): measured {lone_m:.2f} s, predicted {lone_p:.2f} s "
                        f"({100 * (lone_p - lone_m) / lone_m:+.1f} %); load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                rate = load * capacity
                workload = build_workload(
                    notes_per_day=rate * 86_400,
                    hours="0-24",
                    peak_factor=1.0,
                    prompt_tokens=args.prompt_tokens,
                    output_tokens=args.output_tokens,
                )
                procs = {n.node_id: n.proc.pid for n in nodes}
                procs.update(coordinator=coordinator.proc.pid, client=os.getpid())
                cpu0, t_cpu = cpu_seconds(procs), time.monotonic()
                report = asyncio.run(
                    replay_at(
                        coordinator,
                        builder,
                        workload,
                        args.seconds,
                        args.seed + i,
                        fleet,
                        per_host,
                        parallel,
                    )
                )
                mix = TokenMix(
                    prompt_mean=workload.mean_prompt_tokens,
                    prompt_p95=workload.prompt.lo
                    + 0.95 * (workload.prompt.hi - workload.prompt.lo),
                    output_mean=workload.mean_output_tokens,
                    output_p95=workload.output.lo
                    + 0.95 * (workload.output.hi - workload.output.lo),
                )
                closed = fleet_p95_s(
                    FleetModel.of(
                        [NodeModel(p.name, p.fit, p.limits.max_running) for p in profiles], mix
                    ),
                    rate,
                )
                rows.append((load, rate, report, closed))
                used = {k: v - cpu0[k] for k, v in cpu_seconds(procs).items()}
                wall = max(time.monotonic() - t_cpu, 1e-9)
                print(
                    "  CPU while replaying (share of one CPU): "
                    + ", ".join(f"{k} {v / wall:.0%}" for k, v in used.items()),
                    flush=True,
                )
                m = report.measured
                print(
                    f"load {load:.0%}: {m.completed}/{m.notes} notes completed, {report.outcomes}, driver lag p99 "
                    f"{report.send_late_p99_s * 1e3:.0f} ms",
                    flush=True,
                )
        finally:
            if coordinator is not None:
                coordinator.stop()
            for node in nodes:
                node.stop()
    print()
    print(
        f"{'load':>5} {'offered/s':>9} {'notes':>5} | {'p50 meas':>8} {'pred':>6} {'err':>7} | {'p95 meas':>8} "
        f"{'pred':>6} {'err':>7} {'closed':>6} {'err':>7} | {'notes/s meas':>12} {'pred':>6} {'err':>7}"
    )
    worst = 0.0
    for load, rate, r, closed in rows:
        m, p, e = r.measured, r.predicted, r.error_pct
        closed_err = 100.0 * (closed - m.p95_s) / m.p95_s if m.p95_s else float("nan")
        worst = max(worst, abs(e.get("p95_s", float("inf"))))
        print(
            f"{load:>5.0%} {rate:>9.2f} {m.notes:>5} | {m.p50_s:>7.2f}s {p.p50_s:>5.2f}s {e.get('p50_s', 0):>+6.1f}% | "
            f"{m.p95_s:>7.2f}s {p.p95_s:>5.2f}s {e.get('p95_s', 0):>+6.1f}% {closed:>5.2f}s {closed_err:>+6.1f}% | "
            f"{m.notes_per_s:>12.2f} {p.notes_per_s:>6.2f} {e.get('notes_per_s', 0):>+6.1f}%"
        )
    met = worst <= GOAL_P95_ERROR_PCT
    print(
        f"\ngoal: simulator p95 error <= {GOAL_P95_ERROR_PCT:g} % at every load: {'MET' if met else 'NOT MET'} "
        f"(worst {worst:.1f} %); pred = the planner's simulator (fleetctl replay --predict-with --nodes-per-host), closed = the "
        f"coordinator's live headroom model (which takes every node for a host of its own); "
        f"{time.monotonic() - started:.0f} s in all; load average at the end {os.getloadavg()[0]:.1f}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
