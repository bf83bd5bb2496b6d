"""`fleet-coordinator`: route requests over a fleet of node agents until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import List, Optional

import typer

from cluster.daemon import exit_now, on_stop_signals, print_listening, run_daemon

log = logging.getLogger("coordinator")

app = typer.Typer(add_completion=False, help=__doc__)

HARD_EXIT_S = 10.0


async def _serve(settings) -> int:
    from coordinator.coordinator import Coordinator

    coordinator = Coordinator(settings=settings)
    port = await coordinator.start()
    address = print_listening("coordinator_id", settings.coordinator_id, settings.listen, port)
    log.info("coordinator=%s listening on %s (mDNS %s, %d static nodes)", settings.coordinator_id,
             address, "on" if settings.mdns else "off", len(settings.nodes))
    loop = asyncio.get_running_loop()

    def drain(name: str) -> None:
        log.info("%s: finishing in-flight requests (grace %.1fs); send again to stop now",
                 name, settings.shutdown_grace_s)
        loop.create_task(coordinator.shutdown())

    def stop_now(name: str) -> None:
        log.warning("second %s: stopping now", name)
        loop.create_task(coordinator.shutdown(0))
        loop.call_later(HARD_EXIT_S, exit_now, 1)

    on_stop_signals(drain, stop_now)
    await coordinator.wait_stopped()
    return 0


@app.command()
def serve(
    listen: Optional[str] = typer.Option(None, help="HOST:PORT to serve on; port 0 picks a free one. [default: 127.0.0.1:7800]"),
    node: List[str] = typer.Option([], "--node", help="Static node address HOST:PORT (repeatable), for networks without multicast."),
    mdns: Optional[bool] = typer.Option(None, "--mdns/--no-mdns", help="Discover node agents over mDNS. [default: on]"),
    mdns_interface: Optional[str] = typer.Option(None, help="Address to browse mDNS on (127.0.0.1 for a local fleet). [default: all]"),
    fleet: Optional[str] = typer.Option(None, help="Take only nodes announcing this fleet name. [default: default]"),
    coordinator_id: Optional[str] = typer.Option(None, help="Name in logs and events. [default: coordinator]"),
    poll_interval_s: Optional[float] = typer.Option(None, help="Status poll per node, +-jitter. [default: 1.0]"),
    eject_after_failures: Optional[int] = typer.Option(None, help="Consecutive failures that eject a node. [default: 3]"),
    eject_base_s: Optional[float] = typer.Option(None, help="Ejection n lasts base x n seconds. [default: 2]"),
    readmit_after_probes: Optional[int] = typer.Option(None, help="Passing probes before readmission. [default: 3]"),
    queue_max_depth: Optional[int] = typer.Option(None, help="Requests waiting for a node before RESOURCE_EXHAUSTED. [default: 256]"),
    queue_max_wait_s: Optional[float] = typer.Option(None, help="Longest wait for a node. [default: 10]"),
    max_failovers: Optional[int] = typer.Option(None, help="Node moves per request. [default: 3]"),
    shutdown_grace_s: Optional[float] = typer.Option(None, help="Seconds in-flight requests get on SIGTERM. [default: 30]"),
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING. [default: INFO]"),
) -> None:
    flags = {k: v for k, v in locals().items() if v is not None and k != "node"}
    if node:
        flags["nodes"] = tuple(node)
    from cluster.config import CoordinatorSettings

    run_daemon("fleet-coordinator", lambda: CoordinatorSettings(**flags), _serve)


def main() -> None:
    app(prog_name="fleet-coordinator")


if __name__ == "__main__":
    sys.exit(main())
