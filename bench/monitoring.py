"""What monitoring costs: throughput through a coordinator with metrics and the request
log on (and /metrics scraped every second, 15x Prometheus' default rate) vs one with
both off, in one run, against the same node (goal: >= 0.95x).

Two coordinators in front of one node agent, identical but for `--no-metrics
--no-request-log`; at each concurrency the two are measured in alternating order, every
repeat, so the machine's noise hits both alike. Prints tokens/s per path, the ratio of
medians, the per-repeat ratios, and what the scraper and the request log saw (rows
written, scrapes served, bytes per scrape).

    .venv/bin/python bench/monitoring.py              # ~3 min on 2 cores
    .venv/bin/python bench/monitoring.py --quick      # ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from bench.coordinator import NODE_ARGS, load  # noqa: E402
from cluster.localfleet import CoordinatorProcess, NodeProcess  # noqa: E402
from cluster.tinymodel import make_tiny_model  # noqa: E402


class Scraper(threading.Thread):
    """GET /metrics every `period_s` until stopped; counts scrapes and bytes."""

    def __init__(self, daemon, period_s: float = 1.0):
        super().__init__(daemon=True)
        self._daemon, self._period = daemon, period_s
        self._halt = threading.Event()
        self.scrapes = self.bytes = self.failures = 0

    def run(self) -> None:
        while not self._halt.wait(self._period):
            status, body, _ = self._daemon.http_get("/metrics")
            if status == 200:
                self.scrapes += 1
                self.bytes += len(body)
            else:
                self.failures += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure(
    paths: dict[str, str], streams: int, repeats: int, max_tokens: int
) -> dict[str, list[float]]:
    per_stream = max(2, 48 // streams)
    for address in paths.values():
        asyncio.run(load(address, streams, 1, 8, "warm"))
    tps: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t, _ = asyncio.run(load(paths[name], streams, per_stream, max_tokens, f"{name}{r}"))
            tps[name].append(t)
        print(
            f"  {streams:>2} streams, repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in tps.items()),
            flush=True,
        )
    return tps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 6)
    levels = (1, 16) if args.quick else (1, 16, 64)
    with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as tmp:
        tmp_path = Path(tmp)
        model = make_tiny_model(tmp_path / "tiny")
        logs = tmp_path / "logs"
        with NodeProcess(model, *NODE_ARGS, node_id="bench-node", plaintext=True) as node:
            node.start(logs)
            node.wait_serving()
            with (
                CoordinatorProcess(
                    nodes=[node.address], name="monitoring-on", plaintext=True
                ) as on,
                CoordinatorProcess(
                    "--no-metrics",
                    "--no-request-log",
                    nodes=[node.address],
                    name="monitoring-off",
                    plaintext=True,
                ) as off,
            ):
                for co in (on, off):
                    co.start(logs)
                    co.wait_routable(1)
                scraper = Scraper(on)
                scraper.start()
                try:
                    rows = [
                        (
                            s,
                            measure(
                                {"off": off.address, "on": on.address}, s, repeats, args.max_tokens
                            ),
                        )
                        for s in levels
                    ]
                finally:
                    scraper.stop()
                state_db = on.state_db
        logged = sqlite3.connect(state_db).execute("SELECT count(*) FROM requests").fetchone()[0]
    print()
    print(
        f"monitoring on vs off, {repeats} alternating repeats per level, {args.max_tokens} tokens per request"
    )
    print(f"{'streams':>7} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7}  per-repeat on/off")
    for streams, tps in rows:
        ratio = statistics.median(tps["on"]) / statistics.median(tps["off"])
        per = ", ".join(f"{a / b:.2f}" for a, b in zip(tps["on"], tps["off"]))
        print(
            f"{streams:>7} {statistics.median(tps['off']):>10.0f} {statistics.median(tps['on']):>10.0f} "
            f"{ratio:>6.2f}x  {per}"
        )
    print(
        f"scrapes of /metrics during the run: {scraper.scrapes} ({scraper.failures} failed), "
        f"{scraper.bytes / max(1, scraper.scrapes) / 1024:.1f} KiB each; request log rows: {logged}"
    )


if __name__ == "__main__":
    main()
