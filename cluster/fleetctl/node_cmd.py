"""`fleetctl node ...`: ask a node agent directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import grpc
import typer
from google.protobuf.json_format import MessageToDict

from cluster.api import node_pb2, node_pb2_grpc
from cluster.client.errors import from_rpc_error
from cluster.fleetctl.connect import PLAINTEXT, TLS_DIR, TLS_NAME, credentials, dial
from cluster.fleetctl.exits import fail
from cluster.fleetctl.ops_cmd import engine_rows, lifecycle, operation_rows, show
from cluster.security.identity import ANY_NODE

app = typer.Typer(
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    help="One node: `show ID` through the coordinator, `status --target` from the node itself.",
)
app.command("show")(show)


@app.command("status")
def status(
    target: str = typer.Option(..., help="HOST:PORT of the node agent."),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
    timeout_s: float = typer.Option(5.0),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """The node's lifecycle, model, capacity, load and memory (operator certificate)."""
    # Any node of this fleet may answer at TARGET: its certificate names its own id.
    with dial(target, credentials(tls_dir, tls_name, plaintext), ANY_NODE) as channel:
        try:
            st = node_pb2_grpc.NodeStub(channel).GetStatus(
                node_pb2.GetStatusRequest(), timeout=timeout_s
            )
        except grpc.RpcError as err:
            raise fail(from_rpc_error(err), target) from None
    if output == "json":
        typer.echo(json.dumps(MessageToDict(st, preserving_proto_field_name=True)))
        return
    gib = 1 << 30
    rows = [
        ("node", st.node_id),
        ("state", f"{lifecycle(st)} ({st.lifecycle_reason})"),
        ("model", f"{st.model.model_id} {st.model.version} {st.model.weights_digest[:19]}"),
        ("engine", st.model.engine_version),
        ("context", f"{st.model.context_length} tokens"),
        ("capacity", f"{st.capacity.max_running} running, {st.capacity.max_queued} queued"),
        (
            "load",
            f"{st.load.running} running, {st.load.queued} queued, {st.load.decode_tokens_per_s:.1f} tok/s",
        ),
        (
            "requests",
            f"{st.load.requests_accepted_total} accepted, {st.load.requests_completed_total} completed, "
            f"{st.load.requests_cancelled_total} cancelled, {st.load.requests_deadline_total} deadline, "
            f"{st.load.requests_failed_total} failed, {st.load.requests_rejected_total} rejected",
        ),
        (
            "memory",
            f"{st.memory.available_bytes / gib:.1f} / {st.memory.total_bytes / gib:.1f} GiB free, "
            f"engine {st.memory.engine_active_bytes / gib:.2f} GiB"
            + (" (unified)" if st.memory.unified else ""),
        ),
        ("uptime", f"{st.uptime_s:.0f} s"),
        *engine_rows(st),
        *operation_rows(st),
    ]
    for key, value in rows:
        typer.echo(f"{key:<9} {value}")
