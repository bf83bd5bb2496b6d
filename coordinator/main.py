"""`fleet-coordinator`: route requests over a fleet of node agents until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cluster import daemon as daemon_cli
from cluster.daemon import exit_now, on_stop_signals, print_listening, run_daemon

log = logging.getLogger("coordinator")

app = typer.Typer(rich_markup_mode=None, add_completion=False, help=__doc__)

HARD_EXIT_S = 10.0


async def _serve(settings) -> int:
    from cluster.security.daemon import DaemonSecurity, plaintext_exposure
    from cluster.security.identity import Role
    from coordinator.coordinator import Coordinator

    security = DaemonSecurity.from_settings(settings, Role.COORDINATOR, settings.coordinator_id)
    audit_log = await asyncio.to_thread(open_audit, settings)
    coordinator = Coordinator(settings=settings, security=security, audit_log=audit_log)
    port = await coordinator.start()
    address = print_listening("coordinator_id", settings.coordinator_id, settings.listen, port,
                              http=coordinator.http, api=coordinator.api)
    log.info("coordinator=%s listening on %s (mDNS %s, %d static nodes)", settings.coordinator_id,
             address, "on" if settings.mdns else "off", len(settings.nodes))
    loop = asyncio.get_running_loop()

    def drain(name: str) -> None:
        log.info("%s: finishing in-flight requests (grace %.1fs); send again to stop now",
                 name, settings.shutdown_grace_s)
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
        log.warning("AUDIT OFF: requests and admin actions are not recorded (plaintext development only)")
        return None
    from cluster.audit import AuditKeys, AuditLog
    from cluster.audit.keys import default_key_dir

    key_dir = settings.audit_key_dir or default_key_dir(settings.audit_dir)
    keys = AuditKeys.load_or_create(key_dir)
    audit_log = AuditLog(settings.audit_dir, keys=keys, source=settings.coordinator_id,
                         checkpoint_every=settings.audit_checkpoint_every,
                         checkpoint_interval_s=settings.audit_checkpoint_interval_s,
                         max_file_bytes=settings.audit_max_file_mb << 20)
    audit_log.open()
    log.info("audit chain %s open (keys %s, signing key %s)", settings.audit_dir, key_dir, keys.fingerprint)
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
    if settings.plaintext:
        remote = [n for n in settings.nodes if not is_loopback(n)]
        if remote:
            return f"--plaintext reaches loopback nodes only; {remote[0]} needs mTLS (--tls-dir)"
        if settings.mdns and settings.mdns_interface != "127.0.0.1":
            return "--plaintext browses mDNS on loopback only: add --mdns-interface 127.0.0.1 or --no-mdns"
        return plaintext_exposure(settings, (("--http-listen", settings.http_listen, 1),
                                             ("--openai-listen", settings.openai_listen, 2)))
    elif not settings.audit:
        return "--no-audit is for plaintext development only; an mTLS fleet always keeps its audit chain"
    return None


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", envvar="STUDIOFLEET_CONFIG", help="TOML config file; its [coordinator] table gives defaults that env vars and flags override."),
    listen: Optional[str] = typer.Option(None, metavar="HOST:PORT", help="HOST:PORT to serve on; port 0 picks a free one. [default: 127.0.0.1:7800]"),
    node: List[str] = typer.Option([], "--node", metavar="HOST:PORT", help="Static node address HOST:PORT (repeatable), for networks without multicast."),
    mdns: Optional[bool] = typer.Option(None, "--mdns/--no-mdns", help="Discover node agents over mDNS. [default: on]"),
    mdns_interface: Optional[str] = typer.Option(None, help="Address to browse mDNS on (127.0.0.1 for a local fleet). [default: all]"),
    fleet: Optional[str] = typer.Option(None, help="Take only nodes announcing this fleet name. [default: default]"),
    coordinator_id: Optional[str] = typer.Option(None, help="Name in logs, events and audit records. [default: the certificate's name (--tls-name); the host name with --plaintext]"),
    poll_interval_s: Optional[float] = typer.Option(None, help="Status poll per node, +-jitter. [default: 1.0]"),
    eject_after_failures: Optional[int] = typer.Option(None, help="Consecutive failures that eject a node. [default: 3]"),
    eject_base_s: Optional[float] = typer.Option(None, help="Ejection n lasts base x n seconds. [default: 2]"),
    readmit_after_probes: Optional[int] = typer.Option(None, help="Passing probes before readmission. [default: 3]"),
    queue_max_depth: Optional[int] = typer.Option(None, help="Requests waiting for a node before RESOURCE_EXHAUSTED. [default: 256]"),
    queue_max_wait_s: Optional[float] = typer.Option(None, help="Longest wait for a node. [default: 10]"),
    max_failovers: Optional[int] = typer.Option(None, help="Node moves per request. [default: 3]"),
    first_token_timeout_s: Optional[float] = typer.Option(None, help="A node call with no first token this long moves to another node. [default: 120]"),
    stall_timeout_s: Optional[float] = typer.Option(None, help="A node that sends no next token this long (time spent waiting for the caller to read excluded) is failed over. [default: 30]"),
    shutdown_grace_s: Optional[float] = typer.Option(None, help="Seconds in-flight requests get on SIGTERM. [default: 30]"),
    max_concurrent_per_caller: Optional[int] = typer.Option(None, help="Requests in flight per caller identity. [default: 64]"),
    tls_dir: Optional[Path] = typer.Option(None, help="Directory with ca.pem, crl.pem and NAME.pem/NAME.key. [env: STUDIOFLEET_TLS_DIR]"),
    tls_name: Optional[str] = typer.Option(None, help="Certificate name (role coordinator). [default: the coordinator id]"),
    plaintext: Optional[bool] = typer.Option(None, "--plaintext", help="No TLS, no roles: loopback development only."),
    audit: Optional[bool] = typer.Option(None, "--audit/--no-audit", help="Keep the audit chain (off: plaintext only). [default: on]"),
    audit_dir: Optional[Path] = typer.Option(None, help="Audit chain directory. [default: ./studiofleet-audit]"),
    audit_key_dir: Optional[Path] = typer.Option(None, help="Audit HMAC and signing keys. [default: AUDIT_DIR-keys, beside the log]"),
    audit_witness_refuse: Optional[bool] = typer.Option(None, "--audit-witness-refuse/--audit-witness-alert", help="A node holding an audit HEAD for records the chain lacks (a cut tail) stops the coordinator (exit 3), or only raises the alarm. [default: refuse]"),
    state_db: Optional[Path] = typer.Option(None, help="SQLite file for rollout state and the rollout lease. [default: ./studiofleet-coordinator.db]"),
    rollout_gate_command: Optional[str] = typer.Option(None, help="Quality gate run after a node activates new weights; exit 0 passes (env NODE_ID, NODE_ADDRESS, WEIGHTS_DIGEST, ROLLOUT_ID)."),
    rollout_eval_suite: Optional[str] = typer.Option(None, help="Eval gate: a suite file (TOML, e.g. the starter suite); a node rejoins only if its score is within --rollout-eval-margin of the current version's."),
    rollout_eval_margin: Optional[float] = typer.Option(None, help="How far under the current version's suite score a new version may score. [default: 0.05]"),
    rollout_eval_min_score: Optional[float] = typer.Option(None, help="The eval gate's floor, whatever the current version scores. [default: 0]"),
    rollout_eval_template: Optional[str] = typer.Option(None, help="Prompt template for the eval gate instead of the suite's (e.g. soap-brief)."),
    http_listen: Optional[str] = typer.Option(None, metavar="HOST:PORT", help="HOST:PORT of the monitoring port (/metrics, dashboard), or off. [default: the --listen host, port + 1]"),
    metrics: Optional[bool] = typer.Option(None, "--metrics/--no-metrics", help="Prometheus metrics on the monitoring port. [default: on]"),
    request_log: Optional[bool] = typer.Option(None, "--request-log/--no-request-log", help="Keep every request's metadata in --state-db (fleetctl requests). [default: on]"),
    request_log_retention_days: Optional[float] = typer.Option(None, help="Request log rows older than this are deleted. [default: 30]"),
    slow_ttft_ms: Optional[float] = typer.Option(None, help="A request slower than this to its first token is slow (fleetctl requests --slow). [default: 2000]"),
    openai_listen: Optional[str] = typer.Option(None, metavar="HOST:PORT", help="HOST:PORT of the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models), or off. [default: the --listen host, port + 2]"),
    openai_default_max_tokens: Optional[int] = typer.Option(None, help="Tokens an OpenAI request without max_tokens may generate, within the context. [default: 2048]"),
    openai_max_body_kb: Optional[int] = typer.Option(None, help="Largest OpenAI request body; larger ones get 413. [default: 4096]"),
    http_handshake_timeout_s: Optional[float] = daemon_cli.HTTP_HANDSHAKE_TIMEOUT_S,
    http_header_timeout_s: Optional[float] = daemon_cli.HTTP_HEADER_TIMEOUT_S,
    http_idle_timeout_s: Optional[float] = daemon_cli.HTTP_IDLE_TIMEOUT_S,
    http_body_timeout_s: Optional[float] = daemon_cli.HTTP_BODY_TIMEOUT_S,
    http_max_connections: Optional[int] = daemon_cli.HTTP_MAX_CONNECTIONS,
    http_max_unauthenticated: Optional[int] = daemon_cli.HTTP_MAX_UNAUTHENTICATED,
    http_denial_window_s: Optional[float] = daemon_cli.HTTP_DENIAL_WINDOW_S,
    http_denial_burst: Optional[int] = daemon_cli.HTTP_DENIAL_BURST,
    http_unauthenticated_per_window: Optional[int] = daemon_cli.HTTP_UNAUTHENTICATED_PER_WINDOW,
    log_format: Optional[str] = typer.Option(None, help="json (one JSON object per line) or text. [default: json]"),
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING. [default: INFO]"),
) -> None:
    flags = {k: v for k, v in locals().items() if v is not None and k not in ("node", "config")}
    if node:
        flags["nodes"] = tuple(node)
    from cluster.config import CoordinatorSettings

    run_daemon("fleet-coordinator", lambda: CoordinatorSettings(config_file=config, **flags), _serve, check=check)


def main() -> None:
    app(prog_name="fleet-coordinator")


if __name__ == "__main__":
    sys.exit(main())
