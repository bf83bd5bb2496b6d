"""`fleetctl cordon|uncordon|drain NODE` and `fleetctl node show NODE`, through the coordinator
(which forwards to the node, where the state lives, and audits the call)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from google.protobuf.json_format import MessageToDict

from cluster.api import common_pb2, fleet_pb2, fleet_pb2_grpc, node_pb2
from cluster.fleetctl.connect import (
    COORDINATOR,
    PLAINTEXT,
    TLS_DIR,
    TLS_NAME,
    call,
    credentials,
)
from cluster.fleetctl.exits import EXIT_ERROR, EXIT_NOT_FOUND
from cluster.wording import plural

OUTPUT = typer.Option("table", "--output", "-o", help="table or json.")


def lifecycle(st: node_pb2.NodeStatus) -> str:
    return common_pb2.Lifecycle.Name(st.lifecycle).removeprefix("LIFECYCLE_") + (
        " (cordoned)" if st.cordoned else ""
    )


def engine_rows(st: node_pb2.NodeStatus) -> list[tuple[str, str]]:
    """A supervised engine server (vLLM), its KV cache and the host's GPUs, if any."""
    rows = []
    srv = st.engine_server if st.HasField("engine_server") else None
    if srv is not None:
        state = f"pid {srv.pid}, up {srv.up_s:.0f} s" if srv.pid else "down"
        rows.append(
            (
                "server",
                f"{srv.url or '-'} {state}, {srv.restarts} restarts"
                + (f" (last: {srv.last_exit})" if srv.last_exit else ""),
            )
        )
        rows.append(("kv cache", f"{st.load.kv_cache_usage:.0%} used"))
    gib = 1 << 30
    rows += [
        (
            "gpu",
            f"{g.index} {g.name}: {g.memory_used_bytes / gib:.1f} / {g.memory_total_bytes / gib:.1f} GiB, "
            f"{g.utilization:.0%} busy",
        )
        for g in st.memory.gpus
    ]
    return rows + group_rows(st)


def group_rows(st: node_pb2.NodeStatus) -> list[tuple[str, str]]:
    """A node group's backend and its ranks (docs/node-groups.md), if it is one."""
    if not st.HasField("group"):
        return []
    g, gib = st.group, 1 << 30
    rows = [("group", f"{g.size} ranks, {g.mode} parallel over {g.backend}; this is rank {g.rank}")]
    for r in g.ranks:
        heard = f", heard {r.last_heard_s:.1f} s ago" if r.last_heard_s else ""
        memory = (
            f", {r.memory_available_bytes / gib:.1f} / {r.memory_total_bytes / gib:.1f} GiB free"
            if r.memory_total_bytes
            else ""
        )
        rows.append(
            (f"rank {r.rank}", f"{r.address} {r.hostname or '?'} {r.health}{heard}{memory}")
        )
    return rows


def operation_rows(st: node_pb2.NodeStatus) -> list[tuple[str, str]]:
    """The node's staged weights and recent operations, one (key, value) row each."""
    return [
        (
            "staged",
            f"{s.model_id} {s.version} {s.weights_digest[:19]} "
            f"{node_pb2.StageState.Name(s.state).removeprefix('STAGE_STATE_')} "
            f"{s.bytes_done}/{s.bytes_total} bytes {s.message}",
        )
        for s in st.staged
    ] + [
        (
            "operation",
            f"{o.operation_id} {o.kind} "
            f"{node_pb2.OperationState.Name(o.state).removeprefix('OPERATION_STATE_')}: {o.message}",
        )
        for o in st.operations
    ]


def _call(coordinator: str, tls, fn: Callable[[fleet_pb2_grpc.FleetStub], object]):
    return call(coordinator, tls, lambda channel: fn(fleet_pb2_grpc.FleetStub(channel)))


def _emit(reply: fleet_pb2.NodeOperationReply, output: str) -> None:
    if output == "json":
        typer.echo(json.dumps(MessageToDict(reply, preserving_proto_field_name=True)))
        return
    op = reply.operation
    typer.echo(
        f"node {reply.node_id}: {lifecycle(reply.status)}; {op.message or 'running'} "
        f"(operation {op.operation_id})"
    )


def cordon(
    node_id: str = typer.Argument(..., help="The node id (fleetctl nodes)."),
    reason: str = typer.Option(
        "", help="Why; shown in status, events and the audit chain (no PHI)."
    ),
    coordinator: str = COORDINATOR,
    output: str = OUTPUT,
    operation_id: str = typer.Option(""),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Stop sending new requests to NODE; requests in flight continue. Kept across restarts."""
    _emit(
        _set_cordon(
            node_id,
            True,
            reason,
            coordinator,
            operation_id,
            credentials(tls_dir, tls_name, plaintext),
        ),
        output,
    )


def uncordon(
    node_id: str = typer.Argument(..., help="The node id (fleetctl nodes)."),
    reason: str = typer.Option(""),
    coordinator: str = COORDINATOR,
    output: str = OUTPUT,
    operation_id: str = typer.Option(""),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Take requests on NODE again (also ends a drain: DRAINED -> READY)."""
    _emit(
        _set_cordon(
            node_id,
            False,
            reason,
            coordinator,
            operation_id,
            credentials(tls_dir, tls_name, plaintext),
        ),
        output,
    )


def _set_cordon(
    node_id, cordoned, reason, coordinator, operation_id, tls
) -> fleet_pb2.NodeOperationReply:
    return _call(
        coordinator,
        tls,
        lambda stub: stub.CordonNode(
            fleet_pb2.CordonNodeRequest(
                node_id=node_id, cordoned=cordoned, reason=reason, operation_id=operation_id
            ),
            timeout=15,
        ),
    )


def drain(
    node_id: str = typer.Argument(..., help="The node id (fleetctl nodes)."),
    timeout: float = typer.Option(
        0.0,
        "--timeout",
        help="Seconds in-flight requests get; then they are "
        "ended (a coordinator resumes them elsewhere). 0: the node's default.",
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Show progress until DRAINED."),
    reason: str = typer.Option(""),
    coordinator: str = COORDINATOR,
    output: str = OUTPUT,
    operation_id: str = typer.Option(""),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Cordon NODE and let its requests finish; exits 0 once it is DRAINED."""
    tls = credentials(tls_dir, tls_name, plaintext)
    reply = _call(
        coordinator,
        tls,
        lambda stub: stub.DrainNode(
            fleet_pb2.DrainNodeRequest(
                node_id=node_id, timeout_s=timeout, reason=reason, operation_id=operation_id
            ),
            timeout=15,
        ),
    )
    op_id = reply.operation.operation_id
    shown = ""
    while wait and reply.operation.state == node_pb2.OPERATION_STATE_RUNNING:
        time.sleep(0.5)  # the progress view refreshes twice a second
        node = _find(coordinator, tls, node_id)
        st = node.status
        rec = next((o for o in st.operations if o.operation_id == op_id), reply.operation)
        reply = fleet_pb2.NodeOperationReply(node_id=node_id, operation=rec, status=st)
        line = (
            f"node {node_id}: {lifecycle(st)}, {plural(st.load.running + st.load.queued, 'request')} in flight, "
            f"deadline in {st.drain_deadline_left_s:.0f}s"
        )
        if output != "json" and line != shown:
            typer.echo(line, err=not sys.stdout.isatty())
            shown = line
    _emit(reply, output)
    if reply.operation.state == node_pb2.OPERATION_STATE_FAILED:
        raise typer.Exit(EXIT_ERROR)


def _find(coordinator: str, tls, node_id: str) -> fleet_pb2.FleetNode:
    listing = _call(
        coordinator, tls, lambda stub: stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
    )
    node = next((n for n in listing.nodes if n.status.node_id == node_id), None)
    if node is None:
        known = ", ".join(n.status.node_id for n in listing.nodes if n.status.node_id) or "none"
        typer.echo(f"fleetctl: {coordinator}: no node {node_id!r} (known: {known})", err=True)
        raise typer.Exit(EXIT_NOT_FOUND)
    return node


def show(
    node_id: str = typer.Argument(..., help="The node id."),
    coordinator: str = COORDINATOR,
    output: str = OUTPUT,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """One node as the coordinator sees it: state, model, staged weights, recent operations."""
    n = _find(coordinator, credentials(tls_dir, tls_name, plaintext), node_id)
    if output == "json":
        typer.echo(json.dumps(MessageToDict(n, preserving_proto_field_name=True)))
        return
    st, m = n.status, n.status.model
    rows = [
        ("node", st.node_id),
        ("address", f"{n.address} ({n.source})"),
        ("state", f"{lifecycle(st)}: {st.lifecycle_reason}"),
        (
            "health",
            f"{fleet_pb2.NodeHealth.Name(n.health).removeprefix('NODE_HEALTH_')}: {n.health_reason}",
        ),
        ("routable", "yes" if n.routable else "no"),
        ("model", f"{m.model_id} {m.version} {m.weights_digest}"),
        (
            "previous",
            f"{st.previous_model.model_id} {st.previous_model.version} "
            f"{st.previous_model.weights_digest}"
            if st.previous_model.weights_digest
            else "-",
        ),
        (
            "load",
            f"{st.load.running} running, {st.load.queued} queued, {n.in_flight} from this coordinator",
        ),
    ]
    for key, value in rows + engine_rows(st) + operation_rows(st):
        typer.echo(f"{key:<10} {value}")
