"""`fleet-coordinator`: route requests over a fleet of node agents until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from cluster.config import CoordinatorSettings
from cluster.daemon import exit_now, on_stop_signals, print_listening, run_daemon
from cluster.settings_cli import settings_command

log = logging.getLogger("coordinator")

app = typer.Typer(rich_markup_mode=None, add_completion=False, help=__doc__)

HARD_EXIT_S = 10.0


async def _serve(settings) -> int:
    from cluster.security.daemon import DaemonSecurity
    from cluster.security.identity import Role
    from coordinator.coordinator import Coordinator

    security = DaemonSecurity.from_settings(settings, Role.COORDINATOR, settings.coordinator_id)
    audit_log = await asyncio.to_thread(open_audit, settings)
    coordinator = Coordinator(settings=settings, security=security, audit_log=audit_log)
    port = await coordinator.start()
    address = print_listening(
        "coordinator_id",
        settings.coordinator_id,
        settings.listen,
        port,
        http=coordinator.http,
        api=coordinator.api,
    )
    log.info(
        "coordinator=%s listening on %s (mDNS %s, %d static nodes)",
        settings.coordinator_id,
        address,
        "on" if settings.mdns else "off",
        len(settings.nodes),
    )
    loop = asyncio.get_running_loop()

    def drain(name: str) -> None:
        log.info(
            "%s: finishing in-flight requests (grace %.1fs); send again to stop now",
            name,
            settings.shutdown_grace_s,
        )
        loop.create_task(coordinator.shutdown())

    def stop_now(name: str) -> None:
        log.warning("second %s: stopping now", name)
        loop.create_task(coordinator.shutdown(0))
        loop.call_later(HARD_EXIT_S, exit_now, 1)

    on_stop_signals(drain, stop_now)
    await coordinator.wait_stopped()
    return coordinator.exit_code


def open_audit(settings):
    """The audit chain, recovered and open; None when it is off (plaintext development)."""
    if not settings.audit:
        log.warning(
            "AUDIT OFF: requests and admin actions are not recorded (plaintext development only)"
        )
        return None
    from cluster.audit import AuditKeys, AuditLog
    from cluster.audit.keys import default_key_dir

    key_dir = settings.audit_key_dir or default_key_dir(settings.audit_dir)
    keys = AuditKeys.load_or_create(key_dir)
    audit_log = AuditLog(
        settings.audit_dir,
        keys=keys,
        source=settings.coordinator_id,
        checkpoint_every=settings.audit_checkpoint_every,
        checkpoint_interval_s=settings.audit_checkpoint_interval_s,
        max_file_bytes=settings.audit_max_file_mb << 20,
    )
    audit_log.open()
    log.info(
        "audit chain %s open (keys %s, signing key %s)",
        settings.audit_dir,
        key_dir,
        keys.fingerprint,
    )
    return audit_log


def check(settings) -> Optional[str]:
    """Settings that cannot run safely, as one line naming the fix; None if fine."""
    from cluster.security.daemon import DaemonSecurity, plaintext_exposure
    from cluster.security.identity import Role
    from cluster.security.tls import TLSConfigError, is_loopback

    try:
        DaemonSecurity.from_settings(settings, Role.COORDINATOR, settings.coordinator_id)
    except TLSConfigError as exc:
        return str(exc)
    capacity = check_capacity_profiles(settings)
    if capacity:
        return capacity
    if settings.plaintext:
        remote = [n for n in settings.nodes if not is_loopback(n)]
        if remote:
            return f"--plaintext reaches loopback nodes only; {remote[0]} needs mTLS (--tls-dir)"
        if settings.mdns and settings.mdns_interface != "127.0.0.1":
            return "--plaintext browses mDNS on loopback only: add --mdns-interface 127.0.0.1 or --no-mdns"
        return plaintext_exposure(
            settings,
            (
                ("--http-listen", settings.http_listen, 1),
                ("--openai-listen", settings.openai_listen, 2),
            ),
        )
    elif not settings.audit:
        return "--no-audit is for plaintext development only; an mTLS fleet always keeps its audit chain"
    return None


def check_capacity_profiles(settings) -> Optional[str]:
    """Each --capacity-profile loads (a file that does not, or an unknown name, is named)."""
    from cluster.capacity.profile import ProfileError, resolve_profile

    for spec in settings.capacity_profiles:
        try:
            resolve_profile(spec)
        except ProfileError as exc:
            return f"--capacity-profile: {exc}"
    return None


def run(config: Optional[Path], flags: dict) -> None:
    run_daemon(
        "fleet-coordinator",
        lambda: CoordinatorSettings(config_file=config, **flags),
        _serve,
        check=check,
    )


settings_command(
    app,
    CoordinatorSettings,
    "TOML config file; its [coordinator] table gives defaults that env vars and flags override.",
    run,
)


def main() -> None:
    app(prog_name="fleet-coordinator")


if __name__ == "__main__":
    sys.exit(main())
