"""Two coordinators (docs/ha.md): what a coordinator's death costs a stream, and what
PostgreSQL state costs a coordinator. One run, one table.

- coordinator failover gap: two coordinators over one node, 32 streams through the sync
  client (`FleetClient([A, B])`, so every stream starts on A); once each has its first
  tokens A is SIGKILLed. Per stream, the time from the kill to the first token B sent
  (B's audit record says after how many tokens it resumed: `resumed_after_tokens`), next
  to the streams' own steady gap between chunks before the kill, measured in the same
  streams (goal: p99 < 1 s);
- state on PostgreSQL: throughput and time to first token at 16 and 64 streams through a
  coordinator on a throwaway PostgreSQL cluster (tests/pg.py: initdb + pg_ctl on a free
  loopback port, removed afterwards) vs one on SQLite, both over the same node and up at
  once, measured interleaved per repeat (the order rotates) so machine noise hits them
  alike (goal: >= 0.95x throughput).

    .venv/bin/python bench/ha.py            # 3 failover rounds, 4 repeats: ~1.5 min on 2 cores
    .venv/bin/python bench/ha.py --quick    # 1 failover round, 2 repeats: ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
os.environ.pop("STUDIOFLEET_TLS_DIR", None)

from bench.coordinator import NODE_ARGS, load, pct, request  # noqa: E402
from cluster.audit import query  # noqa: E402
from cluster.client import FleetClient  # noqa: E402
from cluster.localfleet import CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.tinymodel import make_tiny_model  # noqa: E402
from tests.pg import PostgresCluster, find_bindir  # noqa: E402

FAILOVER_STREAMS = 32
FAILOVER_TOKENS = 400  # long enough that every stream is mid-way when A dies


def failover_gaps(model: Path, logs: Path, rounds: int) -> tuple[list[float], list[float], int]:
    """(gaps kill -> B's first token in ms, steady chunk gaps before the kill in ms, streams
    that completed without a failover) over `rounds` rounds, a fresh pair of coordinators each."""
    gaps: list[float] = []
    steady: list[float] = []
    unmoved = 0
    with NodeProcess(model, *NODE_ARGS, node_id="ha-node", plaintext=True) as node:
        node.start(logs)
        node.wait_serving()
        for r in range(rounds):
            with (
                CoordinatorProcess(nodes=[node.address], name=f"ha-a{r}", plaintext=True) as a,
                CoordinatorProcess(nodes=[node.address], name=f"ha-b{r}", plaintext=True) as b,
            ):
                a.start(logs)
                b.start(logs)
                a.wait_routable(1)
                b.wait_routable(1)
                g, s, u = _kill_and_time(a, b, r)
                gaps += g
                steady += s
                unmoved += u
            print(
                f"  failover round {r + 1}/{rounds}: {len(g)} streams resumed on B, "
                f"gap p50 {pct(g, 0.5):.0f} ms, max {max(g):.0f} ms",
                flush=True,
            )
    return gaps, steady, unmoved


def _kill_and_time(
    a: CoordinatorProcess, b: CoordinatorProcess, r: int
) -> tuple[list[float], list[float], int]:
    tag = f"ha{r}"
    arrivals: list[list[float]] = [[] for _ in range(FAILOVER_STREAMS)]
    chunk_times: list[list[float]] = [[] for _ in range(FAILOVER_STREAMS)]
    errors: list[BaseException] = []

    with FleetClient([a.address, b.address], plaintext=True) as client:

        def one(i: int) -> None:
            req = request(i, FAILOVER_TOKENS, tag)
            req.sampling.ignore_eos = True
            try:
                for chunk in client.stream(req, timeout_s=180):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        chunk_times[i].append(now)
                        arrivals[i].extend([now] * len(chunk.token_ids))
            except Exception as exc:  # reported below with the stream it broke
                errors.append(exc)

        threads = [
            threading.Thread(target=one, args=(i,), daemon=True) for i in range(FAILOVER_STREAMS)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while min(len(x) for x in arrivals) < 8:  # every stream under way on A
            if time.monotonic() > deadline or errors:
                raise RuntimeError(
                    f"streams did not start on {a.name}: {[len(x) for x in arrivals]} {errors[:1]}"
                )
            time.sleep(0.005)
        killed_at = time.perf_counter()
        a.proc.kill()
        a.proc.wait(10)
        for t in threads:
            t.join(240)
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed across the failover; first: {errors[0]}")
    short = [i for i, x in enumerate(arrivals) if len(x) != FAILOVER_TOKENS]
    if short:
        raise RuntimeError(
            f"streams {short[:5]} got {[len(arrivals[i]) for i in short[:5]]} of "
            f"{FAILOVER_TOKENS} tokens"
        )
    gaps, steady, unmoved = [], [], 0
    for i in range(FAILOVER_STREAMS):
        resumed = [
            x
            for x in query(b.audit_dir, request_id=f"{tag}-{i}")
            if x.get("outcome") == "completed" and x.get("resumed_from") == a.name
        ]
        if not resumed:
            unmoved += 1
            continue
        after = resumed[0]["resumed_after_tokens"]
        gaps.append((arrivals[i][after] - killed_at) * 1000.0)
        before = [t for t in chunk_times[i] if t < killed_at]
        steady += [(y - x) * 1000.0 for x, y in zip(before, before[1:])]
    if not gaps:
        raise RuntimeError(
            f"no stream was resumed on {b.name}: its audit chain names none from {a.name}"
        )
    return gaps, steady, unmoved


async def _level(
    fleets: dict[str, str], streams: int, repeats: int
) -> dict[str, tuple[float, list[float]]]:
    per_stream, max_tokens = max(2, 64 // streams), 64
    tps = {k: [] for k in fleets}
    ttft = {k: [] for k in fleets}
    order = list(fleets)
    for r in range(repeats):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            t, lat = await load(
                fleets[name], streams, per_stream, max_tokens, f"{name}-{streams}-r{r}"
            )
            tps[name].append(t)
            ttft[name].extend(lat)
        print(
            f"  {streams:>2} streams, repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in tps.items()),
            flush=True,
        )
    return {k: (statistics.median(tps[k]), ttft[k]) for k in fleets}


def state_backends(
    model: Path, logs: Path, repeats: int, levels=(16, 64)
) -> list[tuple[int, dict]]:
    """Per level: {sqlite|postgresql: (median tokens/s, TTFTs ms)}."""
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit(
            "bench/ha.py: PostgreSQL 15+ is not installed (scripts/bootstrap-postgres); "
            "it needs initdb and pg_ctl under /usr/lib/postgresql/*/bin"
        )
    rows = []
    with (
        PostgresCluster(bindir) as pg,
        NodeProcess(model, *NODE_ARGS, node_id="state-node", plaintext=True) as node,
    ):
        node.start(logs)
        node.wait_serving()
        with (
            CoordinatorProcess(nodes=[node.address], name="state-sqlite", plaintext=True) as lite,
            CoordinatorProcess(
                "--state-url", pg.database(), nodes=[node.address], name="state-pg", plaintext=True
            ) as post,
        ):
            lite.start(logs)
            post.start(logs)
            lite.wait_routable(1)
            post.wait_routable(1)
            fleets = {"sqlite": lite.address, "postgresql": post.address}

            async def run() -> None:
                for name, address in fleets.items():  # warm: connections, prompt caches, pools
                    await load(address, 4, 2, 16, f"warm-{name}")
                for streams in levels:
                    rows.append((streams, await _level(fleets, streams, repeats)))

            asyncio.run(run())
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="one failover round and 2 repeats per level"
    )
    args = parser.parse_args()
    rounds, repeats = (1, 2) if args.quick else (3, 4)
    with tempfile.TemporaryDirectory(prefix="bench-ha-") as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model")
        logs = tmp / "logs"
        print(
            f"coordinator failover ({rounds} rounds, {FAILOVER_STREAMS} streams, coordinator A SIGKILLed)",
            flush=True,
        )
        gaps, steady, unmoved = failover_gaps(model, logs, rounds)
        print(
            f"state on PostgreSQL vs SQLite ({repeats} interleaved repeats per level)", flush=True
        )
        rows = state_backends(model, logs, repeats)

    print("\n| measure | baseline | measured | ratio | goal |")
    print("|---|---|---|---|---|")
    print(
        f"| coordinator failover gap, SIGKILL -> next token ({len(gaps)} streams) "
        f"| steady chunk gap p50 {pct(steady, 0.5):.1f} ms, p99 {pct(steady, 0.99):.1f} ms "
        f"| p50 {pct(gaps, 0.5):.0f} ms, p99 {pct(gaps, 0.99):.0f} ms, max {max(gaps):.0f} ms "
        f"| p99 {pct(gaps, 0.99) / pct(steady, 0.99):.1f}x the steady p99 | p99 < 1000 ms |"
    )
    if unmoved:
        print(f"| streams that finished without a failover | | {unmoved} | | 0 |")
    for streams, cell in rows:
        (s_tps, s_lat), (p_tps, p_lat) = cell["sqlite"], cell["postgresql"]
        print(
            f"| {streams} streams: tokens/s, SQLite -> PostgreSQL | {s_tps:.0f} | {p_tps:.0f} "
            f"| {p_tps / s_tps:.3f}x | >= 0.95x |"
        )
        for q in (0.5, 0.99):
            s, p = pct(s_lat, q), pct(p_lat, q)
            print(
                f"| {streams} streams: TTFT p{int(q * 100)} | {s:.1f} ms | {p:.1f} ms | {p / s:.2f}x ({p - s:+.1f} ms) | |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
