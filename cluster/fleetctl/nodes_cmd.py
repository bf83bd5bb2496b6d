"""`fleetctl nodes` and `fleetctl events`: the fleet as a coordinator sees it."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from cluster.api import common_pb2, fleet_pb2, fleet_pb2_grpc
from cluster.client.errors import from_rpc_error
from cluster.fleetctl.connect import COORDINATOR, PLAINTEXT, TLS_DIR, TLS_NAME, credentials, dial
from cluster.fleetctl.exits import fail
from cluster.traffic import class_of


def fleet_table(listing: fleet_pb2.ListNodesResponse) -> Table:
    """One row per node: its own state, the coordinator's verdict, and the traffic ("class":
    its traffic class, docs/traffic.md). "in
    flight" is the coordinator's own count (exact now; a node's running/queued counts are
    as of its last status poll, so they stay in -o json); tok/s is the node's recent decode
    rate, 0 when it is idle."""
    t = Table(
        title=f"fleet: {sum(n.routable for n in listing.nodes)}/{len(listing.nodes)} routable, "
        f"{listing.in_flight} in flight, {listing.queued} queued"
    )
    for col in (
        "node",
        "address",
        "source",
        "state",
        "health",
        "route",
        "model",
        "engine",
        "class",
        "digest",
        "in flight",
        "tok/s",
        "routed",
        "failovers",
        "reason",
    ):
        t.add_column(
            col,
            no_wrap=col != "reason",
            overflow="fold" if col == "reason" else "ellipsis",
            min_width=20 if col == "reason" else None,
            justify="right" if col in ("in flight", "tok/s", "routed", "failovers") else "left",
        )
    for n in listing.nodes:
        st = n.status
        state = (
            common_pb2.Lifecycle.Name(st.lifecycle).removeprefix("LIFECYCLE_")
            if n.HasField("status")
            else "-"
        )
        health = fleet_pb2.NodeHealth.Name(n.health).removeprefix("NODE_HEALTH_")
        if n.health == fleet_pb2.NODE_HEALTH_EJECTED:
            health += f" {n.ejected_for_s:.0f}s"
        t.add_row(
            st.node_id or "?",
            n.address,
            n.source,
            state + (" (cordoned)" if st.cordoned else ""),
            health,
            "yes" if n.routable else "no",
            st.model.model_id or "-",
            st.model.engine or "-",
            class_of(st.node_class, st.model.engine) if n.HasField("status") else "-",
            st.model.weights_digest[7:19] or "-",
            str(n.in_flight),
            f"{st.load.decode_tokens_per_s:.0f}",
            str(n.routed_total),
            str(n.failovers_total),
            n.health_reason,
        )
        for r in st.group.ranks:  # a node group: its ranks beneath it (docs/node-groups.md)
            t.add_row(f"  rank {r.rank}", r.address, "group", r.health, *[""] * 10, r.hostname)
    return t


def event_line(ev: fleet_pb2.FleetEvent) -> str:
    when = datetime.fromtimestamp(ev.time_unix_s).strftime("%H:%M:%S.%f")[:-3]
    kind = fleet_pb2.EventKind.Name(ev.kind).removeprefix("EVENT_KIND_").lower()
    extra = f" request={ev.request_id} tokens={ev.tokens_delivered}" if ev.request_id else ""
    extra += f" to={ev.to_node_id}" if ev.to_node_id else ""
    return f"{when} {kind:<15} {ev.node_id or '-':<14} {ev.address:<22}{extra} {ev.reason}"


def nodes(
    coordinator: str = COORDINATOR,
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
    timeout_s: float = typer.Option(5.0),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Every node the coordinator knows: lifecycle, health verdict, load and traffic."""
    with dial(coordinator, credentials(tls_dir, tls_name, plaintext)) as channel:
        try:
            listing = fleet_pb2_grpc.FleetStub(channel).ListNodes(
                fleet_pb2.ListNodesRequest(), timeout=timeout_s
            )
        except grpc.RpcError as err:
            raise fail(from_rpc_error(err), coordinator) from None
    if output == "json":
        typer.echo(json.dumps(MessageToDict(listing, preserving_proto_field_name=True)))
        return
    Console(width=200).print(fleet_table(listing))


def events(
    coordinator: str = COORDINATOR,
    replay: bool = typer.Option(
        True, "--replay/--no-replay", help="Start with the recent history."
    ),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing new events until interrupted."
    ),
    output: str = typer.Option(
        "text", "--output", "-o", help="text or json (one object per line)."
    ),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Joins, state changes, ejections, readmissions, departures, failovers and restarts."""
    with dial(coordinator, credentials(tls_dir, tls_name, plaintext)) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        try:
            if not follow:
                stream = stub.WatchEvents(fleet_pb2.WatchEventsRequest(replay=replay), timeout=1.0)
            else:
                stream = stub.WatchEvents(fleet_pb2.WatchEventsRequest(replay=replay))
            for ev in stream:
                if output == "json":
                    typer.echo(json.dumps(MessageToDict(ev, preserving_proto_field_name=True)))
                    continue
                typer.echo(event_line(ev))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not follow:
                return  # the history was printed; nothing new arrived
            raise fail(from_rpc_error(err), coordinator) from None
        except KeyboardInterrupt:
            return
