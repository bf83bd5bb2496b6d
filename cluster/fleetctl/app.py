"""`fleetctl`: the StudioFleet ops CLI. Exit codes: 0 ok, 1 error, 2 bad input,
3 target unavailable, 4 overloaded, 5 deadline exceeded, 6 no such node or rollout,
7 rollout failed (the failing node was put back), 8 rollout aborted, 9 rollout paused."""

from __future__ import annotations

import sys

import typer

from cluster.fleetctl import (
    audit_cmd,
    certs_cmd,
    demo_cmd,
    eval_cmd,
    generate_cmd,
    model_cmd,
    monitor_cmd,
    node_cmd,
    nodes_cmd,
    ops_cmd,
    plan_cmd,
    profile_cmd,
    replay_cmd,
    requests_cmd,
    rollout_cmd,
    service_cmd,
    shadow_cmd,
    tokens_cmd,
    traffic_cmd,
)

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(model_cmd.app, name="model")
app.add_typer(node_cmd.app, name="node")
app.add_typer(certs_cmd.app, name="certs")
app.add_typer(audit_cmd.app, name="audit")
app.add_typer(rollout_cmd.app, name="rollout")
app.add_typer(service_cmd.app, name="service")
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(tokens_cmd.app, name="tokens")
app.add_typer(traffic_cmd.app, name="traffic")
app.add_typer(shadow_cmd.app, name="shadow")
app.command("generate")(generate_cmd.generate)
app.command("demo")(demo_cmd.demo)
app.command("nodes")(nodes_cmd.nodes)
app.command("events")(nodes_cmd.events)
app.command("cordon")(ops_cmd.cordon)
app.command("uncordon")(ops_cmd.uncordon)
app.command("drain")(ops_cmd.drain)
app.command("requests")(requests_cmd.requests)
app.command("replay")(replay_cmd.replay)
app.command("plan")(plan_cmd.plan)
app.command("profile")(profile_cmd.profile)
app.command("top")(monitor_cmd.top)
app.command("dashboard")(monitor_cmd.dashboard)


def main() -> None:
    app(prog_name="fleetctl")


if __name__ == "__main__":
    sys.exit(main())
