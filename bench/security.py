"""What security costs: the same load through a fleet with mTLS on every hop and the
audit chain on (fsynced before each final chunk) vs the same fleet in plaintext with
the audit off, and (to split the cost) in plaintext with the audit on. One run, all
fleets up at once, measured interleaved per repeat (the order rotates) so machine noise
hits them alike. Goal: mTLS + audit >= 0.9x throughput.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
os.environ.pop("STUDIOFLEET_TLS_DIR", None)

from bench.coordinator import NODE_ARGS, pct  # noqa: E402
from bench.coordinator import load_on as load  # noqa: E402
from cluster.audit import verify  # noqa: E402
from cluster.localfleet import CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.security.ca import init_ca  # noqa: E402
from cluster.security.identity import Role, dns_name  # noqa: E402
from cluster.security.tls import open_channel  # noqa: E402
from cluster.tinymodel import make_tiny_model  # noqa: E402


async def measure(fleets: dict, levels, repeats: int) -> list[tuple[int, dict]]:
    channels = {
        k: open_channel(
            co.address,
            co.credentials("bench-app", Role.APP) if co.tls_dir else None,
            server_name=dns_name(Role.COORDINATOR, co.name) if co.tls_dir else None,
            aio=True,
        )
        for k, co in fleets.items()
    }
    rows = []
    try:
        for name, ch in channels.items():  # warm: connections, handshakes, prompt caches
            await load(ch, 4, 2, 16, f"warm-{name}")
        for streams in levels:
            per_stream, max_tokens = (
                max(2, 64 // streams),
                64,
            )  # 1 stream: 64 requests (it is the noisiest)
            tps = {k: [] for k in channels}
            ttft = {k: [] for k in channels}
            order = list(channels)
            for r in range(repeats):
                k = r % len(order)
                for name in order[k:] + order[:k]:
                    t, f = await load(
                        channels[name], streams, per_stream, max_tokens, f"{name}-{streams}-{r}"
                    )
                    tps[name].append(t)
                    ttft[name].extend(f)
                print(
                    f"  {streams:>2} streams, repeat {r + 1}/{repeats}: "
                    + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in tps.items()),
                    flush=True,
                )
            paired = {
                k: statistics.median(s / p for s, p in zip(tps[k], tps["plain"])) for k in channels
            }
            rows.append(
                (streams, {k: (statistics.median(tps[k]), ttft[k]) for k in channels}, paired)
            )
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
    nodes = [
        NodeProcess(model, *NODE_ARGS, node_id="plain-node", plaintext=True),
        NodeProcess(model, *NODE_ARGS, node_id="audit-node", plaintext=True),
        NodeProcess(model, *NODE_ARGS, node_id="tls-node", tls_dir=certs),
    ]
    try:
        for node in nodes:
            node.start(logs)
            node.wait_serving()
        fleets = {
            "plain": CoordinatorProcess(
                "--no-audit", nodes=[nodes[0].address], name="plain-co", plaintext=True
            ),
            "audit": CoordinatorProcess(nodes=[nodes[1].address], name="audit-co", plaintext=True),
            "secure": CoordinatorProcess(nodes=[nodes[2].address], name="secure-co", tls_dir=certs),
        }
        try:
            for co in fleets.values():
                co.start(logs)
                co.wait_routable(1)
            print(
                f"model {model}; plaintext + audit off / plaintext + audit on / mTLS + audit on; "
                f"{repeats} repeats per level",
                flush=True,
            )
            rows = asyncio.run(measure(fleets, levels, repeats))
        finally:
            for co in fleets.values():
                co.stop()
        report = verify(fleets["secure"].audit_dir)
    finally:
        for node in nodes:
            node.stop()
    # The ratio is the median of the per-repeat ratios: each repeat measures both fleets
    # back to back, so a noisy moment moves both sides of one ratio rather than one median.
    print(
        "\n| streams | plaintext, audit off tok/s | plaintext + audit tok/s (ratio) | mTLS + audit tok/s | "
        "mTLS + audit ratio (goal >= 0.9x) | TTFT p50 plain / secure ms | TTFT p99 plain / secure ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for streams, r, paired in rows:
        (pt, pf), (at, _), (st, sf) = r["plain"], r["audit"], r["secure"]
        print(
            f"| {streams} | {pt:.0f} | {at:.0f} ({paired['audit']:.2f}x) | {st:.0f} | {paired['secure']:.2f}x | "
            f"{pct(pf, 0.5):.1f} / {pct(sf, 0.5):.1f} | {pct(pf, 0.99):.1f} / {pct(sf, 0.99):.1f} |"
        )
    print(
        f"\naudit chain after the run: {report.records} records in {len(report.files)} file(s), "
        f"{report.checkpoints} checkpoints, {'verifies' if report.ok else 'BROKEN: ' + str(report.first_bad)}"
    )


if __name__ == "__main__":
    main()
