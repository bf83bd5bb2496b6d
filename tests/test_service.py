"""`fleetctl service`: every rendered plist and unit parses, names only paths that exist after
install, restarts and stops the way the daemons need, and passes only flags they accept."""

from __future__ import annotations

import grp
import os
import plistlib
import pwd
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster import service
from cluster.fleetctl import service_cmd
from cluster.fleetctl.app import app

ROOT = Path(__file__).resolve().parents[1]
ROLES, FORMATS = ("node", "coordinator"), ("launchd", "systemd")
PATH_FLAGS = (
    "--config",
    "--model",
    "--state-dir",
    "--tls-dir",
    "--audit-dir",
)  # --state-db: its parent
ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def fleetctl(*args: object):
    return CliRunner().invoke(app, ["service", *map(str, args)])


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host ready for both daemons: entry points in bin/ (as pip installs them, running this
    checkout), a model, TLS files for node-a and the coordinator, and a config file."""
    for d in ("bin", "model", "tls"):
        (tmp_path / d).mkdir()
    for role, module in (("node", "node_agent.main"), ("coordinator", "coordinator.main")):
        exe = tmp_path / "bin" / f"fleet-{role}"
        exe.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
            f"from {module} import main\nsys.exit(main())\n"
        )
        exe.chmod(0o755)
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("ca.pem", "node-a.pem", "node-a.key", "coordinator.pem", "coordinator.key"):
        (tmp_path / "tls" / name).write_text("x")
    (tmp_path / "fleet.toml").write_text("[node]\n[coordinator]\n")
    return tmp_path


def options(host: Path, role: str, fmt: str, *extra: object) -> list[object]:
    own = (
        ["--model", host / "model", "--tls-name", "node-a"]
        if role == "node"
        else ["--tls-name", "coordinator"]
    )
    return [
        "--role",
        role,
        "--format",
        fmt,
        "--prefix",
        host / "root",
        "--bin-dir",
        host / "bin",
        "--config",
        host / "fleet.toml",
        "--tls-dir",
        host / "tls",
        "--user",
        ME,
        "--group",
        MY_GROUP,
        *own,
        *extra,
    ]


def installed(host: Path, role: str, fmt: str, *extra: object) -> dict:
    result = fleetctl(
        "install", *options(host, role, fmt, *extra), "--dest", host / "dest", "--no-start"
    )
    assert result.exit_code == 0, result.output
    name = f"com.studiofleet.{role}.plist" if fmt == "launchd" else f"studiofleet-{role}.service"
    assert f"wrote {host / 'dest' / name}" in result.output
    return described(host / "dest" / name, fmt)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; a key may repeat (Environment=), so each maps to its values."""
    sections: dict[str, dict[str, list[str]]] = {}
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def unquote(value: str) -> list[str]:
    """systemd's word splitting for our values: shell-like quotes, `%%` and `$$` doubled."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(value)]


def described(path: Path, fmt: str) -> dict:
    """What a service file tells its manager, one shape for both formats; checks restart and stop keys."""
    if fmt == "launchd":
        doc = plistlib.loads(path.read_bytes())
        assert doc["KeepAlive"] is True and doc["RunAtLoad"] is True  # exit 75 must restart too
        assert doc["ThrottleInterval"] == 10 and doc["ProcessType"] == "Interactive"
        assert doc["GroupName"] == MY_GROUP
        return {
            "label": doc["Label"],
            "argv": doc["ProgramArguments"],
            "cwd": doc["WorkingDirectory"],
            "logs": [doc["StandardOutPath"], doc["StandardErrorPath"]],
            "env": doc["EnvironmentVariables"],
            "user": doc["UserName"],
            "stop_timeout_s": doc["ExitTimeOut"],
            "writable": [],
        }
    unit = parse_unit(path.read_text())
    svc, one = unit["Service"], {k: v[0].replace("%%", "%") for k, v in unit["Service"].items()}
    assert (
        one["Restart"] == "always" and one["RestartSec"] == "10" and one["KillSignal"] == "SIGTERM"
    )
    assert one["KillMode"] == "mixed" and one["Group"] == MY_GROUP and one["LimitNOFILE"] == "65536"
    assert (one["NoNewPrivileges"], one["ProtectSystem"], one["PrivateTmp"]) == (
        "yes",
        "full",
        "yes",
    )
    assert unit["Install"]["WantedBy"] == ["multi-user.target"] and one[
        "StandardOutput"
    ].startswith("append:")
    return {
        "label": path.stem,
        "argv": unquote(svc["ExecStart"][0]),
        "cwd": one["WorkingDirectory"],
        "logs": [one[k].removeprefix("append:") for k in ("StandardOutput", "StandardError")],
        "user": one["User"],
        "env": dict(unquote(e)[0].split("=", 1) for e in svc["Environment"]),
        "stop_timeout_s": int(one["TimeoutStopSec"]),
        "writable": unquote(svc["ReadWritePaths"][0]),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("role", ROLES)
def test_install_names_only_paths_that_exist(host, role, fmt):
    got = installed(host, role, fmt)
    argv, exe = got["argv"], Path(got["argv"][0])
    assert got["label"] == (
        f"com.studiofleet.{role}" if fmt == "launchd" else f"studiofleet-{role}"
    )
    assert exe == host / "bin" / f"fleet-{role}" and os.access(exe, os.X_OK)
    assert {"--config", "--tls-dir", "--tls-name", "--shutdown-grace-s"} <= set(argv[1::2])
    assert ({"--model", "--state-dir"} if role == "node" else {"--audit-dir", "--state-db"}) <= set(
        argv[1::2]
    )
    paths = [Path(argv[i + 1]) for i, a in enumerate(argv) if a in PATH_FLAGS] + [Path(got["cwd"])]
    paths += [Path(argv[argv.index(a) + 1]).parent for a in argv if a == "--state-db"]
    paths += [Path(log).parent for log in got["logs"]] + [Path(p) for p in got["writable"]]
    assert all(p.is_absolute() and p.exists() for p in paths), [p for p in paths if not p.exists()]
    assert Path(got["cwd"]).is_relative_to(host / "root")  # --prefix moved every default
    grace = float(argv[argv.index("--shutdown-grace-s") + 1])
    assert grace == 30 and got["stop_timeout_s"] > grace and got["user"] == ME
    env = got["env"]
    assert (env["HF_HUB_OFFLINE"], env["TRANSFORMERS_OFFLINE"], env["PYTHONUNBUFFERED"]) == (
        "1",
        "1",
        "1",
    )
    assert env["STUDIOFLEET_CONFIG"] == str(host / "fleet.toml")


@pytest.mark.parametrize("role", ROLES)
def test_the_rendered_command_line_is_accepted_by_the_daemon(host, role):
    got = installed(host, role, "launchd")
    env = {**os.environ, **got["env"], "PATH": os.environ.get("PATH", "")}
    run = subprocess.run(
        [*got["argv"], "--help"],
        cwd=got["cwd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr  # an unknown flag exits 2 ("No such option")
    assert "--shutdown-grace-s" in run.stdout


def test_stop_timeout_outlasts_the_grace_from_the_config_file_or_flag(host):
    (host / "fleet.toml").write_text("[node]\nshutdown_grace_s = 60\n")
    got = installed(host, "node", "launchd")
    assert (
        got["argv"][got["argv"].index("--shutdown-grace-s") + 1] == "60"
        and got["stop_timeout_s"] == 75
    )
    got = installed(host, "node", "systemd", "--shutdown-grace-s", "7.5")
    assert (
        got["argv"][got["argv"].index("--shutdown-grace-s") + 1] == "7.5"
        and got["stop_timeout_s"] == 23
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_install_refuses_missing_inputs_naming_each_and_writes_nothing(host, fmt):
    opts = options(host, "node", fmt, "--bin-dir", host / "nowhere", "--config", host / "none.toml")
    opts[opts.index("--model") + 1] = host / "no-model"
    (host / "tls" / "node-a.key").unlink()
    result = fleetctl("install", *opts, "--dest", host / "dest", "--no-start")
    assert result.exit_code == 2
    for problem in (
        f"model directory {host / 'no-model'} does not exist",
        f"config file {host / 'none.toml'} does not exist",
        f"{host / 'nowhere' / 'fleet-node'} is not an executable",
        f"TLS file {host / 'tls' / 'node-a.key'} does not exist",
    ):
        assert problem in result.output
    assert not (host / "dest").exists() and not (host / "root").exists()


def test_install_refuses_a_key_the_service_user_cannot_read(host):
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody here")
    key = host / "tls" / "node-a.key"
    key.chmod(0o600)
    opts = options(
        host, "node", "systemd", "--user", "nobody", "--group", grp.getgrgid(nobody.pw_gid).gr_name
    )
    result = fleetctl("install", *opts, "--dest", host / "dest", "--no-start")
    assert result.exit_code == 2 and f"TLS file {key} is not readable by nobody" in result.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_uninstall_removes_the_file_and_says_how_to_stop_the_job(host, fmt):
    installed(host, "node", fmt)
    files = list((host / "dest").iterdir())
    wants = host / "dest" / "multi-user.target.wants"
    if fmt == "systemd":  # what `systemctl enable` leaves behind
        wants.mkdir()
        (wants / files[0].name).symlink_to(files[0])
    result = fleetctl(
        "uninstall", "--role", "node", "--format", fmt, "--dest", host / "dest", "--no-stop"
    )
    assert result.exit_code == 0, result.output
    assert not files[0].exists() and not (wants / files[0].name).is_symlink()
    assert (
        "launchctl bootout system/com.studiofleet.node"
        if fmt == "launchd"
        else "systemctl stop studiofleet-node"
    ) in result.output
    again = fleetctl(
        "uninstall", "--role", "node", "--format", fmt, "--dest", host / "dest", "--no-stop"
    )
    assert again.exit_code == 0 and "nothing to remove" in again.output


def test_render_prints_a_plist_and_needs_the_nodes_model(host):
    result = fleetctl("render", *options(host, "node", "launchd"))
    assert (
        result.exit_code == 0
        and plistlib.loads(result.stdout.encode())["Label"] == "com.studiofleet.node"
    )
    missing = fleetctl("render", "--role", "node", "--format", "systemd")
    assert missing.exit_code == 2 and "--model DIR" in missing.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_awkward_paths_survive_both_formats(host, fmt):
    odd = host / 'a dir & <x> "q" 100%$HOME'
    spec = service.build("coordinator", fmt, prefix=odd, bin_dir=odd / "bin", dest=host / "dest")
    text = service.render(spec)
    if fmt == "launchd":
        doc = plistlib.loads(text.encode())
        argv, cwd = doc["ProgramArguments"], doc["WorkingDirectory"]
    else:
        svc = parse_unit(text)["Service"]
        argv, cwd = unquote(svc["ExecStart"][0]), svc["WorkingDirectory"][0].replace("%%", "%")
        assert dict(unquote(e)[0].split("=", 1) for e in svc["Environment"])[
            "STUDIOFLEET_CONFIG"
        ] == str(odd / "etc/studiofleet/fleet.toml")
    assert argv[0] == str(odd / "bin" / "fleet-coordinator") and cwd == str(
        odd / "var" / ("studiofleet" if fmt == "launchd" else "lib/studiofleet")
    )
    assert argv[argv.index("--audit-dir") + 1] == str(Path(cwd) / "audit")
    with pytest.raises(service.ServiceError, match="control characters"):
        service.build("coordinator", fmt, prefix=host / "new\nline")


class Manager:
    """A launchctl/systemctl stand-in: records commands; the job stays loaded for `loaded_for` probes."""

    def __init__(self, loaded_for: int = 0, fail: str = ""):
        self.calls: list[list[str]] = []
        self.loaded_for, self.fail = loaded_for, fail

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[1] in ("print", "is-active"):
            self.loaded_for -= 1
            return subprocess.CompletedProcess(argv, 0 if self.loaded_for >= 0 else 113, "", "")
        bad = argv[1] == self.fail
        return subprocess.CompletedProcess(
            argv, 5 if bad else 0, "", "Bootstrap failed: 5" if bad else ""
        )


def test_launchd_reinstall_boots_out_waits_until_unloaded_then_bootstraps(host):
    spec = service.build("node", "launchd", model=host / "model", dest=host / "dest")
    manager, slept = Manager(loaded_for=3), []
    service_cmd.execute(
        spec, service_cmd.start_plan(spec, loaded=True), manager, sleep=slept.append
    )
    job = "system/com.studiofleet.node"
    assert manager.calls == [
        ["launchctl", "bootout", job],
        *[["launchctl", "print", job]] * 4,
        ["launchctl", "enable", job],
        ["launchctl", "bootstrap", "system", str(spec.path)],
    ]
    assert slept == [1.0] * 3
    with pytest.raises(
        service_cmd.CommandFailed,
        match="launchctl bootstrap system .* failed .*Bootstrap failed: 5",
    ):
        service_cmd.execute(
            spec, service_cmd.start_plan(spec, loaded=False), Manager(fail="bootstrap")
        )


def test_systemd_plans_restart_a_running_unit_and_stop_it_by_name(host):
    spec = service.build("coordinator", "systemd", dest=host / "dest")
    unit = "studiofleet-coordinator"
    assert service_cmd.start_plan(spec, loaded=True) == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", unit],
        ["systemctl", "restart", unit],
    ]
    assert service_cmd.stop_plan(spec, loaded=True) == (
        [["systemctl", "stop", unit]],
        [["systemctl", "daemon-reload"]],
    )
    assert service_cmd.stop_plan(spec, loaded=False)[0] == []
