"""The capacity bench's rig (bench/capacity.py): profiling a node through a coordinator of it
alone, measuring how many of one machine's nodes run at full speed at once, and the CPU
each process used."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from cluster.capacity import measure
from cluster.capacity import replay as rp
from cluster.capacity.profile import Profile
from cluster.capacity.workload import NOTE_TEMPERATURE
from cluster.client import AsyncFleetClient
from cluster.localfleet import HARNESS_APP, HARNESS_NODE_CALLER, CoordinatorProcess, NodeProcess
from cluster.security.identity import ANY_NODE, Role


def client_for(node: NodeProcess, via: CoordinatorProcess | None) -> AsyncFleetClient:
    """Through `via`, a coordinator of this node alone (the path the replayed notes take), or
    with None straight to the node (`--node`)."""
    if via is None:
        return AsyncFleetClient(
            node.address,
            tls=node.credentials(HARNESS_NODE_CALLER, Role.COORDINATOR),
            server_name=ANY_NODE,
        )
    return AsyncFleetClient(via.address, tls=via.credentials(HARNESS_APP, Role.APP), max_attempts=1)


async def profile_node(
    node: NodeProcess, via: CoordinatorProcess | None, quick: bool = True
) -> Profile:
    """`fleetctl profile [--quick]`, in process (see client_for for the path)."""
    before = node.status()
    limits = measure.limits_of(before)
    async with client_for(node, via) as client:
        prober = measure.Prober(
            client,
            limits,
            node_id="" if via is None else before.node_id,
            timeout_s=120,
            temperature=NOTE_TEMPERATURE,  # the replayed notes' sampling
        )
        measured = await measure.measure(prober, measure.plan_sizes(limits, quick=quick))
    fitted = measure.fit(measured)
    return measure.build_profile(
        before,
        node.status(),
        measured,
        fitted,
        command="bench/capacity.py",
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        through=f"directly on {node.address}" if via is None else f"through {via.address}",
        temperature=NOTE_TEMPERATURE,
    )


def parallelism(nodes: int, alone: list[float], together: list[float]) -> float:
    """P = nodes / the mean slowdown (together / alone, pairwise), within [1, nodes]: 1 when
    one node alone keeps the host busy, `nodes` when they do not slow each other."""
    slowdown = sum(t / a for t, a in zip(together, alone, strict=True)) / len(alone)
    return min(float(nodes), max(1.0, nodes / slowdown))


async def host_parallelism(pairs, running: int, context: int = 512, steps: int = 40):
    """How many of this host's nodes run at full speed at once: each node's decode step with
    `running` sequences alone, then all nodes' at the same time (`parallelism`). Returns (P, the steps alone, the steps together)."""

    async def step(node, via) -> float:
        async with client_for(node, via) as client:
            prober = measure.Prober(
                client,
                measure.limits_of(node.status()),
                node_id="" if via is None else node.node_id,
                timeout_s=120,
                temperature=NOTE_TEMPERATURE,
            )
            await prober.calibrate()
            return (await prober.decode_point(running, context, steps)).step_s

    alone = [await step(n, v) for n, v in pairs]
    together = await asyncio.gather(*(step(n, v) for n, v in pairs))
    return parallelism(len(pairs), alone, together), alone, together


async def note_parallelism(
    coordinator: CoordinatorProcess,
    builder: rp.PromptBuilder,
    workload,
    nodes: int,
    rounds: int = 3,
):
    """How many of this host's nodes run at full speed at once, from whole notes (a prompt's
    prefill and its decode, as the replay sends them): each round, `nodes` notes one at a
    time, then the same notes all at once (the router gives each node one; `parallelism`).
    Returns (P, mean note alone, mean note together)."""
    import random

    rng = random.Random(7)
    tls = coordinator.credentials(HARNESS_APP, Role.APP)
    alone: list[float] = []
    together: list[float] = []
    async with AsyncFleetClient(coordinator.address, tls=tls, max_attempts=1) as client:
        for r in range(rounds):
            notes = [rp.PlannedNote(i, 0.0, *workload.sample_tokens(rng)) for i in range(nodes)]
            for note in notes:
                out, _ = await rp.run_notes(
                    client, builder, [note], run_id=f"{rp.new_run_id()}-p{r}", timeout_s=120
                )
                alone.append(out[0].total_s)
            out, _ = await rp.run_notes(
                client, builder, notes, run_id=f"{rp.new_run_id()}-p{r}-all", timeout_s=120
            )
            if any(o.outcome != "completed" for o in out):
                raise RuntimeError(f"a note failed while measuring host parallelism: {out}")
            together += [o.total_s for o in out]
    return (
        parallelism(nodes, alone, together),
        sum(alone) / len(alone),
        sum(together) / len(together),
    )


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, threads included) each process has used so far."""
    import psutil

    out = {}
    for name, pid in pids.items():
        t = psutil.Process(pid).cpu_times()
        out[name] = t.user + t.system
    return out
