"""`fleetctl requests`: the coordinator's request log (metadata only, never content)."""

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

from cluster.api import fleet_pb2, fleet_pb2_grpc
from cluster.audit.query import parse_when
from cluster.client.errors import from_rpc_error
from cluster.fleetctl.connect import COORDINATOR, PLAINTEXT, TLS_DIR, TLS_NAME, credentials, dial
from cluster.fleetctl.exits import EXIT_BAD_INPUT, fail


def _bad_input(message: str) -> typer.Exit:
    typer.echo(f"fleetctl requests: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def requests_table(reply: fleet_pb2.ListRequestsResponse, title: str) -> Table:
    t = Table(title=title)
    for col in (
        "ended",
        "request",
        "caller",
        "outcome",
        "queue ms",
        "ttft ms",
        "decode ms",
        "total ms",
        "in/out",
        "nodes",
        "failovers",
        "quality",
        "template",
    ):
        t.add_column(
            col,
            no_wrap=True,
            justify="right" if col.endswith(("ms", "failovers", "in/out", "quality")) else "left",
        )
    for r in reply.requests:
        outcome = r.outcome if r.code == "OK" else f"{r.outcome} {r.code}"
        t.add_row(
            datetime.fromtimestamp(r.ended_at).strftime("%m-%d %H:%M:%S"),
            r.request_id,
            r.caller,
            outcome if r.outcome == "completed" else f"[red]{outcome}[/]",
            f"{r.queue_ms:.0f}" if r.HasField("queue_ms") else "-",
            f"{r.ttft_ms:.0f}" if r.HasField("ttft_ms") else "-",
            f"{r.decode_ms:.0f}",
            f"{r.latency_ms:.0f}",
            f"{r.prompt_tokens}/{r.completion_tokens}",
            " > ".join(r.nodes) or "-",
            str(r.failovers),
            _quality(r),
            r.template or "-",
        )
    return t


def _quality(r: fleet_pb2.RequestRecord) -> str:
    if not r.HasField("quality_score"):
        return "-"
    text = f"{r.quality_score:.2f}"
    return text if not r.HasField("schema_valid") or r.schema_valid else f"[red]{text} invalid[/]"


def requests(
    coordinator: str = COORDINATOR,
    since: str = typer.Option(
        "1h", "--since", help="How far back: 45s, 30m, 1h, 7d, or an ISO 8601 time."
    ),
    slow: bool = typer.Option(
        False,
        "--slow",
        help="Only requests over the coordinator's slow thresholds (time to first token or total).",
    ),
    failed: bool = typer.Option(
        False,
        "--failed",
        help="Only the fleet's failures (failed, deadline); not requests "
        "refused for the caller's own input or quota.",
    ),
    rejected: bool = typer.Option(
        False,
        "--rejected",
        help="Only requests refused for the caller's input or quota "
        "(rejected, refused: 400, 404, 429).",
    ),
    caller: str = typer.Option(
        "", "--caller", help="Only this caller (notes-app or app/notes-app)."
    ),
    limit: int = typer.Option(100, "--limit", help="Newest first, at most this many (<= 10000)."),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Recent requests from the coordinator's request log: who, when, queue / first token /
    decode times, tokens, nodes, failovers and outcome. Never prompts or completions."""
    try:
        since_s = max(1.0, (datetime.now().astimezone() - parse_when(since)).total_seconds())
    except ValueError as exc:
        raise _bad_input(f"--since: {exc}") from None
    if output not in ("table", "json"):
        raise _bad_input(f"--output must be table or json, not {output!r}")
    if not 1 <= limit <= 10_000:
        raise _bad_input(f"--limit must be 1 to 10000, not {limit}")
    ask = fleet_pb2.ListRequestsRequest(
        since_s=since_s,
        slow_only=slow,
        failed_only=failed,
        caller=caller,
        limit=limit,
        rejected_only=rejected,
    )
    with dial(coordinator, credentials(tls_dir, tls_name, plaintext)) as channel:
        try:
            reply = fleet_pb2_grpc.FleetStub(channel).ListRequests(ask, timeout=30)
        except grpc.RpcError as err:
            raise fail(from_rpc_error(err), coordinator) from None
    if output == "json":
        typer.echo(
            json.dumps(
                MessageToDict(
                    reply,
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
            )
        )
        return
    which = " ".join(
        w for w, on in (("slow", slow), ("failed", failed), ("rejected", rejected)) if on
    )
    title = (
        f"{len(reply.requests)} of {reply.matched} {which + ' ' if which else ''}requests since {since} "
        f"(slow: first token >= {reply.slow_ttft_ms:.0f} ms or total >= {reply.slow_latency_ms:.0f} ms; "
        f"kept {reply.retention_days:g} days)"
    )
    Console(width=200).print(requests_table(reply, title))
