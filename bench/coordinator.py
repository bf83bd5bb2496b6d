"""What the coordinator costs and what it buys: one run, one table.

- overhead: time to first token p50/p99 and aggregate tokens/s at 1, 16 and 64
  concurrent streams, through the coordinator vs straight to the same node, with a bare
  grpc.aio pass-through (bench/bare_relay.py) beside them to show what any Python gRPC
  hop costs; the three interleaved per repeat so machine noise hits them alike (goal:
  >= 0.95x throughput, <= 2 ms added p50 TTFT);
- failover gap: SIGKILL a node under load; for each stream it was serving, the time
  from the kill to that stream's next token (goal: p99 < 1 s);
- discovery: a node agent announces itself over mDNS on loopback; the time from its
  READY (its own log) to the first token of a request routed to it (goal: < 2 s).

By default node, coordinator and callers share this machine's cores, so every CPU-second
the coordinator spends is taken from the node's decode: the worst case. `--pin` gives
the node CPU 0 and puts the coordinator and callers on CPU 1, as when the coordinator
runs on its own control host (Linux only).

    .venv/bin/python bench/coordinator.py             # ~4 min on 2 cores
    .venv/bin/python bench/coordinator.py --quick     # fewer repeats, ~1.5 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import grpc  # noqa: E402

from cluster.api import inference_pb2, inference_pb2_grpc  # noqa: E402
from cluster.client import build_request  # noqa: E402
from cluster.localfleet import CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.metrics import percentile as pct  # noqa: E402 - also imported from here by other benchmarks
from cluster.tinymodel import make_tiny_model  # noqa: E402

SYSTEM = "You are a clinical documentation assistant."
NODE_ARGS = ("--max-running", "64", "--max-queued", "64")


def request(i: int, max_tokens: int, tag: str) -> inference_pb2.GenerateRequest:
    return build_request(
        messages=[("system", SYSTEM), ("user", f"Synthetic visit {tag}-{i}: follow-up.")],
        max_tokens=max_tokens,
        request_id=f"{tag}-{i}",
        temperature=0.0,
    )


async def load(
    address: str, streams: int, per_stream: int, max_tokens: int, tag: str
) -> tuple[float, list[float]]:
    """`streams` callers, each sending `per_stream` requests back to back; (tokens/s, TTFTs ms)."""
    async with grpc.aio.insecure_channel(address) as channel:
        return await load_on(channel, streams, per_stream, max_tokens, tag)


async def load_on(
    channel, streams: int, per_stream: int, max_tokens: int, tag: str
) -> tuple[float, list[float]]:
    """As `load`, over a channel the caller opened (e.g. with mTLS credentials)."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    ttfts: list[float] = []
    tokens = 0

    async def caller(c: int) -> None:
        nonlocal tokens
        for k in range(per_stream):
            start = time.perf_counter()
            first = None
            async for chunk in stub.Generate(
                request(c * per_stream + k, max_tokens, tag), timeout=300
            ):
                if first is None and chunk.token_ids:
                    first = time.perf_counter()
                tokens += len(chunk.token_ids)
            ttfts.append((first - start) * 1000.0)

    start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(streams)))
    return tokens / (time.perf_counter() - start), ttfts


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def overhead(
    model: Path, logs: Path, repeats: int, levels=(1, 16, 64), pinned: bool = False
) -> list[tuple]:
    """Per level: {path: (median tokens/s, TTFTs)} for direct, bare relay and coordinator,
    interleaved per repeat (rotating the order)."""
    rows = []
    with NodeProcess(model, *NODE_ARGS, node_id="bench-node") as node:
        node.start(logs)
        node.wait_serving()
        with CoordinatorProcess(nodes=[node.address], name="bench-coordinator") as co:
            co.start(logs)
            co.wait_routable(1)
            relay = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "bare_relay.py"), node.address],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                paths = {
                    "direct": node.address,
                    "bare": f"127.0.0.1:{int(relay.stdout.readline())}",
                    "coordinator": co.address,
                }
                if pinned:  # the node gets CPU 0 to itself; relays and callers share CPU 1
                    pin(node.proc.pid, {0})
                    for pid in (co.proc.pid, relay.pid, os.getpid()):
                        pin(pid, {1})
                for streams in levels:
                    rows.append((streams, _level(paths, streams, repeats)))
            finally:
                relay.kill()
                relay.wait()
    return rows


def _level(
    paths: dict[str, str], streams: int, repeats: int
) -> dict[str, tuple[float, list[float]]]:
    per_stream, max_tokens = max(2, 32 // streams), 64
    tps = {k: [] for k in paths}
    ttft = {k: [] for k in paths}
    for address in paths.values():
        asyncio.run(load(address, streams, 1, 8, "warm"))
    names = list(paths)
    for r in range(repeats):
        for name in names[r % 3 :] + names[: r % 3]:
            t, lat = asyncio.run(load(paths[name], streams, per_stream, max_tokens, f"r{r}"))
            tps[name].append(t)
            ttft[name].extend(lat)
        print(
            f"  {streams:>2} streams, repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in tps.items()),
            flush=True,
        )
    return {k: (statistics.median(tps[k]), ttft[k]) for k in paths}


def failover_gaps(model: Path, logs: Path, rounds: int, streams: int = 16) -> list[float]:
    """Kill one of two nodes while `streams` run; the gap each interrupted stream saw."""
    gaps: list[float] = []
    for r in range(rounds):
        with (
            NodeProcess(model, *NODE_ARGS, node_id=f"gap-a{r}") as a,
            NodeProcess(model, *NODE_ARGS, node_id=f"gap-b{r}") as b,
        ):
            a.start(logs)
            b.start(logs)
            a.wait_serving()
            b.wait_serving()
            with CoordinatorProcess(nodes=[a.address, b.address], name=f"gap-coordinator{r}") as co:
                co.start(logs)
                co.wait_routable(2)
                gaps.extend(asyncio.run(_kill_and_time(co.address, a, streams, r)))
        print(
            f"  failover round {r + 1}/{rounds}: {len(gaps)} interrupted streams so far", flush=True
        )
    return gaps


async def _kill_and_time(address: str, victim: NodeProcess, streams: int, r: int) -> list[float]:
    """Each stream records its token arrival times; the coordinator's FAILOVER events say
    which streams moved and after how many tokens, so the gap is measured to the first
    token the new node generated (not to a token already in flight at the kill)."""
    from cluster.api import fleet_pb2, fleet_pb2_grpc

    arrivals: list[list[float]] = [[] for _ in range(streams)]
    flowing = asyncio.Event()

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(i: int) -> None:
            async for chunk in stub.Generate(request(i, 1200, f"gap{r}"), timeout=120):
                now = time.perf_counter()
                arrivals[i].extend([now] * len(chunk.token_ids))
                if min(len(a) for a in arrivals) >= 8:
                    flowing.set()

        tasks = [asyncio.create_task(one(i)) for i in range(streams)]
        await asyncio.wait_for(flowing.wait(), 60)
        killed_at = time.perf_counter()
        victim.proc.kill()
        await asyncio.gather(*tasks)
        moved: dict[int, int] = {}
        events = fleet_pb2_grpc.FleetStub(channel).WatchEvents(
            fleet_pb2.WatchEventsRequest(replay=True), timeout=1
        )
        try:
            async for ev in events:
                if ev.kind == fleet_pb2.EVENT_KIND_FAILOVER and ev.request_id.startswith(
                    f"gap{r}-"
                ):
                    moved[int(ev.request_id.rsplit("-", 1)[1])] = ev.tokens_delivered
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    return [(arrivals[i][k] - killed_at) * 1000.0 for i, k in moved.items()]


def discovery(model: Path, logs: Path, rounds: int) -> list[float]:
    """Node READY (its log line) -> first token of a request that was waiting for it."""
    out = []
    for r in range(rounds):
        fleet = f"bench-{os.getpid()}-{r}"
        with CoordinatorProcess(fleet=fleet, name=f"disc-coordinator{r}") as co:
            co.start(logs)
            co.wait_serving()

            async def first_token() -> float:
                async with grpc.aio.insecure_channel(co.address) as channel:
                    stub = inference_pb2_grpc.InferenceStub(channel)
                    async for chunk in stub.Generate(request(r, 4, "disc"), timeout=60):  # noqa: B023 - run within this iteration
                        if chunk.token_ids:
                            return time.time()
                raise RuntimeError("no token")

            async def scenario() -> float:
                waiting = asyncio.create_task(
                    first_token()
                )  # queued in the coordinator: no node yet
                await asyncio.sleep(0.2)
                with NodeProcess(model, node_id=f"disc-node{r}", fleet=fleet) as node:  # noqa: B023 - run within this iteration
                    await asyncio.to_thread(node.start, logs)
                    t_token = await waiting
                    ready = _ready_time(node)
                return (t_token - ready) * 1000.0

            out.append(asyncio.run(scenario()))
        print(f"  discovery round {r + 1}/{rounds}: {out[-1]:.0f} ms", flush=True)
    return out


def _ready_time(node: NodeProcess) -> float:
    """The wall-clock time of the node's own 'WARMING -> READY' log line."""
    for line in node.stderr().splitlines():
        if "-> READY" in line:
            stamp = re.match(r"(\S+ \S+)", line).group(1)
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"{node.node_id} never logged READY")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--streams",
        type=int,
        nargs="*",
        default=[1, 16, 64],
        help="concurrency levels for the overhead rows",
    )
    parser.add_argument("--only-overhead", action="store_true")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="node on CPU 0, coordinator and callers on CPU 1 (a control host's view)",
    )
    args = parser.parse_args()
    repeats, rounds = (2, 2) if args.quick else (4, 4)
    with tempfile.TemporaryDirectory(prefix="bench-coordinator-") as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model")
        logs = tmp / "logs"
        print(f"overhead ({repeats} interleaved repeats per cell)", flush=True)
        rows = overhead(model, logs, repeats, args.streams, args.pin)
        gaps, disc = [], []
        if not args.only_overhead:
            print(f"failover ({rounds} rounds, 16 streams over 2 nodes, one SIGKILLed)", flush=True)
            gaps = failover_gaps(model, logs, rounds)
            print(f"discovery ({rounds} rounds)", flush=True)
            disc = discovery(model, logs, rounds)

    print(
        "\n| measure | direct | bare gRPC relay | via coordinator | coordinator vs direct | goal |"
    )
    print("|---|---|---|---|---|---|")
    for streams, cell in rows:
        (d_tps, d_lat), (b_tps, b_lat), (v_tps, v_lat) = (
            cell["direct"],
            cell["bare"],
            cell["coordinator"],
        )
        print(
            f"| {streams} streams: tokens/s | {d_tps:.0f} | {b_tps:.0f} ({b_tps / d_tps:.3f}x) | {v_tps:.0f} | "
            f"{v_tps / d_tps:.3f}x | >= 0.95x |"
        )
        for q, goal in ((0.5, "<= +2 ms"), (0.99, "")):
            d, b, v = pct(d_lat, q), pct(b_lat, q), pct(v_lat, q)
            print(
                f"| {streams} streams: TTFT p{int(q * 100)} | {d:.1f} ms | {b:.1f} ms ({b - d:+.1f}) | "
                f"{v:.1f} ms | {v - d:+.1f} ms | {goal} |"
            )
    if gaps:
        print(
            f"| failover gap, SIGKILL -> next token ({len(gaps)} streams) | | | p50 {pct(gaps, 0.5):.0f} ms, "
            f"p99 {pct(gaps, 0.99):.0f} ms, max {max(gaps):.0f} ms | | p99 < 1000 ms |"
        )
    if disc:
        print(
            f"| discovery, READY -> first routed token ({len(disc)} nodes) | | | p50 {pct(disc, 0.5):.0f} ms, "
            f"max {max(disc):.0f} ms | | < 2000 ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
