"""The credentials options every fleetctl command that dials a daemon shares."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import grpc
import typer

from cluster.security.tls import ENV_DIR, ENV_NAME, ClientTLS, TLSConfigError, open_channel
from cluster.fleetctl.exits import EXIT_BAD_INPUT

TLS_DIR = typer.Option(None, "--tls-dir", envvar=ENV_DIR,
                       help="Directory with ca.pem and your NAME.pem/NAME.key.")
TLS_NAME = typer.Option(None, "--tls-name", envvar=ENV_NAME,
                        help="Your certificate's name (operator role for admin commands, app for generate).")
PLAINTEXT = typer.Option(False, "--plaintext", help="No TLS: a loopback development fleet only.")


def credentials(tls_dir: Optional[Path], tls_name: Optional[str], plaintext: bool) -> Optional[ClientTLS]:
    """The caller's ClientTLS (None for plaintext); exits 2 with the fix when unusable."""
    if plaintext:
        return None
    if not tls_dir or not tls_name:
        typer.echo(f"fleetctl: no credentials: give --tls-dir and --tls-name (or {ENV_DIR} and {ENV_NAME}); "
                   "--plaintext for a loopback development fleet", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        return ClientTLS(tls_dir, tls_name)
    except TLSConfigError as exc:
        typer.echo(f"fleetctl: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)


def dial(target: str, tls: Optional[ClientTLS], server_name: Optional[str] = None) -> grpc.Channel:
    try:
        return open_channel(target, tls, server_name=server_name)
    except TLSConfigError as exc:
        typer.echo(f"fleetctl: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
