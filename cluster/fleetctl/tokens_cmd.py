"""`fleetctl tokens issue|list|revoke`: bearer tokens for the coordinator's
OpenAI-compatible API (docs/openai-api.md). The coordinator keeps only a hash;
the token itself is printed once, by `issue`."""

from __future__ import annotations

import json
import re
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

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True, help=__doc__)
_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    m = _TTL.match(text.strip())
    if m is None or float(m.group(1)) <= 0:
        typer.echo(
            f"fleetctl tokens: --ttl {text!r} must look like 30d, 12h, 90m or 3600s", err=True
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _call(coordinator: str, creds, method: str, request):
    return call(
        coordinator,
        creds,
        lambda channel: getattr(fleet_pb2_grpc.FleetStub(channel), method)(request, timeout=10),
    )


def _when(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M") if unix_s else "-"


@app.command()
def issue(
    name: str = typer.Argument(
        ..., help="Who holds it, e.g. notes-app: the caller name in audit records and quotas."
    ),
    role: str = typer.Option(
        "app", "--role", help="app (inference and models) or monitor (models only)."
    ),
    ttl: str = typer.Option("90d", "--ttl", help="Lifetime: 30d, 12h, 90m... (at most 366d)."),
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Issue a bearer token and print it (once: the coordinator keeps only its hash)."""
    reply = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "IssueApiToken",
        fleet_pb2.IssueApiTokenRequest(name=name, role=role, ttl_s=parse_ttl(ttl)),
    )
    typer.echo(reply.secret)
    typer.echo(
        f"token {reply.token.id} for {reply.token.role}/{reply.token.name}, expires "
        f"{_when(reply.token.expires_unix_s)}; it is shown only now: store it as the application's "
        "OPENAI_API_KEY",
        err=True,
    )


@app.command("list")
def list_(
    all_: bool = typer.Option(False, "--all", help="Also expired and revoked tokens."),
    output: str = typer.Option("table", "--output", "-o", help="table or json."),
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """The coordinator's API tokens (ids and holders; never the secrets)."""
    reply = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "ListApiTokens",
        fleet_pb2.ListApiTokensRequest(all=all_),
    )
    if output == "json":
        typer.echo(
            json.dumps(
                [MessageToDict(t, preserving_proto_field_name=True) for t in reply.tokens], indent=2
            )
        )
        return
    t = Table(title=f"API tokens ({len(reply.tokens)})")
    longest = max((len(tok.id) for tok in reply.tokens), default=2)
    for col in (
        "id",
        "holder",
        "created",
        "expires",
        "by",
        "revoked",
    ):  # ids whole: they are pasted into revoke
        t.add_column(
            col,
            no_wrap=True,
            min_width=longest if col == "id" else None,
            overflow="ellipsis" if col == "id" else "fold",
        )
    for tok in reply.tokens:
        revoked = (
            f"{_when(tok.revoked_unix_s)} {tok.revoked_reason}".strip()
            if tok.revoked_unix_s
            else "-"
        )
        t.add_row(
            tok.id,
            f"{tok.role}/{tok.name}",
            _when(tok.created_unix_s),
            _when(tok.expires_unix_s),
            tok.created_by or "-",
            revoked,
        )
    Console().print(t)


@app.command()
def revoke(
    token_id: str = typer.Argument(
        ..., help="The token's id (sft_...), as `fleetctl tokens list` shows it."
    ),
    reason: str = typer.Option(
        "", "--reason", help="Why (kept with the token and in the audit chain)."
    ),
    coordinator: str = COORDINATOR,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Revoke a token: its next request is refused (401), on every coordinator sharing the state database."""
    tok = _call(
        coordinator,
        credentials(tls_dir, tls_name, plaintext),
        "RevokeApiToken",
        fleet_pb2.RevokeApiTokenRequest(id=token_id, reason=reason),
    )
    typer.echo(f"revoked {tok.id} ({tok.role}/{tok.name}) at {_when(tok.revoked_unix_s)}")
