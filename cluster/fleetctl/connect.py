"""The address and credentials options every fleetctl command that dials a daemon shares.

Each falls back to the [fleetctl] table of the config file: $STUDIOFLEET_CONFIG, else
$XDG_CONFIG_HOME/studiofleet/studiofleet.toml (~/.config/...) if that exists."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Optional, TypeVar

import grpc
import typer

from cluster.client.errors import from_rpc_error
from cluster.config import FleetctlSettings
from cluster.config_file import ConfigFileError
from cluster.fleetctl.exits import EXIT_BAD_INPUT, fail
from cluster.security.tls import ENV_DIR, ENV_NAME, ClientTLS, TLSConfigError, open_channel

ENV_CONFIG, ENV_COORDINATOR = "STUDIOFLEET_CONFIG", "STUDIOFLEET_COORDINATOR"
DEFAULT_COORDINATOR = "127.0.0.1:7800"
T = TypeVar("T")


def config_path(env: Mapping[str, str] = os.environ) -> Optional[Path]:
    """$STUDIOFLEET_CONFIG (which must exist), else the per-user file if it exists, else None."""
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    default = base / "studiofleet" / "studiofleet.toml"
    return default if default.is_file() else None


def file_settings() -> FleetctlSettings:
    """The [fleetctl] table (all unset without a file); exits 2 naming the file when unusable."""
    try:
        return FleetctlSettings(config_file=config_path())
    except ConfigFileError as exc:
        typer.echo(f"fleetctl: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def coordinator_address(value: Optional[str]) -> str:
    """--coordinator or $STUDIOFLEET_COORDINATOR (typer passes either as `value`), else
    `coordinator` in [fleetctl] of the config file, else 127.0.0.1:7800."""
    return value or file_settings().coordinator or DEFAULT_COORDINATOR


COORDINATOR = typer.Option(
    None,
    "--coordinator",
    "-c",
    envvar=ENV_COORDINATOR,
    callback=coordinator_address,
    metavar="HOST:PORT",
    help=f"HOST:PORT of the coordinator. [default: coordinator in [fleetctl] of the config "
    f"file, else {DEFAULT_COORDINATOR}]",
)
TLS_DIR = typer.Option(
    None, "--tls-dir", envvar=ENV_DIR, help="Directory with ca.pem and your NAME.pem/NAME.key."
)
TLS_NAME = typer.Option(
    None,
    "--tls-name",
    envvar=ENV_NAME,
    help="Your certificate's name (operator role for admin commands, app for generate).",
)
PLAINTEXT = typer.Option(False, "--plaintext", help="No TLS: a loopback development fleet only.")


def credentials(
    tls_dir: Optional[Path], tls_name: Optional[str], plaintext: bool
) -> Optional[ClientTLS]:
    """The caller's ClientTLS (None for plaintext); exits 2 with the fix when unusable. What
    flags and env leave unset comes from [fleetctl]; its `plaintext` only when neither gave TLS."""
    if not plaintext and not (tls_dir and tls_name):
        conf = file_settings()
        plaintext = conf.plaintext and not (tls_dir or tls_name)
        tls_dir, tls_name = tls_dir or conf.tls_dir, tls_name or conf.tls_name
    if plaintext:
        return None
    if not tls_dir or not tls_name:
        typer.echo(
            f"fleetctl: no credentials: give --tls-dir and --tls-name (or {ENV_DIR} and {ENV_NAME}, or "
            f"tls_dir and tls_name in [fleetctl] of the config file); --plaintext for a loopback "
            "development fleet",
            err=True,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        return ClientTLS(tls_dir, tls_name)
    except TLSConfigError as exc:
        typer.echo(f"fleetctl: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def dial(target: str, tls: Optional[ClientTLS], server_name: Optional[str] = None) -> grpc.Channel:
    try:
        return open_channel(target, tls, server_name=server_name)
    except TLSConfigError as exc:
        typer.echo(f"fleetctl: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def call(target: str, tls: Optional[ClientTLS], fn: Callable[[grpc.Channel], T]) -> T:
    """Dial `target`, run `fn` on the channel (an RPC or a few) and close it; a gRPC error
    becomes fleetctl's exit, its message naming the target and what to do."""
    with dial(target, tls) as channel:
        try:
            return fn(channel)
        except grpc.RpcError as err:
            raise fail(from_rpc_error(err), target) from None
