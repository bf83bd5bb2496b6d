"""What security costs: the same load through a fleet with mTLS on every hop and the
audit chain on (fsynced before each final chunk) vs the same fleet in plaintext with
the audit off. One run, both fleets up at once, measured interleaved per repeat (the
order rotates) so machine noise hits them alike. Goal: >= 0.9x throughput.

    .venv/bin/python bench/security.py            # ~3 min on 2 cores
    .venv/bin/python bench/security.py --quick    # fewer repeats
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
os.environ.pop("STUDIOFLEET_TLS_DIR", None)

from cluster.api import inference_pb2_grpc  # noqa: E402
from cluster.audit import verify  # noqa: E402
from cluster.localfleet import CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.security.ca import init_ca  # noqa: E402
from cluster.security.identity import Role, dns_name  # noqa: E402
from cluster.security.tls import open_channel  # noqa: E402
from cluster.tinymodel import make_tiny_model  # noqa: E402
from bench.coordinator import NODE_ARGS, pct, request  # noqa: E402


async def load(channel, streams: int, per_stream: int, max_tokens: int, tag: str) -> tuple[float, list[float]]:
    """`streams` callers sending `per_stream` requests back to back: (tokens/s, TTFTs ms)."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    ttfts: list[float] = []
    tokens = 0

    async def caller(c: int) -> None:
        nonlocal tokens
        for k in range(per_stream):
            start, first = time.perf_counter(), None
            async for chunk in stub.Generate(request(c * per_stream + k, max_tokens, tag), timeout=300):
                if first is None and chunk.token_ids:
                    first = time.perf_counter()
                tokens += len(chunk.token_ids)
            ttfts.append((first - start) * 1000.0)

    start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(streams)))
    return tokens / (time.perf_counter() - start), ttfts


async def measure(fleets: dict, levels, repeats: int) -> list[tuple[int, dict]]:
    channels = {k: open_channel(co.address, co.credentials("bench-app", Role.APP) if co.tls_dir else None,
                                server_name=dns_name(Role.COORDINATOR, co.name) if co.tls_dir else None, aio=True)
                for k, co in fleets.items()}
    rows = []
    try:
        for name, ch in channels.items():  # warm: connections, handshakes, prompt caches
            await load(ch, 4, 2, 16, f"warm-{name}")
        for streams in levels:
            per_stream, max_tokens = max(2, 32 // streams), 64
            tps = {k: [] for k in channels}
            ttft = {k: [] for k in channels}
            order = list(channels)
            for r in range(repeats):
                for name in order[r % 2:] + order[:r % 2]:
                    t, f = await load(channels[name], streams, per_stream, max_tokens, f"{name}-{streams}-{r}")
                    tps[name].append(t)
                    ttft[name].extend(f)
                print(f"  {streams:>2} streams, repeat {r + 1}/{repeats}: "
                      + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in tps.items()), flush=True)
            rows.append((streams, {k: (statistics.median(tps[k]), ttft[k]) for k in channels}))
    finally:
        for ch in channels.values():
            await ch.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    levels = (1, 16, 64)
    work = Path(tempfile.mkdtemp(prefix="bench-security-"))
    model = make_tiny_model(work / "model")
    certs = work / "ca"
    init_ca(certs, fleet="bench")
    logs = work / "logs"
    plain_node = NodeProcess(model, *NODE_ARGS, node_id="plain-node", plaintext=True)
    tls_node = NodeProcess(model, *NODE_ARGS, node_id="tls-node", tls_dir=certs)
    try:
        for node in (plain_node, tls_node):
            node.start(logs)
            node.wait_serving()
        plain = CoordinatorProcess("--no-audit", nodes=[plain_node.address], name="plain-co", plaintext=True)
        secure = CoordinatorProcess(nodes=[tls_node.address], name="secure-co", tls_dir=certs)
        with plain, secure:
            for co in (plain, secure):
                co.start(logs)
                co.wait_routable(1)
            print(f"model {model}; plaintext+audit off vs mTLS+audit on; {repeats} repeats per level", flush=True)
            rows = asyncio.run(measure({"plain": plain, "secure": secure}, levels, repeats))
            audit_dir = secure.audit_dir
        report = verify(audit_dir)
    finally:
        plain_node.stop()
        tls_node.stop()
    print("\n| streams | plaintext, audit off tok/s | mTLS + audit tok/s | ratio | TTFT p50 plain ms | "
          "TTFT p50 secure ms | TTFT p99 plain ms | TTFT p99 secure ms |")
    print("|---|---|---|---|---|---|---|---|")
    for streams, r in rows:
        (pt, pf), (st, sf) = r["plain"], r["secure"]
        print(f"| {streams} | {pt:.0f} | {st:.0f} | {st / pt:.2f}x | {pct(pf, .5):.1f} | {pct(sf, .5):.1f} | "
              f"{pct(pf, .99):.1f} | {pct(sf, .99):.1f} |")
    print(f"\naudit chain after the run: {report.records} records in {len(report.files)} file(s), "
          f"{report.checkpoints} checkpoints, {'verifies' if report.ok else 'BROKEN: ' + str(report.first_bad)}")


if __name__ == "__main__":
    main()
