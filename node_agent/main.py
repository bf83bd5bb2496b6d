"""`fleet-node`: serve a local model over gRPC until SIGTERM (first drains, second exits)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from cluster.config import NodeSettings
from cluster.daemon import exit_now, on_stop_signals, print_listening, run_daemon
from cluster.offline import force_offline
from cluster.settings_cli import settings_command

log = logging.getLogger("node_agent")

app = typer.Typer(rich_markup_mode=None, add_completion=False, help=__doc__)

HARD_EXIT_S = 10.0


async def _serve(settings) -> int:
    from cluster.security.daemon import DaemonSecurity
    from cluster.security.identity import Role
    from node_agent.agent import NodeAgent, default_node_id
    from node_agent.engines import make_engine

    security = DaemonSecurity.from_settings(
        settings, Role.NODE, settings.node_id or default_node_id(settings.listen)
    )
    agent = NodeAgent(settings=settings, engine=make_engine(settings), security=security)
    port = await agent.start()
    address = print_listening("node_id", agent.node_id, settings.listen, port, http=agent.http)
    log.info("node=%s listening on %s", agent.node_id, address)
    loop = asyncio.get_running_loop()

    def drain(name: str) -> None:
        log.info(
            "node=%s %s: draining (grace %.1fs); send again to stop now",
            agent.node_id,
            name,
            settings.shutdown_grace_s,
        )
        loop.create_task(agent.shutdown())

    def stop_now(name: str) -> None:
        log.warning(
            "node=%s second %s: ending in-flight requests now; exiting within %.0fs",
            agent.node_id,
            name,
            HARD_EXIT_S,
        )
        agent.registry.abort_all(lambda s: _stopping(f"second {name}"))
        # A shutdown stuck behind a model load or a hung engine must not outlive this.
        loop.call_later(HARD_EXIT_S, _hard_exit, agent.node_id)

    on_stop_signals(drain, stop_now)
    loading = loop.create_task(agent.come_up())
    await agent.wait_stopped()
    loading.cancel()
    return agent.exit_code


def _hard_exit(node_id: str) -> None:
    log.error("node=%s did not stop in time after the second signal; exiting now", node_id)
    exit_now(1)


def _stopping(reason: str):
    from node_agent.requests import NodeStopping

    return NodeStopping(reason)


def run(config: Optional[Path], flags: dict) -> None:
    force_offline()

    def check(settings) -> Optional[str]:
        if not settings.model_path.is_dir():
            return (
                f"model {settings.model_path} is not a directory; point it at a local MLX model "
                "(make one with `fleetctl model make-tiny DIR`)"
            )
        return (
            engine_problem(settings)
            or group_problem(settings)
            or security_problem(settings)
            or state_problem(settings)
        )

    run_daemon(
        "fleet-node",
        lambda: NodeSettings(config_file=config, **flags),
        _serve,
        check=check,
        hints={"model_path": "--model DIR or model_path in [node] of the --config file"},
    )


settings_command(
    app,
    NodeSettings,
    "TOML config file; its [node] table gives defaults that env vars and flags override.",
    run,
)


def engine_problem(settings) -> Optional[str]:
    """An engine that cannot run here, as one line naming the fix; None if fine."""
    from node_agent.engines import ENGINES

    if settings.engine not in ENGINES:
        return f"unknown engine {settings.engine!r}; use one of: {', '.join(ENGINES)}"
    if settings.engine == "upstream":
        return upstream_problem(settings)
    if settings.engine == "vllm":
        import subprocess

        from node_agent.engines.vllm_server import has_vllm

        python = settings.vllm_python or sys.executable
        try:
            ok = has_vllm(python)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"vllm_python {python} cannot be run ({type(exc).__name__}); point --vllm-python at a Python"
        if not ok:
            return (
                f"vllm_python {python} has no vllm package; install vLLM in a virtualenv (GPU: pip install "
                "vllm; CPU: scripts/bootstrap-vllm) and pass its python with --vllm-python"
            )
    return None


def group_problem(settings) -> Optional[str]:
    """A node group this machine cannot form, as one line naming the fix; None if fine."""
    if not settings.group:
        return None
    from node_agent.group import backend_problem

    return backend_problem(settings.group_backend)


def upstream_problem(settings) -> Optional[str]:
    """The upstream engine's flags, checked before anything starts (docs/upstream.md)."""
    from node_agent.engines.upstream_engine import KeyFileError, read_key

    if not settings.phi_allowed:
        return (
            "--engine upstream sends prompts (PHI) to a remote endpoint: pass --phi-allowed to declare that "
            "the endpoint is covered for PHI (e.g. under a BAA with its operator); without it the node "
            "does not start"
        )
    if not settings.upstream_url:
        return "--upstream-url is required with --engine upstream: the endpoint's base URL, e.g. https://host:8000"
    if not settings.upstream_model:
        return "--upstream-model is required with --engine upstream: the model name the endpoint serves"
    try:
        read_key(settings.upstream_key_file)
    except KeyFileError as exc:
        return str(exc)
    if settings.upstream_kind == "openai" and settings.upstream_digest:
        return (
            "--upstream-digest applies to --upstream-kind vllm only: an openai-kind node's "
            "digest is remote:<provider>/<model> and it never takes part in an exact resume"
        )
    if settings.upstream_ca_file is not None and not settings.upstream_ca_file.is_file():
        return f"--upstream-ca-file {settings.upstream_ca_file} is not a file; point it at a PEM CA bundle"
    return None


def security_problem(settings) -> Optional[str]:
    """Credentials that cannot serve this node, as one line naming the fix; None if fine."""
    from cluster.security.daemon import DaemonSecurity, plaintext_exposure
    from cluster.security.identity import Role
    from cluster.security.tls import TLSConfigError
    from node_agent.agent import default_node_id

    try:
        security = DaemonSecurity.from_settings(
            settings, Role.NODE, settings.node_id or default_node_id(settings.listen)
        )
    except TLSConfigError as exc:
        return str(exc)
    if (
        exposed := plaintext_exposure(settings, (("--http-listen", settings.http_listen, 1),))
    ) is not None:
        return exposed
    ident = security.identity
    if ident is not None and settings.node_id and settings.node_id != ident.name:
        return (
            f"--node-id {settings.node_id} does not match the certificate, which names node {ident.name}; "
            "a node's id is its certificate's name: drop --node-id or issue a certificate for it"
        )
    return None


def state_problem(settings) -> Optional[str]:
    """A state file the node cannot trust (it holds the cordon), as one line; None if fine."""
    from node_agent.node_state import NodeState
    from node_agent.state_lock import hold

    if (busy := hold(settings.state_dir)) is not None:
        return busy
    try:
        NodeState.load(settings.state_dir)
    except RuntimeError as exc:
        return f"state directory {settings.state_dir}: {exc}"
    return None


def main() -> None:
    app(prog_name="fleet-node")


if __name__ == "__main__":
    sys.exit(main())
