"""`fleetctl rollout start|status|pause|resume|abort`: rolling model updates and release
restarts, run by the coordinator. Exit codes: 0 succeeded (or started, without --wait),
7 failed (the failing node was put back), 8 aborted, 9 paused (a wait ran out: the message
names what blocks it; `rollout resume` continues); the usual codes for refusals."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer
from google.protobuf.json_format import MessageToDict

from cluster.api import fleet_pb2
from cluster.fleetctl.connect import COORDINATOR, PLAINTEXT, TLS_DIR, TLS_NAME, credentials
from cluster.fleetctl.exits import EXIT_ROLLOUT_ABORTED, EXIT_ROLLOUT_FAILED, EXIT_ROLLOUT_PAUSED
from cluster.fleetctl.ops_cmd import OUTPUT, _call

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True, help=__doc__)
TERMINAL = (
    fleet_pb2.ROLLOUT_STATE_SUCCEEDED,
    fleet_pb2.ROLLOUT_STATE_FAILED,
    fleet_pb2.ROLLOUT_STATE_ABORTED,
)
_EXIT = {
    fleet_pb2.ROLLOUT_STATE_FAILED: EXIT_ROLLOUT_FAILED,
    fleet_pb2.ROLLOUT_STATE_ABORTED: EXIT_ROLLOUT_ABORTED,
    fleet_pb2.ROLLOUT_STATE_PAUSED: EXIT_ROLLOUT_PAUSED,
}


def state_name(r: fleet_pb2.Rollout) -> str:
    return fleet_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_").lower()


def render(r: fleet_pb2.Rollout) -> str:
    t = r.target
    what = "release restart" if t.restart else f"{t.model_id} {t.version} {t.weights_digest[:19]}"
    done = sum(n.step == "done" for n in r.nodes)
    lines = [
        f"rollout {r.rollout_id}: {state_name(r)} ({done}/{len(r.nodes)} nodes done) -> {what}, "
        f"max unavailable {r.max_unavailable}, owner {r.owner or '-'}, started by {r.started_by or '-'}"
    ]
    if r.message:
        lines.append(f"  {r.message}")
    for n in r.nodes:
        staged = (
            f" {100 * n.bytes_done // n.bytes_total}% staged"
            if n.bytes_total and n.step == "stage"
            else ""
        )
        when = (
            datetime.fromtimestamp(n.finished_unix_s).strftime(" %H:%M:%S")
            if n.finished_unix_s
            else ""
        )
        lines.append(f"  {n.node_id:<16} {n.step:<12}{staged}{when} {n.message}")
    return "\n".join(lines)


def _show(r: fleet_pb2.Rollout, output: str) -> None:
    if output == "json":
        typer.echo(json.dumps(MessageToDict(r, preserving_proto_field_name=True)))
    else:
        typer.echo(render(r))


def _follow(coordinator: str, tls, rollout_id: str, output: str) -> fleet_pb2.Rollout:
    """Re-read the rollout until it ends or pauses; print it whenever it changed (the live view)."""
    shown = ""
    while True:
        r = _call(
            coordinator,
            tls,
            lambda stub: stub.GetRollout(
                fleet_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=10
            ),
        )
        text = render(r)
        if text != shown and output != "json":
            typer.echo(("\n" if shown else "") + text, err=not sys.stdout.isatty())
            shown = text
        if r.state in TERMINAL or r.state == fleet_pb2.ROLLOUT_STATE_PAUSED:
            return r
        time.sleep(0.5)  # refresh twice a second


def _end(r: fleet_pb2.Rollout, output: str) -> None:
    _show(r, output)
    if r.state in _EXIT:
        raise typer.Exit(_EXIT[r.state])


@app.command("start")
def start(
    model: Optional[Path] = typer.Option(
        None,
        "--model",
        help="The new model directory (on this coordinator's "
        "host; pushed to each node), or with --shared-path on every node.",
    ),
    version: str = typer.Option("", help="Version label the nodes report."),
    model_id: str = typer.Option(
        "",
        help="Model id the nodes serve after the rollout (what clients ask for). "
        "[default: the id they serve now; a different one renames the model, "
        "which the plan shows and asks to confirm]",
    ),
    digest: str = typer.Option(
        "", help="Expected weights digest (sha256:...); required with --shared-path."
    ),
    shared_path: bool = typer.Option(False, "--shared-path", help="Nodes read --model themselves."),
    restart: bool = typer.Option(
        False, "--restart", help="A release restart instead of a model update."
    ),
    max_unavailable: int = typer.Option(1, help="Nodes out of service at once."),
    node: List[str] = typer.Option(
        [], "--node", help="Only these node ids (repeatable). [default: all]"
    ),
    engine: str = typer.Option(
        "", help="Only nodes of this engine (mlx or vllm): each engine loads its own weights."
    ),
    drain_timeout: float = typer.Option(120.0, help="Seconds each node's requests get to finish."),
    wait_timeout: float = typer.Option(
        300.0,
        "--wait-timeout",
        help="Seconds a wait (for capacity, for a node) may "
        "last before the rollout pauses, naming what blocks it.",
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Confirm a model rename without asking."),
    rollout_id: str = typer.Option("", help="[default: generated]"),
    wait: bool = typer.Option(
        False, "--wait", help="Follow the rollout until it ends (exit code says how)."
    ),
    coordinator: str = COORDINATOR,
    output: str = OUTPUT,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Roll a new model (or restart the release) across the fleet, one node at a time."""
    if bool(model) == restart:
        typer.echo("fleetctl: give --model DIR or --restart (one of them)", err=True)
        raise typer.Exit(2)
    path = str(model.resolve()) if model and not shared_path else str(model or "")
    tls = credentials(tls_dir, tls_name, plaintext)
    rename = False
    if not restart:
        listing = _call(
            coordinator, tls, lambda stub: stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        )
        renamed = plan(listing, node, engine, model_id, path, version)
        if renamed:
            if not yes and not sys.stdin.isatty():
                typer.echo(
                    "fleetctl: this rollout renames the served model; confirm with --yes", err=True
                )
                raise typer.Exit(2)
            if not yes and not typer.confirm(
                f"Rename the served model {', '.join(renamed)} to {model_id}?", err=True
            ):
                typer.echo("fleetctl: nothing started", err=True)
                raise typer.Exit(1)
            rename = True
    req = fleet_pb2.StartRolloutRequest(
        target=fleet_pb2.RolloutTarget(
            model_path=path,
            model_id=model_id,
            version=version,
            weights_digest=digest,
            shared_path=shared_path,
            restart=restart,
        ),
        max_unavailable=max_unavailable,
        node_ids=node,
        rollout_id=rollout_id,
        drain_timeout_s=drain_timeout,
        engine=engine,
        rename_model=rename,
        wait_timeout_s=wait_timeout,
    )
    r = _call(coordinator, tls, lambda stub: stub.StartRollout(req, timeout=120))
    if not wait:
        _show(r, output)
        return
    _end(_follow(coordinator, tls, r.rollout_id, output), output)


def plan(
    listing: fleet_pb2.ListNodesResponse,
    only: List[str],
    engine: str,
    model_id: str,
    path: str,
    version: str,
) -> List[str]:
    """Print what the rollout will do (on stderr); return the served model ids it renames."""
    nodes = [
        n
        for n in listing.nodes
        if n.status.node_id
        and (not only or n.status.node_id in only)
        and (not engine or n.status.model.engine == engine)
    ]
    current = sorted({n.status.model.model_id for n in nodes if n.status.model.model_id})
    renamed = [c for c in current if model_id and c != model_id]
    # As the coordinator orders them: cordoned first (left cordoned), then any other not serving.
    out = sorted(nodes, key=lambda n: (not n.status.cordoned, n.routable))
    lines = [
        f"plan: {path or 'the model'}{' ' + version if version else ''} to "
        f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    ]
    if renamed:
        lines.append(
            f"  RENAME: the served model {', '.join(renamed)} becomes {model_id}: clients asking for "
            f"{renamed[0]!r} (the OpenAI API's model) get 404 once their nodes are updated"
        )
    else:
        lines.append(f"  model id: {model_id or ', '.join(current) or 'the directory name'} (kept)")
    for n in out:
        note = (
            "  (cordoned: updated first, left cordoned)"
            if n.status.cordoned
            else ""
            if n.routable
            else "  (not serving: updated early)"
        )
        lines.append(
            f"  {n.status.node_id:<16} {n.status.model.model_id} {n.status.model.version}{note}"
        )
    typer.echo("\n".join(lines), err=True)
    return renamed


@app.command("status")
def status(
    rollout_id: str = typer.Argument("", help="[default: the latest]"),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow it until it ends."),
    coordinator: str = COORDINATOR,
    output: str = OUTPUT,
    tls_dir: Optional[Path] = TLS_DIR,
    tls_name: Optional[str] = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """A rollout's state and every node's step."""
    tls = credentials(tls_dir, tls_name, plaintext)
    if watch:
        _end(_follow(coordinator, tls, rollout_id, output), output)
        return
    r = _call(
        coordinator,
        tls,
        lambda stub: stub.GetRollout(
            fleet_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=10
        ),
    )
    _show(r, output)


def _control(action: str):
    def command(
        rollout_id: str = typer.Argument("", help="[default: the running one]"),
        coordinator: str = COORDINATOR,
        output: str = OUTPUT,
        tls_dir: Optional[Path] = TLS_DIR,
        tls_name: Optional[str] = TLS_NAME,
        plaintext: bool = PLAINTEXT,
    ) -> None:
        tls = credentials(tls_dir, tls_name, plaintext)
        method = {"pause": "PauseRollout", "resume": "ResumeRollout", "abort": "AbortRollout"}[
            action
        ]
        r = _call(
            coordinator,
            tls,
            lambda stub: getattr(stub, method)(
                fleet_pb2.RolloutControl(rollout_id=rollout_id), timeout=10
            ),
        )
        _show(r, output)

    command.__doc__ = {
        "pause": "Finish the node steps under way, start no new node.",
        "resume": "Continue a paused rollout.",
        "abort": "Stop for good after the node steps under way.",
    }[action]
    return command


for _action in ("pause", "resume", "abort"):
    app.command(_action)(_control(_action))
