"""Traps a new operator fell into (issue 20), each against the real daemons and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cluster.security import ca
from cluster.security.identity import Role
from tests.procs import ROOT


def fleetctl(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "cluster.fleetctl.app", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_a_second_agent_on_the_same_state_directory_is_refused_naming_the_first(
    start_node, tiny_model, fleet_ca
):
    first = start_node(node_id="lock-first")
    ca.issue(fleet_ca, Role.NODE, "lock-second")
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.main",
            "--model",
            str(tiny_model),
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            "lock-second",
            "--state-dir",
            str(first.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2, second.stderr[-2000:]
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, second.stderr
    assert f"pid {first.proc.pid}" in lines[0] and "--state-dir" in lines[0]
    assert first.status().node_id == "lock-first"  # the first one is untouched


def test_generate_takes_the_coordinator_like_every_other_command(start_node, start_coordinator):
    node = start_node(node_id="gen-node")
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    by_flag = fleetctl(
        "generate", "-c", co.address, "--prompt", "Plan:", "--max-tokens", "3", "-o", "json"
    )
    assert by_flag.returncode == 0, by_flag.stderr
    assert json.loads(by_flag.stdout)["node_id"] == "gen-node"
    by_env = fleetctl(
        "generate",
        "--prompt",
        "Plan:",
        "--max-tokens",
        "3",
        "-o",
        "json",
        env={"STUDIOFLEET_COORDINATOR": co.address},
    )
    assert by_env.returncode == 0, by_env.stderr
    # An operator certificate on an app-only call is told which certificate to use.
    as_operator = fleetctl(
        "generate",
        "-c",
        co.address,
        "--tls-name",
        "operator",
        "--prompt",
        "Plan:",
        "--max-tokens",
        "3",
    )
    assert as_operator.returncode != 0 and "PERMISSION_DENIED" in as_operator.stderr
    assert "use an app certificate (--tls-name APP" in as_operator.stderr
    assert "ask an operator" not in as_operator.stderr
    lonely = fleetctl("generate", "--node", "--prompt", "Plan:")
    assert lonely.returncode == 2 and "--target HOST:PORT" in lonely.stderr


def _helps(command, path):
    """(command path, its --help text at 80 columns) for a click command and every subcommand."""
    import click

    with click.Context(command, info_name=path[-1], terminal_width=80, max_content_width=80) as ctx:
        yield " ".join(path), command.get_help(ctx)
        for name in getattr(command, "commands", {}):
            yield from _helps(command.commands[name], [*path, name])


def test_help_shows_defaults_and_whole_flag_names_at_80_columns():
    import typer

    from cluster.fleetctl.app import app as fleetctl_app
    from coordinator.main import app as coordinator_app
    from node_agent.main import app as node_app

    seen = 0
    for prog, app in (
        ("fleetctl", fleetctl_app),
        ("fleet-node", node_app),
        ("fleet-coordinator", coordinator_app),
    ):
        for where, text in _helps(typer.main.get_command(app), [prog]):
            seen += 1
            assert "…" not in text, f"{where} --help cuts a name:\n{text}"
            assert "<bool>" not in text, f"{where} --help shows a <bool> tag:\n{text}"
            assert "\\[" not in text, f"{where} --help shows a markup escape:\n{text}"
    assert seen > 30
    node_help = dict(_helps(typer.main.get_command(node_app), ["fleet-node"]))["fleet-node"]
    flat = " ".join(node_help.split())
    assert "--prefill-step-size <int>" in flat and "[default: 512]" in flat
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.main", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert "--eject-after-failures <int>" in out.stdout and "[default: 3]" in " ".join(
        out.stdout.split()
    )


def test_the_demo_keeps_its_fleet_up_prints_working_commands_and_stops_on_ctrl_c(tmp_path):
    import signal
    import time

    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "demo",
            "--workdir",
            str(tmp_path / "d"),
            "--notes",
            "2",
            "--concurrency",
            "2",
            "--nodes",
            "1",
            "--keep-running",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen, deadline = [], time.monotonic() + 300
        for line in demo.stdout:
            seen.append(line)
            if "stops the fleet cleanly" in line or time.monotonic() > deadline:
                break
        text = "".join(seen)
        assert "stops the fleet cleanly" in text, text
        assert "per node" in text and "{" not in text.split("notes per node")[1].split("\n")[0]
        export = (
            next(ln for ln in seen if "export STUDIOFLEET_TLS_DIR=" in ln)
            .split("export ", 1)[1]
            .split()
        )
        env = dict(kv.split("=", 1) for kv in export)
        nodes = fleetctl("nodes", "--tls-name", "operator", "-o", "json", env=env)  # as printed
        assert nodes.returncode == 0, nodes.stderr
        assert "demo-node-1" in nodes.stdout
        demo.send_signal(signal.SIGINT)
        rest = demo.communicate(timeout=120)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, rest
    assert "stopping on request" in rest and "demo-coordinator 0" in rest
    assert "--keep-running" not in rest  # the hint is for runs that stop by themselves


def test_an_idle_node_reports_a_decode_rate_that_falls_to_zero(node, as_node_caller):
    import time

    from cluster.client import FleetClient

    with FleetClient(node.address) as client:
        client.generate(prompt="Plan:", max_tokens=40, timeout_s=60)
    busy = node.status().load.decode_tokens_per_s
    assert busy > 0
    deadline = time.monotonic() + 20  # the rate window is 10 s
    while (rate := node.status().load.decode_tokens_per_s) > 0:
        assert rate <= busy * 1.01, "an idle node's rate went up"
        assert time.monotonic() < deadline, f"still {rate:.1f} tok/s 20 s after the last token"
        time.sleep(0.5)


def test_a_stopped_coordinator_is_named_not_a_raw_connection_refused():
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = fleetctl("nodes", "-c", f"127.0.0.1:{port}", "--tls-name", "operator", "--timeout-s", "3")
    assert out.returncode == 3
    assert f"127.0.0.1:{port}" in out.stderr and "nothing answers at" in out.stderr
    assert "Failed to connect to remote host" not in out.stderr
    tiny = fleetctl("model", "make-tiny", "--help")
    assert "0 means 2 x --hidden" in " ".join(tiny.stdout.split())


def test_token_ids_are_shown_whole_at_80_columns_and_missing_certificates_name_their_role(
    start_coordinator, tiny_model, fleet_ca
):
    co = start_coordinator()
    issued = fleetctl(
        "tokens", "issue", "narrow-terminal-app", "-c", co.address, "--tls-name", "operator"
    )
    assert issued.returncode == 0, issued.stderr
    token_id = issued.stdout.strip().split(".")[0]
    listed = fleetctl(
        "tokens", "list", "-c", co.address, "--tls-name", "operator", env={"COLUMNS": "80"}
    )
    assert listed.returncode == 0 and token_id in listed.stdout, listed.stdout
    assert "OPENAI_API_KEY" in issued.stderr
    readme = (ROOT / "docs" / "openai-api.md").read_text()
    assert "STUDIOFLEET_API_KEY" not in readme and 'os.environ["OPENAI_API_KEY"]' in readme
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.main",
            "--model",
            str(tiny_model),
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            str(fleet_ca),
            "--tls-name",
            "never-issued",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        missing.returncode == 2
        and "fleetctl certs issue --role node --name never-issued" in missing.stderr
    )


def test_the_coordinator_id_defaults_to_its_certificate_name_or_host(start_coordinator):
    import socket

    from cluster.config import CoordinatorSettings

    co = start_coordinator(name="co-east-1")
    assert (
        "coordinator=co-east-1 listening" in co.stderr()
        or '"coordinator=co-east-1 listening' in co.stderr()
    )
    assert CoordinatorSettings(tls_name="co-west").coordinator_id == "co-west"
    assert CoordinatorSettings(plaintext=True).coordinator_id == socket.gethostname().split(".")[0]
    assert CoordinatorSettings(tls_name="co-west", coordinator_id="given").coordinator_id == "given"
    assert CoordinatorSettings().coordinator_id == "coordinator"
