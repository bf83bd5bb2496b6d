"""`fleetctl traffic set|clear|show`: the coordinator's traffic policy (docs/traffic.md): per
model id, weights across node classes and overflow to a class while the local classes would
miss the SLA. A change takes effect at the next request and is audited."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from cluster.api import fleet_pb2, fleet_pb2_grpc
from cluster.fleetctl.connect import (
    COORDINATOR,
    PLAINTEXT,
    TLS_DIR,
    TLS_NAME,
    call,
    credentials,
)
from cluster.fleetctl.exits import EXIT_BAD_INPUT
from cluster.traffic import MODEL_RE, Policy, PolicyError, parse_weights

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True, help=__doc__)
_NAMES = {"model": "MODEL", "weights": "CLASS=WEIGHT", "overflow": "--overflow"}


def _call(coordinator: str, creds, method: str, request):
    return call(
        coordinator,
        creds,
        lambda channel: getattr(fleet_pb2_grpc.FleetStub(channel), method)(request, timeout=10),
    )


def _bad(exc: PolicyError) -> typer.Exit:
    typer.echo(f"fleetctl traffic: {_NAMES.get(exc.field, exc.field)}: {exc}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


@app.command("set")
def set_(
    model: str = typer.Argument(
        ..., metavar="MODEL", help='The model id the policy is for, or "*" for every other model.'
    ),
    weights: list[str] = typer.Argument(
        ...,
        metavar="CLASS=WEIGHT...",
        help="Weights across node classes, e.g. local=90 upstream=10 (whole numbers 0-10000).",
    ),
    overflow: str = typer.Option(
        "",
        "--overflow",
        metavar="CLASS",
        help="Send overflow to this class while the local classes would miss the SLA.",
    ),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Set (or replace) MODEL's traffic policy; the next request follows it."""
    _check_output(output)
    try:
        policy = Policy.parse(model, parse_weights(weights), overflow)
    except PolicyError as exc:
        raise _bad(exc) from None
    reply = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "SetTrafficPolicy",
        fleet_pb2.SetTrafficPolicyRequest(
            policy=fleet_pb2.TrafficPolicy(
                model=policy.model, weights=dict(policy.weights), overflow=policy.overflow
            )
        ),
    )
    typer.echo(f"traffic policy for {policy.model}: {policy.spec()}", err=True)
    _show(reply, output)


@app.command()
def clear(
    model: str = typer.Argument(..., metavar="MODEL", help='The model id, or "*".'),
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Remove MODEL's traffic policy: its requests go to any class again."""
    if not MODEL_RE.match(model):
        raise _bad(PolicyError("model", f"{model[:80]!r} is not a model id or '*'"))
    _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "SetTrafficPolicy",
        fleet_pb2.SetTrafficPolicyRequest(policy=fleet_pb2.TrafficPolicy(model=model), clear=True),
    )
    typer.echo(f"traffic policy for {model} removed")


@app.command()
def show(
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """The policies, each one's overflow switch and why, and each class's share of traffic."""
    _check_output(output)
    reply = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "GetTrafficPolicies",
        fleet_pb2.GetTrafficPoliciesRequest(),
    )
    _show(reply, output)


def _check_output(output: str) -> None:
    if output not in ("table", "json"):
        typer.echo(f"fleetctl traffic: --output {output[:20]!r} must be table or json", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)


def _show(reply: fleet_pb2.TrafficPolicies, output: str) -> None:
    if output == "json":
        typer.echo(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return
    console = Console(width=160)
    t = Table(title=f"traffic policies ({len(reply.policies)}; SLA p95 {reply.sla_p95_s:g} s)")
    for col in ("model", "policy", "overflow", "signal", "now", "set by"):
        t.add_column(col, overflow="fold")
    for p in reply.policies:
        pol = Policy(p.policy.model, tuple(sorted(p.policy.weights.items())), p.policy.overflow)
        state = "-"
        if p.policy.overflow:
            state = "ON" if p.overflow_active else "off"
            state += f" ({p.overflow_episodes} episodes, {p.overflow_routed_total} sent)"
        now = "-"
        if p.overflow_signal == "headroom":
            p95 = "overloaded" if math.isinf(p.predicted_p95_s) else f"{p.predicted_p95_s:.2f} s"
            now = f"p95 {p95}, share {p.overflow_share:.0%}"
        elif p.overflow_signal == "queue":
            now = f"queue wait {p.queue_wait_s:.2f} s"
        when = datetime.fromtimestamp(p.set_unix_s).strftime("%Y-%m-%d %H:%M")
        t.add_row(
            p.policy.model, pol.spec(), state, p.overflow_signal or "-", now, f"{p.set_by} {when}"
        )
    console.print(t)
    console.print(classes_line(reply.classes) or "no traffic placed yet")
    for p in reply.policies:
        if p.reason:
            console.print(f"{p.policy.model}: overflow {p.reason}; {p.fallbacks_total} fallbacks")


def classes_line(classes) -> str:
    """'traffic by class (last 60 s): local 90% (45), upstream 10% (5)' for top and show."""
    used = [c for c in classes if c.routed_recent]
    if not used:
        return ""
    window = used[0].window_s
    parts = ", ".join(f"{c.node_class} {c.share:.0%} ({c.routed_recent})" for c in used)
    return f"traffic by class (last {window:.0f} s): {parts}"
