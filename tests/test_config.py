"""The config file (TOML) under env and flags: precedence, errors naming key and file,
relative paths, and fleetctl's fallbacks. Pure except two short subprocess/CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cluster.config import CoordinatorSettings, FleetctlSettings, NodeSettings
from cluster.config_file import ConfigFileError
from cluster.fleetctl.connect import config_path, coordinator_address, credentials
from tests.procs import ROOT

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No config file or coordinator from the developer's environment or home directory."""
    for key in ("STUDIOFLEET_CONFIG", "STUDIOFLEET_COORDINATOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_node_flags_beat_env_beat_file_beat_defaults(tmp_path, monkeypatch):
    conf = write(
        tmp_path / "fleet.toml",
        """
        [node]
        model_path = "/models/q"
        engine = "from-file"
        max_queued = 5
        max_running = 4
    """.replace("        ", ""),
    )
    monkeypatch.setenv("STUDIOFLEET_NODE_ENGINE", "from-env")
    monkeypatch.setenv("STUDIOFLEET_NODE_MAX_QUEUED", "6")
    s = NodeSettings(config_file=conf, engine="from-flag")
    assert (s.engine, s.max_queued, s.max_running, s.prefill_batch_size) == ("from-flag", 6, 4, 8)
    assert s.model_path == Path("/models/q") and s.config_file == conf
    assert NodeSettings(config_file=conf, model_path=tmp_path / "m").model_path == tmp_path / "m"


def test_coordinator_reads_its_table_with_arrays_as_tuples(tmp_path, monkeypatch):
    conf = write(
        tmp_path / "fleet.toml",
        """
        [coordinator]
        nodes = ["10.0.0.1:7700", "[fd00::2]:7700"]
        poll_interval_s = 2
        eject_after_failures = 5
        mdns = false
        [node]
        not_a_coordinator_key = 1
    """.replace("        ", ""),
    )
    monkeypatch.setenv("STUDIOFLEET_COORDINATOR_POLL_INTERVAL_S", "0.5")
    s = CoordinatorSettings(config_file=conf, eject_after_failures=7)
    assert s.nodes == ("10.0.0.1:7700", "[fd00::2]:7700") and s.mdns is False
    assert (s.poll_interval_s, s.eject_after_failures, s.queue_max_depth) == (0.5, 7, 256)
    assert CoordinatorSettings(config_file=conf, nodes=("h:1",)).nodes == ("h:1",)


def test_without_a_file_settings_are_flags_env_and_defaults_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIOFLEET_NODE_MAX_RUNNING", "3")
    s = NodeSettings(model_path=tmp_path, engine="x")
    assert (s.config_file, s.model_path, s.engine, s.max_running) == (None, tmp_path, "x", 3)
    monkeypatch.setenv("COORDINATOR", "elsewhere:1")  # fleetctl's table reads no env at all
    assert FleetctlSettings().coordinator is None


@pytest.mark.parametrize(
    "table, message",
    [
        (
            "[node]\nmax_running = 0\n",
            "invalid setting max_running (in {f} [node]): Input should be greater than or equal to 1",
        ),
        (
            '[node]\nfleet = "two words"\n',
            "invalid setting fleet (in {f} [node]): String should match pattern",
        ),
        (
            '[node]\nlisten = "nope"\n',
            "invalid setting listen (in {f} [node]): Value error, expected HOST:PORT",
        ),
        (
            "[node]\nmaxrunning = 3\n",
            "unknown setting maxrunning (in {f} [node]); did you mean max_running?",
        ),
        ('[node]\nconfig_file = "other.toml"\n', "unknown setting config_file (in {f} [node])"),
        (
            "[nodes]\nmax_running = 3\n",
            "config file {f}: unknown table [nodes]; expected [node], [coordinator], [fleetctl]",
        ),
        (
            "max_running = 3\n",
            "config file {f}: max_running is outside any table; settings go in [node]",
        ),
    ],
)
def test_file_errors_name_the_key_or_line_and_the_file(tmp_path, table, message):
    conf = write(tmp_path / "bad.toml", table)
    with pytest.raises(ConfigFileError) as err:
        NodeSettings(config_file=conf, model_path=tmp_path)
    assert message.format(f=conf) in str(err.value)


@pytest.mark.parametrize(
    "text, line", [("[node]\nmax_running = \n", 2), ('[node]\nengine = "a"\n\n[node]\n', 4)]
)
def test_toml_syntax_errors_name_the_file_and_line(tmp_path, text, line):
    conf = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigFileError) as err:
        CoordinatorSettings(config_file=conf)
    assert str(err.value).startswith(
        f"config file {conf}: not valid TOML: "
    ) and f"line {line}" in str(err.value)


def test_a_bad_value_in_the_file_is_an_error_even_under_a_flag(tmp_path):
    conf = write(tmp_path / "bad.toml", "[node]\nmax_running = 0\n")
    with pytest.raises(ConfigFileError, match="max_running"):
        NodeSettings(config_file=conf, model_path=tmp_path, max_running=2)


def test_each_role_checks_only_its_own_table(tmp_path):
    conf = write(
        tmp_path / "fleet.toml", "[coordinator]\nqueue_max_depth = -1\n[fleetctl]\nbogus = 1\n"
    )
    assert NodeSettings(config_file=conf, model_path=tmp_path).max_running == 32
    with pytest.raises(ConfigFileError, match=r"queue_max_depth \(in .* \[coordinator\]\)"):
        CoordinatorSettings(config_file=conf)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigFileError, match=f"config file {tmp_path / 'nope.toml'}: not found"):
        CoordinatorSettings(config_file=tmp_path / "nope.toml")
    with pytest.raises(ConfigFileError, match=f"config file {tmp_path}: Is a directory"):
        CoordinatorSettings(config_file=tmp_path)


def test_relative_paths_resolve_against_the_files_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write(
        tmp_path / "etc" / "fleet.toml",
        """
        [node]
        model_path = "models/qwen"
        state_dir = "../var/node"
        tls_dir = "/abs/tls"
        [coordinator]
        audit_dir = "audit"
        audit_key_dir = "~/keys"
        state_db = "state/c.db"
    """.replace("        ", ""),
    )
    monkeypatch.chdir(tmp_path)
    conf = Path("etc/fleet.toml")  # relative to the working directory, as given on a command line
    node = NodeSettings(config_file=conf)
    etc = tmp_path / "etc"
    assert node.model_path == etc / "models/qwen" and node.state_dir == etc / "../var/node"
    assert node.tls_dir == Path("/abs/tls")
    co = CoordinatorSettings(config_file=conf)
    assert (co.audit_dir, co.audit_key_dir, co.state_db) == (
        etc / "audit",
        tmp_path / "home/keys",
        etc / "state/c.db",
    )
    assert NodeSettings(config_file=conf, state_dir=Path("here")).state_dir == Path(
        "here"
    )  # flags as given


def node_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node_agent.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_fleet_node_exits_2_naming_key_and_file(tmp_path):
    bad = write(tmp_path / "bad.toml", '[node]\nmodel_path = "m"\nmax_running = 0\n')
    out = node_main("--config", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"fleet-node: invalid setting max_running (in {bad} [node]): "
        "Input should be greater than or equal to 1"
    )
    empty = write(tmp_path / "empty.toml", "[coordinator]\n")
    out = node_main("--plaintext", env={**os.environ, "STUDIOFLEET_CONFIG": str(empty)})
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "fleet-node: invalid setting model_path: Field required; "
        "give --model DIR or model_path in [node] of the --config file"
    )


def test_fleetctl_config_path_env_then_per_user_file(tmp_path, monkeypatch):
    assert config_path() is None
    user = write(tmp_path / "xdg" / "studiofleet" / "studiofleet.toml", "")
    assert config_path() == user
    monkeypatch.setenv("STUDIOFLEET_CONFIG", str(tmp_path / "given.toml"))
    assert config_path() == tmp_path / "given.toml"  # named explicitly: must exist when read


def test_coordinator_address_value_then_file_then_default(tmp_path, monkeypatch):
    assert coordinator_address(None) == "127.0.0.1:7800"
    conf = write(tmp_path / "fleet.toml", '[fleetctl]\ncoordinator = "10.1.1.1:7800"\n')
    monkeypatch.setenv("STUDIOFLEET_CONFIG", str(conf))
    assert coordinator_address(None) == "10.1.1.1:7800"
    assert coordinator_address("flag:1") == "flag:1"
    write(conf, '[fleetctl]\ncoordinator = "no-port"\n')
    with pytest.raises(typer.Exit) as exc:
        coordinator_address(None)
    assert exc.value.exit_code == 2


def test_credentials_fall_back_to_the_file(tmp_path, monkeypatch, fleet_ca):
    conf = write(
        tmp_path / "fleet.toml", f'[fleetctl]\ntls_dir = "{fleet_ca}"\ntls_name = "operator"\n'
    )
    monkeypatch.setenv("STUDIOFLEET_CONFIG", str(conf))
    tls = credentials(None, None, False)
    assert (tls.files.directory, tls.files.name) == (fleet_ca, "operator")
    assert credentials(None, "app", False).files.name == "app"  # a flag or env value wins
    write(conf, "[fleetctl]\nplaintext = true\n")
    assert credentials(None, None, False) is None
    with pytest.raises(typer.Exit):  # TLS asked for: no plaintext
        credentials(None, "app", False)


def test_fleetctl_nodes_dials_the_address_flag_env_or_file_names(tmp_path, monkeypatch):
    from cluster.fleetctl.app import app

    conf = write(tmp_path / "fleet.toml", '[fleetctl]\ncoordinator = "127.0.0.1:1"\n')
    monkeypatch.setenv("STUDIOFLEET_CONFIG", str(conf))
    runner = CliRunner()
    env = {"STUDIOFLEET_COORDINATOR": "127.0.0.1:2"}
    for extra_env, args, address in (
        (None, [], "127.0.0.1:1"),  # the file
        (env, [], "127.0.0.1:2"),  # env beats the file
        (env, ["-c", "127.0.0.1:3"], "127.0.0.1:3"),
    ):  # the flag beats env
        result = runner.invoke(app, ["nodes", "--timeout-s", "5", *args], env=extra_env)
        assert result.exit_code == 3, result.output
        assert f"fleetctl: {address}: UNAVAILABLE" in result.output
