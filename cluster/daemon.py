"""What every StudioFleet daemon shares: its gRPC keepalive policy, start-up and exit."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import os
import signal
import sys
from typing import Awaitable, Callable, Mapping, NoReturn, Optional, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

S = TypeVar("S")

# Coordinator <-> node and app <-> coordinator keepalive (shared/RELIABILITY.md): clients
# ping every ~10 s, so servers must allow pings that often, also on idle channels.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def print_listening(key: str, ident: str, listen: str, port: int, http=None, api=None) -> str:
    """The one JSON line on stdout a supervisor or test waits for; returns HOST:PORT. With
    the monitoring port (`http`, a MonitorHTTP) also its address and scheme; with the
    OpenAI front door (`api`) its address and scheme."""
    address = f"{listen.rpartition(':')[0]}:{port}"
    line = {"event": "listening", key: ident, "address": address, "port": port}
    if http is not None:
        line.update(http_address=http.address, http_scheme=http.scheme)
    if api is not None:
        line.update(openai_address=api.address, openai_scheme=api.scheme)
    print(json.dumps(line), flush=True)
    return address


def on_stop_signals(first: Callable[[str], None], second: Callable[[str], None]) -> None:
    """SIGTERM/SIGINT on the running loop: the first calls `first` (drain), any later one
    `second` (stop now); each gets the signal's name."""
    loop = asyncio.get_running_loop()
    count = 0

    def handle(signum: int) -> None:
        nonlocal count
        count += 1
        (first if count == 1 else second)(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


def run_daemon(
    prog: str,
    make_settings: Callable[[], S],
    serve: Callable[[S], Awaitable[int]],
    *,
    check: Optional[Callable[[S], Optional[str]]] = None,
    hints: Optional[Mapping[str, str]] = None,
) -> NoReturn:
    """Settings (exit 2 with the first bad one named, and where from if from the config file;
    `hints` names how to give a key that is missing), logging, `serve` until it returns,
    then exit with its code (1 if the address cannot be bound)."""
    from cluster.config_file import ConfigFileError
    from cluster.logs import setup_logging

    try:
        settings = make_settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(map(str, first["loc"]))
        hint = f"; give {hints[key]}" if first["type"] == "missing" and key in (hints or {}) else ""
        typer.echo(f"{prog}: invalid setting {key}: {first['msg']}{hint}", err=True)
        raise typer.Exit(2) from None
    except ConfigFileError as exc:  # the file itself, or a key in it
        typer.echo(f"{prog}: {exc}", err=True)
        raise typer.Exit(2) from None
    except SettingsError as exc:  # an environment value pydantic-settings cannot parse
        typer.echo(f"{prog}: invalid setting: {exc}", err=True)
        raise typer.Exit(2) from None
    problem = check(settings) if check else None
    if problem:
        typer.echo(f"{prog}: {problem}", err=True)
        raise typer.Exit(2)
    setup_logging(settings.log_level, getattr(settings, "log_format", "text"))
    faulthandler.enable()  # a native crash prints every thread's Python stack to stderr
    try:
        code = asyncio.run(serve(settings))
    except OSError as exc:
        typer.echo(f"{prog}: {exc}", err=True)
        raise typer.Exit(1) from None
    exit_now(code)


def exit_now(code: int) -> None:
    """Flush logs and stdio, then exit without interpreter teardown.

    Used after an orderly shutdown (server stopped, every request at its terminal outcome,
    engine thread joined) and when the second signal's deadline passes. Python's teardown
    would free gRPC's and MLX's native objects in whatever order the garbage collector
    picks; that has aborted the process (SIGABRT, seen once in CI), turning a clean drain
    into a crash exit that a supervisor (launchd) would report and restart.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
