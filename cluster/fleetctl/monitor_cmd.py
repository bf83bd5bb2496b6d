"""`fleetctl dashboard` (a one-time link to the coordinator's dashboard) and `fleetctl
top` (the same picture in the terminal, refreshing live)."""

from __future__ import annotations

import collections
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Optional

import grpc
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cluster.api import fleet_pb2, fleet_pb2_grpc, shadow_pb2, shadow_pb2_grpc
from cluster.capacity import headroom
from cluster.client.errors import from_rpc_error
from cluster.fleetctl.connect import COORDINATOR, PLAINTEXT, TLS_DIR, TLS_NAME, credentials, dial
from cluster.fleetctl.exits import fail
from cluster.fleetctl.nodes_cmd import event_line, fleet_table

SPARKS = "▁▂▃▄▅▆▇█"
EVENTS_SHOWN = 8


def dashboard(
    coordinator: str = COORDINATOR,
    open_browser: bool = typer.Option(False, "--open", help="Open it in this machine's browser."),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Print a one-time link that opens the coordinator's dashboard as you (operator role).
    It works once, within a minute; the session it opens ends after 15 idle minutes."""
    with dial(coordinator, credentials(tls_dir, tls_name, plaintext)) as channel:
        try:
            link = fleet_pb2_grpc.FleetStub(channel).OpenDashboard(
                fleet_pb2.OpenDashboardRequest(), timeout=10
            )
        except grpc.RpcError as err:
            raise fail(from_rpc_error(err), coordinator) from None
    typer.echo(link.url)
    typer.echo(
        f"(works once, within {link.expires_in_s:.0f} s; the browser must trust the fleet CA)",
        err=True,
    )
    if open_browser:
        import webbrowser

        webbrowser.open(link.url)


def sparkline(values: list[float]) -> str:
    top = max(values, default=0.0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(
        SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))] for v in values
    )


class _Events(threading.Thread):
    """The coordinator's event stream (history first) into a short deque, in the background."""

    def __init__(self, stub: fleet_pb2_grpc.FleetStub):
        super().__init__(daemon=True)
        self.recent: collections.deque = collections.deque(maxlen=EVENTS_SHOWN)
        self._call = stub.WatchEvents(fleet_pb2.WatchEventsRequest(replay=True))

    def run(self) -> None:
        try:
            for ev in self._call:
                self.recent.append(ev)
        except grpc.RpcError:
            pass  # cancelled on exit, or the coordinator went away: the frame says so

    def stop(self) -> None:
        self._call.cancel()


def _history(stub: fleet_pb2_grpc.FleetStub) -> list:
    """The coordinator's recent events, read until the stream goes quiet."""
    out: collections.deque = collections.deque(maxlen=EVENTS_SHOWN)
    try:
        for ev in stub.WatchEvents(fleet_pb2.WatchEventsRequest(replay=True), timeout=1.0):
            out.append(ev)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return list(out)


def frame(stub: fleet_pb2_grpc.FleetStub, events: list, coordinator: str, shadow=None) -> Group:
    listing = stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=5)
    traffic = stub.GetTraffic(fleet_pb2.GetTrafficRequest(window_s=3600, bucket_s=60), timeout=5)
    b = traffic.buckets
    last = [x for x in b[-5:] if x.requests]
    summary = Text.assemble(
        (f"{coordinator}  ", "bold"),
        f"{sum(n.routable for n in listing.nodes)}/{len(listing.nodes)} nodes routable  ",
        f"running {traffic.running}  queued {traffic.queued}  {traffic.tokens_per_s:.0f} tok/s (last min)  ",
        f"TTFT p95 {max((x.ttft_p95_ms for x in last), default=0):.0f} ms (last 5 min)  ",
        (datetime.now().strftime("%H:%M:%S"), "dim"),
    )
    charts = Table.grid(padding=(0, 1))
    charts.add_row("tokens/s  ", sparkline([x.tokens / traffic.bucket_s for x in b]))
    charts.add_row("requests  ", sparkline([x.requests for x in b]))
    charts.add_row("errors    ", sparkline([x.errors for x in b]))
    charts.add_row("TTFT p95  ", sparkline([x.ttft_p95_ms for x in b]))
    charts.add_row("", Text("last hour, one character a minute", style="dim"))
    recent = Text(
        "\n".join(event_line(ev) for ev in reversed(events)) or "no events yet", style="dim"
    )
    capacity = capacity_line(traffic)
    shares = traffic_line(stub, traffic)
    shadowing = shadow_line(shadow) if shadow is not None else None
    return Group(
        summary,
        *([capacity] if capacity else []),
        *([shares] if shares else []),
        *([shadowing] if shadowing else []),
        fleet_table(listing),
        charts,
        Text("recent events", style="bold"),
        recent,
    )


def capacity_line(traffic: fleet_pb2.Traffic) -> Text | None:
    """The live headroom (docs/capacity.md "Live headroom"); red past the SLA."""
    if not traffic.HasField("headroom"):
        return None
    h = headroom.from_proto(traffic.headroom)
    return Text(h.line(), style="dim" if not h.known else ("green" if h.sla_met else "bold red"))


def traffic_line(stub: fleet_pb2_grpc.FleetStub, traffic: fleet_pb2.Traffic) -> Text | None:
    """Each node class's share of the last minute's requests and any overflow on
    (docs/traffic.md); red while overflow is on."""
    from cluster.fleetctl.traffic_cmd import classes_line

    try:
        policies = stub.GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=5)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.UNIMPLEMENTED:  # an older coordinator: no policy
            raise
        policies = fleet_pb2.TrafficPolicies()
    on = [p for p in policies.policies if p.overflow_active]
    text = classes_line(traffic.classes)
    if on:
        text += (
            ("; " if text else "")
            + "overflow ON: "
            + ", ".join(f"{p.policy.model} -> {p.policy.overflow}" for p in on)
        )
    if not text:
        return None
    return Text(text, style="bold red" if on else "")


def shadow_line(stub) -> Text | None:
    """The shadow run, while one is active (docs/shadow.md); nothing from an older coordinator."""
    try:
        r = stub.GetShadow(shadow_pb2.GetShadowRequest(), timeout=5)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return None
    if not r.active:
        return None
    return Text(
        f"shadow {r.shadow_id}: {r.fraction:g} of requests to {r.model}, {r.sent} copied, "
        f"{r.dropped_busy + r.dropped_no_node + r.dropped_phi} dropped, {r.in_flight} running; "
        f"verdict {r.verdict}",
        style="red" if r.verdict == "fail" else "dim",
    )


def top(
    coordinator: str = COORDINATOR,
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit (scripts, tests)."),
    iterations: int = typer.Option(
        0, "--iterations", hidden=True, help="Stop after this many refreshes."
    ),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """The fleet at a glance, refreshing: nodes, load, tokens/s, latency and recent events
    (what the dashboard shows). Ctrl-C to leave. Each refresh is one ListNodes, one
    GetTraffic and one GetShadow call; ListNodes and GetShadow calls are audited like any other."""
    console = Console(width=200) if once or iterations else Console()
    with dial(coordinator, credentials(tls_dir, tls_name, plaintext)) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        shadow = shadow_pb2_grpc.ShadowStub(channel)
        if once:
            try:
                console.print(frame(stub, _history(stub), coordinator, shadow))
            except grpc.RpcError as err:
                raise fail(from_rpc_error(err), coordinator) from None
            return
        # Ctrl-C (or SIGTERM) sets a flag the refresh loop waits on, rather than raising
        # KeyboardInterrupt wherever the main thread happens to be (inside a gRPC call
        # it may not surface at all): the screen is restored and top exits 0.
        leave = threading.Event()
        previous = {
            sig: signal.signal(sig, lambda *_: leave.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        events = _Events(stub)
        events.start()
        try:
            if not console.is_terminal:  # piped: one frame after another, for a log
                done = 0
                while not leave.is_set() and (not iterations or done < iterations):
                    console.print(frame(stub, list(events.recent), coordinator, shadow), "")
                    done += 1
                    if not iterations or done < iterations:
                        leave.wait(interval)
                return
            with Live(
                frame(stub, list(events.recent), coordinator, shadow),
                console=console,
                auto_refresh=False,
                screen=True,
            ) as live:
                done = 1
                while (not iterations or done < iterations) and not leave.wait(interval):
                    live.update(frame(stub, list(events.recent), coordinator, shadow), refresh=True)
                    done += 1
        except grpc.RpcError as err:
            raise fail(from_rpc_error(err), coordinator) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            events.stop()
