"""`fleetctl profile`: measure one node's performance and write its capacity profile
(docs/capacity.md "Measuring a node"); the measuring and the fit are cluster.capacity.measure."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cluster.api import common_pb2, fleet_pb2, fleet_pb2_grpc, node_pb2, node_pb2_grpc
from cluster.capacity import measure
from cluster.capacity.profile import Profile, ProfileError, load_profile
from cluster.capacity.workload import NOTE_TEMPERATURE
from cluster.client import AsyncFleetClient
from cluster.client.errors import FleetError, from_rpc_error
from cluster.config import split_host_port
from cluster.fleetctl.connect import PLAINTEXT, TLS_DIR, TLS_NAME, credentials, dial
from cluster.fleetctl.exits import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_UNAVAILABLE, fail
from cluster.security.identity import ANY_NODE
from cluster.security.tls import ClientTLS


def _stop(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"fleetctl profile: {message}", err=True)
    return typer.Exit(code)


def profile(
    target: str = typer.Option(
        ...,
        "--target",
        metavar="HOST:PORT",
        help="HOST:PORT of a coordinator (app "
        "certificate) that routes to exactly one node, or with --node of a node agent "
        "(coordinator certificate).",
    ),
    node: bool = typer.Option(False, "--node", help="TARGET is a node agent, not a coordinator."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="The profile file to write. [default: "
        "MODEL-NODE-ENGINE.toml in the current directory]",
    ),
    output: str = typer.Option(
        "text", "--output", "-o", help="text (a summary) or json (the profile)."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Fewer and shorter measurements: about half the time."
    ),
    repeats: int | None = typer.Option(
        None,
        "--repeats",
        help="Rounds over the grid, 1-9 (prefill points keep the fastest, decode "
        "points the median). "
        "[default: 3, 2 with --quick]",
    ),
    timeout_s: float = typer.Option(300.0, "--timeout-s", help="Deadline per request."),
    temperature: float = typer.Option(
        NOTE_TEMPERATURE,
        "--temperature",
        help="The sampling temperature of the measured requests (seeded when over 0): the "
        "workload's, since sampling costs more per sequence than greedy decoding; the default is "
        "fleetctl replay's notes'. 0: greedy.",
    ),
    operator_tls_name: str | None = typer.Option(
        None,
        "--operator-tls-name",
        help="Through a coordinator: "
        "the operator certificate that reads its node list (the "
        "requests use --tls-name). [default: --tls-name]",
    ),
    tls_dir: Path | None = TLS_DIR,
    tls_name: str | None = TLS_NAME,
    plaintext: bool = PLAINTEXT,
) -> None:
    """Measure prefill time against prompt length (with and without a cached prefix), decode
    step time against running sequences and context, time to first token under load and
    memory; fit the planner's step-time model and write the profile (TOML). Synthetic
    prompts only. Profile a node that carries no other traffic."""
    if output not in ("text", "json"):
        raise _stop(f"--output must be text or json, not {output!r}")
    try:
        if split_host_port(target)[1] == 0:
            raise ValueError(f"port 0 is no address to call, got {target!r}")
    except ValueError as exc:
        raise _stop(f"--target: {exc}") from None
    if repeats is not None and not 1 <= repeats <= 9:
        raise _stop(f"--repeats must be 1 to 9, not {repeats}")
    if not 0 <= temperature <= 2:
        raise _stop(f"--temperature must be 0 to 2, not {temperature:g}")
    if not 0 < timeout_s <= 3600:
        raise _stop(f"--timeout-s must be over 0 and at most 3600, not {timeout_s}")
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise _stop(
            f"--out: {out} is a directory" if out.is_dir() else f"--out: no directory {out.parent}"
        )
    tls = credentials(tls_dir, tls_name, plaintext)
    before = (
        _node_status(target, tls)
        if node
        else _routed_node(
            target,
            tls
            if operator_tls_name is None
            else credentials(tls_dir, operator_tls_name, plaintext),
        )
    )
    _check_ready(before, target)
    limits = measure.limits_of(before)
    sizes = measure.plan_sizes(limits, quick=quick, repeats=repeats)
    through = (
        f"on node {before.node_id} at {target}"
        if node
        else f"through the coordinator at {target} (its one routable node, {before.node_id})"
    )
    typer.echo(
        f"fleetctl profile: measuring {before.model.model_id} {through}; synthetic prompts",
        err=True,
    )

    async def run(advance) -> measure.Measured:
        async with AsyncFleetClient(
            target, tls=tls, plaintext=tls is None, server_name=ANY_NODE if node and tls else None
        ) as client:
            prober = measure.Prober(
                client,
                limits,
                node_id="" if node else before.node_id,
                timeout_s=timeout_s,
                temperature=temperature,
            )
            return await measure.measure(prober, sizes, advance)

    console = Console(stderr=True)
    try:
        with Progress(
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=not console.is_terminal,
        ) as bar:
            task = bar.add_task("profiling", total=sizes.planned)
            measured = asyncio.run(
                run(lambda what, n: bar.update(task, description=what, advance=n))
            )
        fitted = measure.fit(measured)
    except FleetError as err:
        raise fail(err, target) from None
    except measure.MeasureError as exc:
        raise _stop(f"{target}: {exc}", EXIT_ERROR) from None
    after = (
        _node_status(target, tls)
        if node
        else _routed_node(
            target,
            tls
            if operator_tls_name is None
            else credentials(tls_dir, operator_tls_name, plaintext),
        )
    )
    prof = measure.build_profile(
        before,
        after,
        measured,
        fitted,
        command=_command_line(),
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        through=through,
        temperature=temperature,
    )
    path = out or Path(f"{prof.name}.toml")
    try:
        prof.save(path)
        load_profile(path)  # what was written reads back
    except (OSError, ProfileError) as exc:
        raise _stop(f"--out: {exc}", EXIT_ERROR) from None
    if output == "json":
        typer.echo(json.dumps(prof.to_dict()))
    else:
        _summary(prof, fitted)
    typer.echo(f"fleetctl profile: profile written to {path}", err=True)


def _command_line() -> str:
    return shlex.join(["fleetctl", *sys.argv[1:]])


def _node_status(target: str, tls: ClientTLS | None) -> node_pb2.NodeStatus:
    with dial(target, tls, ANY_NODE if tls else None) as channel:
        try:
            return node_pb2_grpc.NodeStub(channel).GetStatus(
                node_pb2.GetStatusRequest(), timeout=10
            )
        except grpc.RpcError as err:
            # A coordinator's certificate names no node (TLS), or it serves no Node service (plaintext).
            if err.code() == grpc.StatusCode.UNIMPLEMENTED or "Hostname Verification" in (
                err.details() or ""
            ):
                raise _stop(
                    f"{target} is not a node agent (a coordinator?): drop --node to profile through a "
                    "coordinator, or give a node agent's address"
                ) from None
            raise _unreachable(err, target, "node agent") from None


def _routed_node(target: str, tls: ClientTLS | None) -> node_pb2.NodeStatus:
    """The status of the one node the coordinator at `target` routes to."""
    with dial(target, tls) as channel:
        try:
            listing = fleet_pb2_grpc.FleetStub(channel).ListNodes(
                fleet_pb2.ListNodesRequest(), timeout=10
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _stop(
                    f"{target} serves no node list: it is not a coordinator (a node agent?); add --node "
                    "to profile a node agent directly"
                ) from None
            if err.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise _stop(
                    f"{target}: reading the coordinator's node list needs an operator certificate: give "
                    "--operator-tls-name NAME (the requests use the app certificate of --tls-name)"
                ) from None
            raise _unreachable(err, target, "coordinator") from None
    routable = [n for n in listing.nodes if n.routable]
    if not routable:
        raise _stop(
            f"{target} routes to no node now ({len(listing.nodes)} known, none routable); check "
            "`fleetctl nodes`",
            EXIT_UNAVAILABLE,
        )
    if len(routable) > 1:
        shown = ", ".join(f"{n.status.node_id} at {n.address}" for n in routable)
        raise _stop(
            f"{target} routes to {len(routable)} nodes ({shown}) and a request cannot name the node it "
            "runs on, so a profile through it would mix them: profile each node directly with "
            "`fleetctl profile --node --target NODE_ADDRESS` (coordinator certificate), or through a "
            "coordinator of a one-node fleet"
        )
    return routable[0].status


def _unreachable(err: grpc.RpcError, target: str, kind: str) -> typer.Exit:
    e = from_rpc_error(err, target=target)
    if e.code == "UNAVAILABLE":
        return _stop(
            f"{target}: no {kind} answers there ({e.details}); check the address and that the {kind} "
            "is running",
            EXIT_UNAVAILABLE,
        )
    return fail(e, target)


def _check_ready(st: node_pb2.NodeStatus, target: str) -> None:
    if st.HasField("group") and st.group.size > 1 and st.group.rank != 0:
        first = next((r for r in st.group.ranks if r.rank == 0), None)
        where = f" on {first.hostname or first.address}" if first else ""
        raise _stop(
            f"{target} is rank {st.group.rank} of node group {st.node_id}, which serves no requests: "
            f"profile the group at its rank 0{where} (its node agent's gRPC address), which serves "
            "them for the whole group"
        )
    state = common_pb2.Lifecycle.Name(st.lifecycle).removeprefix("LIFECYCLE_")
    if st.lifecycle != common_pb2.LIFECYCLE_READY or st.cordoned:
        raise _stop(
            f"node {st.node_id} at {target} is {state}{' and cordoned' if st.cordoned else ''} "
            f"({st.lifecycle_reason or 'no reason given'}): profile a READY, uncordoned node "
            f"(`fleetctl uncordon {st.node_id}`, or wait for it to load)",
            EXIT_UNAVAILABLE,
        )
    if st.load.running or st.load.queued:
        typer.echo(
            f"fleetctl profile: warning: node {st.node_id} carries {st.load.running} running and "
            f"{st.load.queued} queued requests: other traffic skews the measurements",
            err=True,
        )


def _summary(prof: Profile, fitted: measure.Fitted) -> None:
    f = prof.fit
    typer.echo(
        f"profile {prof.name}: {prof.model.id} ({prof.model.digest[:19]}) on {prof.node.node_id}, "
        f"{prof.node.engine}, max {prof.limits.max_running} running, context {prof.limits.max_context_tokens}"
    )
    if prof.group is not None:
        typer.echo(
            f"node group   {prof.group.describe()}; ranks {', '.join(prof.group.hosts) or '-'}"
        )
    typer.echo(
        f"decode step  {f.decode_base_s * 1000:.3f} ms + {f.decode_per_seq_s * 1000:.4f} ms per extra "
        f"sequence + {f.decode_per_ctx_token_s * 1e6:.4f} us per context token  (largest residual "
        f"{fitted.decode_max_error:.1%}); one stream {1 / f.decode_base_s:.1f} tok/s"
    )
    typer.echo(
        f"prefill      {f.prefill_base_s * 1000:.3f} ms + {f.prefill_per_token_s * 1e6:.3f} us per token "
        f"+ {f.cached_prefix_per_token_s * 1e6:.3f} us per cached token  (largest residual "
        f"{fitted.prefill_max_error:.1%})"
    )
    for p in prof.curves.prefill:
        typer.echo(
            f"  prefill {p.prompt_tokens:>6} tokens ({p.cached_tokens:>5} cached)  {p.seconds * 1000:9.2f} ms "
            f"(fit {f.prefill_s(p.prompt_tokens - p.cached_tokens, p.cached_tokens) * 1000:9.2f})"
        )
    for d in prof.curves.decode:
        typer.echo(
            f"  decode  {d.running:>3} running, {d.context_tokens:>6} context  {d.step_s * 1000:9.3f} ms/step "
            f"(fit {f.decode_step_s(d.running, d.context_tokens) * 1000:9.3f})"
        )
    for t in prof.curves.ttft:
        typer.echo(
            f"  ttft    {t.concurrency:>3} at once  p50 {t.p50_s * 1000:.1f} ms  p95 {t.p95_s * 1000:.1f} ms"
        )
    typer.echo(
        f"memory       {prof.node.memory_gb:.1f} GiB on the host; weights {prof.memory.weights_gb:.3f} GiB, "
        f"peak {prof.memory.peak_gb:.3f} GiB"
    )
