"""A rolling update of a 3-node fleet under constant load: requests served and failed,
latency before vs during the rollout, and the least serving capacity seen. Every repeat
measures a window of steady traffic first (the baseline), then rolls the fleet to the
other model (v1 -> v2, then back) under the same traffic. One run, mTLS on every hop
and the audit chain on, as in production. Goal: 0 failed, p99 during <= 1.5x before.

    .venv/bin/python bench/rollout.py               # ~2 min on 2 cores
    .venv/bin/python bench/rollout.py --repeats 1   # one rollout
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import grpc  # noqa: E402

from bench.coordinator import NODE_ARGS, pct, request  # noqa: E402
from cluster.api import fleet_pb2, fleet_pb2_grpc, inference_pb2_grpc  # noqa: E402
from cluster.localfleet import CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.security.ca import init_ca  # noqa: E402
from cluster.security.identity import Role, dns_name  # noqa: E402
from cluster.security.tls import open_channel  # noqa: E402
from cluster.tinymodel import TinyModelSpec, make_tiny_model  # noqa: E402

TERMINAL = (
    fleet_pb2.ROLLOUT_STATE_SUCCEEDED,
    fleet_pb2.ROLLOUT_STATE_FAILED,
    fleet_pb2.ROLLOUT_STATE_ABORTED,
)


class Traffic:
    """`callers` streams sending requests back to back; each result is (start, latency ms, error)."""

    def __init__(self, channel, callers: int, max_tokens: int):
        self._stub = inference_pb2_grpc.InferenceStub(channel)
        self._max_tokens = max_tokens
        self.results: list[tuple[float, float, str]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._caller(c)) for c in range(callers)]

    async def _caller(self, c: int) -> None:
        i = 0
        while not self._stop.is_set():
            start = time.monotonic()
            error = ""
            try:
                async for _chunk in self._stub.Generate(
                    request(c * 100_000 + i, self._max_tokens, f"c{c}"), timeout=120
                ):
                    pass
            except grpc.aio.AioRpcError as err:
                error = f"{err.code().name}: {err.details()}"
            self.results.append((start, (time.monotonic() - start) * 1000.0, error))
            i += 1

    def window(self, t0: float, t1: float) -> list[tuple[float, float, str]]:
        return [r for r in self.results if t0 <= r[0] < t1]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def roll(
    fleet: fleet_pb2_grpc.FleetStub, model: Path, rid: str
) -> tuple[float, int, fleet_pb2.Rollout]:
    """Start a rollout to `model` and follow it; returns (seconds, least routable nodes, rollout)."""
    least = 99
    start = time.monotonic()
    await fleet.StartRollout(
        fleet_pb2.StartRolloutRequest(
            target=fleet_pb2.RolloutTarget(model_path=str(model)), rollout_id=rid
        ),
        timeout=60,
    )
    while True:
        listing = await fleet.ListNodes(fleet_pb2.ListNodesRequest(), timeout=5)
        least = min(least, sum(n.routable for n in listing.nodes))
        r = await fleet.GetRollout(fleet_pb2.GetRolloutRequest(rollout_id=rid), timeout=5)
        if r.state in TERMINAL:
            return time.monotonic() - start, least, r
        await asyncio.sleep(0.05)  # capacity is sampled 20 times a second


async def measure(
    co: CoordinatorProcess,
    models: list[Path],
    repeats: int,
    callers: int,
    max_tokens: int,
    baseline_s: float,
) -> list[dict]:
    app = open_channel(
        co.address,
        co.credentials("bench-app", Role.APP),
        aio=True,
        server_name=dns_name(Role.COORDINATOR, co.name),
    )
    ops = open_channel(
        co.address,
        co.credentials("bench-operator", Role.OPERATOR),
        aio=True,
        server_name=dns_name(Role.COORDINATOR, co.name),
    )
    fleet = fleet_pb2_grpc.FleetStub(ops)
    traffic = Traffic(app, callers, max_tokens)
    rows = []
    try:
        await asyncio.sleep(3.0)  # warm-up traffic, not measured
        for r in range(repeats):
            t0 = time.monotonic()
            await asyncio.sleep(baseline_s)  # the baseline window: steady traffic, no rollout
            t1 = time.monotonic()
            seconds, least, rollout = await roll(
                fleet, models[(r + 1) % 2], f"bench-{os.getpid()}-{r}"
            )
            t2 = time.monotonic()
            before, during = traffic.window(t0, t1), traffic.window(t1, t2)
            rows.append(
                {
                    "before": before,
                    "during": during,
                    "seconds": seconds,
                    "least": least,
                    "state": fleet_pb2.RolloutState.Name(rollout.state),
                }
            )
            print(
                f"  repeat {r + 1}/{repeats}: rollout {rows[-1]['state']} in {seconds:.1f}s, "
                f"{len(during)} requests during ({sum(1 for x in during if x[2])} failed), "
                f"least routable {least}",
                flush=True,
            )
    finally:
        await traffic.stop()
        await app.close()
        await ops.close()
    return rows


def report(rows: list[dict], nodes: int) -> None:
    before = [x for row in rows for x in row["before"]]
    during = [x for row in rows for x in row["during"]]
    lat_b = [x[1] for x in before if not x[2]]
    lat_d = [x[1] for x in during if not x[2]]
    failed = [x[2] for x in before + during if x[2]]
    p99_b, p99_d = pct(lat_b, 0.99), pct(lat_d, 0.99)
    print("\n| measure | before the rollout | during the rollout | during / before |")
    print("|---|---|---|---|")
    print(f"| requests served | {len(lat_b)} | {len(lat_d)} | |")
    print(
        f"| requests failed | {sum(1 for x in before if x[2])} | {sum(1 for x in during if x[2])} | |"
    )
    print(
        f"| latency p50 ms | {pct(lat_b, 0.5):.0f} | {pct(lat_d, 0.5):.0f} | {pct(lat_d, 0.5) / pct(lat_b, 0.5):.2f}x |"
    )
    print(
        f"| latency p99 ms | {p99_b:.0f} | {p99_d:.0f} | **{p99_d / p99_b:.2f}x** (goal <= 1.5x) |"
    )
    print(f"| rollout seconds (median) | | {statistics.median(r['seconds'] for r in rows):.1f} | |")
    print(
        f"| least routable nodes | {nodes} | {min(r['least'] for r in rows)} | (goal >= {nodes - 1}) |"
    )
    for error in sorted(set(failed))[:5]:
        print(f"failed: {error}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--repeats", type=int, default=6, help="rollouts (alternating v1 -> v2 -> v1 ...)"
    )
    ap.add_argument("--callers", type=int, default=8, help="concurrent request streams")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--baseline-s", type=float, default=10.0, help="steady traffic measured before each rollout"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="studiofleet-bench-rollout-") as tmp:
        work = Path(tmp)
        tls = work / "tls"
        init_ca(tls)
        print("==> generating two tiny models (v1, v2)", flush=True)
        models = [make_tiny_model(work / "v1"), make_tiny_model(work / "v2", TinyModelSpec(seed=7))]
        nodes = [
            NodeProcess(models[0], *NODE_ARGS, node_id=f"bench-node-{i}", tls_dir=tls)
            for i in range(3)
        ]
        co = CoordinatorProcess(nodes=(), name="bench-coordinator", tls_dir=tls)
        try:
            for n in nodes:
                n.start(work / "logs")
            for n in nodes:
                n.wait_serving()
            co.args += [a for n in nodes for a in ("--node", n.address)]
            co.start(work / "logs")
            co.wait_routable(len(nodes))
            print(
                f"==> 3 nodes, {args.callers} callers x {args.max_tokens}-token requests, "
                f"{args.baseline_s:g}s baseline + one rollout per repeat",
                flush=True,
            )
            rows = asyncio.run(
                measure(co, models, args.repeats, args.callers, args.max_tokens, args.baseline_s)
            )
        finally:
            co.stop()
            for n in nodes:
                n.stop()
        report(rows, len(nodes))


if __name__ == "__main__":
    main()
