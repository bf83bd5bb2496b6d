"""`fleetctl service ...`: run fleet-node and fleet-coordinator under launchd (macOS) or
systemd (Linux GPU hosts). `render` prints the service file on any OS; `install` checks
every path it names, writes it and starts the job; `uninstall` stops the job, removes it.

launchctl and systemctl run through a `Runner` argument, so the plans are tested without
root or a service manager (tests/test_service.py); the CLI always passes `run_command`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import typer

from cluster import service
from cluster.fleetctl.exits import EXIT_BAD_INPUT, EXIT_ERROR
from cluster.service import ServiceError, ServiceSpec

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

app = typer.Typer(
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    help="Run the daemons under launchd (macOS) or systemd (Linux): render, install, uninstall.",
)


class CommandFailed(Exception):
    """launchctl or systemctl failed (exit 1); the message has the command and its output."""


class ServiceRole(str, Enum):
    node = "node"
    coordinator = "coordinator"


class Format(str, Enum):
    launchd = "launchd"
    systemd = "systemd"


ROLE = typer.Option(..., "--role", help="Which daemon.")
FORMAT = typer.Option(None, "--format", help="[default: launchd on macOS, systemd elsewhere]")
PREFIX = typer.Option(
    None, help="Root of the default paths. [default: /usr/local for launchd, / for systemd]"
)
BIN_DIR = typer.Option(
    None, help="Holds fleet-node and fleet-coordinator. [default: this fleetctl's bin directory]"
)
MODEL = typer.Option(None, help="Node: local model directory (required for the node).")
STATE_DIR = typer.Option(None, help="Node: state directory. [default: WORKING_DIR/node]")
AUDIT_DIR = typer.Option(None, help="Coordinator: audit chain. [default: WORKING_DIR/audit]")
STATE_DB = typer.Option(
    None, help="Coordinator: rollout state. [default: WORKING_DIR/coordinator.db]"
)
TLS_DIR = typer.Option(
    None, help="Holds ca.pem, crl.pem, NAME.pem, NAME.key. [default: PREFIX/etc/studiofleet/tls]"
)
TLS_NAME = typer.Option(
    None, help="Certificate name. [default: the short host name for a node, else coordinator]"
)
CONFIG = typer.Option(
    None, help="TOML file with every other setting. [default: PREFIX/etc/studiofleet/fleet.toml]"
)
USER = typer.Option(
    None, help="Service user. [default: _studiofleet for launchd, studiofleet for systemd]"
)
GROUP = typer.Option(None, help="Service group. [default: the user's name]")
WORKING_DIR = typer.Option(
    None, help="[default: PREFIX/var/studiofleet for launchd, PREFIX/var/lib/studiofleet]"
)
LOG_DIR = typer.Option(
    None, help="ROLE.out.log and ROLE.err.log. [default: PREFIX/var/log/studiofleet]"
)
DEST = typer.Option(
    None, help="Where the service file goes. [default: /Library/LaunchDaemons, /etc/systemd/system]"
)
GRACE = typer.Option(
    None,
    "--shutdown-grace-s",
    help="Drain time on SIGTERM; the manager kills 15 s later. "
    "[default: shutdown_grace_s in the config file, else 30]",
)
RESTART_S = typer.Option(
    10, "--restart-delay-s", help="Pause before a restart (ThrottleInterval, RestartSec)."
)


def _spec(options: dict) -> ServiceSpec:
    role, fmt = options.pop("role"), options.pop("fmt")
    return service.build(role.value, fmt.value if fmt else None, **options)


@contextmanager
def _reported() -> Iterator[None]:
    """ServiceError exits 2, a failed command or file operation 1; each printed as one message."""
    try:
        yield
    except ServiceError as exc:
        typer.echo(f"fleetctl: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except CommandFailed as exc:
        typer.echo(f"fleetctl: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(
            f"fleetctl: {where}{exc.strerror or exc}; run as root (sudo), or choose paths you can write "
            "with --prefix and --dest",
            err=True,
        )
        raise typer.Exit(EXIT_ERROR) from None


def _managed(spec: ServiceSpec, hands_off: bool) -> bool:
    """Whether to drive the service manager ourselves: this host's manager, its own directory
    (a file elsewhere is for another host or a look), and root."""
    if hands_off or not can_manage(spec.fmt) or spec.dest != Path(service.LAYOUT[spec.fmt][1]):
        return False
    if os.geteuid() != 0:
        raise ServiceError(
            f"a system {spec.fmt} job needs root: run with sudo, or add --no-start / --no-stop "
            "to only write or remove the file"
        )
    return True


def _print_plan(title: str, plan: list[list[str]]) -> None:
    if plan:
        typer.echo(title)
        for argv in plan:
            note = "   # only if it is loaded" if argv[:2] == ["launchctl", "bootout"] else ""
            typer.echo(f"  {' '.join(argv)}{note}")


@app.command("render")
def render(
    role: ServiceRole = ROLE,
    fmt: Optional[Format] = FORMAT,
    prefix: Optional[Path] = PREFIX,
    bin_dir: Optional[Path] = BIN_DIR,
    model: Optional[Path] = MODEL,
    state_dir: Optional[Path] = STATE_DIR,
    audit_dir: Optional[Path] = AUDIT_DIR,
    state_db: Optional[Path] = STATE_DB,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    config: Optional[Path] = CONFIG,
    user: Optional[str] = USER,
    group: Optional[str] = GROUP,
    working_dir: Optional[Path] = WORKING_DIR,
    log_dir: Optional[Path] = LOG_DIR,
    shutdown_grace_s: Optional[float] = GRACE,
    restart_delay_s: int = RESTART_S,
) -> None:
    """Print the service file (any OS; nothing is checked or written)."""
    with _reported():
        typer.echo(service.render(_spec(locals())), nl=False)


@app.command("install")
def install(
    role: ServiceRole = ROLE,
    fmt: Optional[Format] = FORMAT,
    prefix: Optional[Path] = PREFIX,
    bin_dir: Optional[Path] = BIN_DIR,
    model: Optional[Path] = MODEL,
    state_dir: Optional[Path] = STATE_DIR,
    audit_dir: Optional[Path] = AUDIT_DIR,
    state_db: Optional[Path] = STATE_DB,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    config: Optional[Path] = CONFIG,
    user: Optional[str] = USER,
    group: Optional[str] = GROUP,
    working_dir: Optional[Path] = WORKING_DIR,
    log_dir: Optional[Path] = LOG_DIR,
    shutdown_grace_s: Optional[float] = GRACE,
    restart_delay_s: int = RESTART_S,
    dest: Optional[Path] = DEST,
    no_start: bool = typer.Option(
        False, "--no-start", help="Write the file only; print how to start it."
    ),
) -> None:
    """Check every path it names (exit 2: what is missing), create its directories, write it, (re)start it."""
    options = {k: v for k, v in locals().items() if k != "no_start"}
    with _reported():
        spec = _spec(options)
        managed = _managed(spec, no_start)
        path = service.install(spec, as_root=os.geteuid() == 0)
        typer.echo(f"wrote {path}; the daemon writes {', '.join(map(str, spec.writable()))}")
        if not managed:
            _print_plan("to start it, run as root:", start_plan(spec, loaded=True))
            return
        execute(
            spec, start_plan(spec, loaded=run_command(probe(spec)).returncode == 0), run_command
        )
        typer.echo(f"started {spec.name}; logs in {spec.log_dir}")


@app.command("uninstall")
def uninstall(
    role: ServiceRole = ROLE,
    fmt: Optional[Format] = FORMAT,
    dest: Optional[Path] = DEST,
    no_stop: bool = typer.Option(
        False, "--no-stop", help="Remove the file only; print how to stop it."
    ),
) -> None:
    """Stop the job and remove its service file; logs, state and the audit chain stay."""
    with _reported():
        spec = _spec({"role": role, "fmt": fmt, "dest": dest})
        managed = _managed(spec, no_stop)
        before, after = stop_plan(
            spec, loaded=not managed or run_command(probe(spec)).returncode == 0
        )
        if managed:
            execute(spec, before, run_command)
        gone = remove(spec)
        if managed:
            execute(spec, after, run_command)
        typer.echo(
            f"removed {', '.join(map(str, gone))}" if gone else f"no {spec.path}: nothing to remove"
        )
        if not managed:
            _print_plan("to stop the running job, run as root:", before + after)


def can_manage(fmt: str) -> bool:
    """Whether this host runs that service manager, so install/uninstall can drive it."""
    tool, platform = ("launchctl", "darwin") if fmt == "launchd" else ("systemctl", "linux")
    return sys.platform.startswith(platform) and shutil.which(tool) is not None


def probe(spec: ServiceSpec) -> list[str]:
    """Exits 0 while the job is loaded (launchd) or active (systemd)."""
    if spec.fmt == "launchd":
        return ["launchctl", "print", f"system/{spec.name}"]
    return ["systemctl", "is-active", "--quiet", spec.name]


def start_plan(spec: ServiceSpec, loaded: bool) -> list[list[str]]:
    """Commands that (re)start the job from the file just written."""
    if spec.fmt == "systemd":  # restart, not enable --now: a running unit must pick up the new file
        return [
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", spec.name],
            ["systemctl", "restart", spec.name],
        ]
    job = f"system/{spec.name}"
    return ([["launchctl", "bootout", job]] if loaded else []) + [
        ["launchctl", "enable", job],
        ["launchctl", "bootstrap", "system", str(spec.path)],
    ]


def stop_plan(spec: ServiceSpec, loaded: bool) -> tuple[list[list[str]], list[list[str]]]:
    """Commands before and after the file is removed; both work without the file (by label,
    or on the unit systemd still has loaded)."""
    if spec.fmt == "systemd":
        return ([["systemctl", "stop", spec.name]] if loaded else []), [
            ["systemctl", "daemon-reload"]
        ]
    return ([["launchctl", "bootout", f"system/{spec.name}"]] if loaded else []), []


def execute(
    spec: ServiceSpec,
    plan: list[list[str]],
    run: Runner,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Run `plan` in order, stopping at the first failure. After a bootout, wait until launchd
    has let the job go: it drains first, and a bootstrap meanwhile fails (errno 5)."""
    for argv in plan:
        done = run(argv)
        if done.returncode != 0:
            raise CommandFailed(
                f"`{' '.join(argv)}` failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout or '').strip() or 'no output'}"
            )
        if argv[:2] == ["launchctl", "bootout"]:
            for _ in range(spec.exit_timeout_s + 5):
                if run(probe(spec)).returncode != 0:
                    break
                sleep(1.0)
            else:
                raise CommandFailed(
                    f"{spec.name} is still loaded {spec.exit_timeout_s + 5} s after its bootout; "
                    f"see `launchctl print system/{spec.name}`"
                )


def run_command(argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    """The real Runner; CommandFailed if the command cannot run at all."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandFailed(f"`{' '.join(argv)}` could not run: {exc}") from None


def remove(spec: ServiceSpec) -> list[Path]:
    """Delete the service file and systemd's enable links to it; returns what was removed."""
    links = list(spec.dest.glob(f"*.wants/{spec.path.name}")) if spec.fmt == "systemd" else []
    gone = [p for p in [spec.path, *links] if p.is_symlink() or p.exists()]
    for p in gone:
        p.unlink()
    return gone
