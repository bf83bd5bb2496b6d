"""Service files for the daemons: launchd plists (macOS) and systemd units (Linux GPU hosts).

The templates in launchd/ are the source. A .plist.in is a real plist with @NAME@ strings,
filled in as Python objects and written by plistlib, so nothing needs XML escaping; a
.service.in is filled in line by line, each value quoted by systemd's rules for its key.
`install` checks every path the daemon reads first: a service never starts only to fail."""

from __future__ import annotations

import grp
import math
import os
import plistlib
import pwd
import re
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from xml.parsers.expat import ExpatError

ROLES, FORMATS = ("node", "coordinator"), ("launchd", "systemd")
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "launchd"
STOP_MARGIN_S = 15  # the manager's SIGKILL comes this long after the drain grace
DEFAULT_GRACE_S = 30.0  # the daemons' own --shutdown-grace-s default
# format: (prefix, service-file directory, user, working directory below the prefix)
LAYOUT = {
    "launchd": ("/usr/local", "/Library/LaunchDaemons", "_studiofleet", "var/studiofleet"),
    "systemd": ("/", "/etc/systemd/system", "studiofleet", "var/lib/studiofleet"),
}
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_SAFE_WORD = re.compile(r"[\w@+=:,./-]+")


class ServiceError(Exception):
    """Bad input (exit 2); the message names the path or value and what to do."""


@dataclass(frozen=True)
class ServiceSpec:
    """Everything one service file names; `build` fills in the defaults."""

    role: str
    fmt: str
    bin_dir: Path
    config: Path
    tls_dir: Path
    tls_name: str
    user: str
    group: str
    working_dir: Path
    log_dir: Path
    dest: Path
    shutdown_grace_s: float = DEFAULT_GRACE_S
    restart_delay_s: int = 10
    model: Optional[Path] = None  # node
    state_dir: Optional[Path] = None  # node
    audit_dir: Optional[Path] = None  # coordinator
    state_db: Optional[Path] = None  # coordinator

    @property
    def name(self) -> str:
        """The launchd label or the systemd unit's name."""
        return (
            f"com.studiofleet.{self.role}" if self.fmt == "launchd" else f"studiofleet-{self.role}"
        )

    @property
    def path(self) -> Path:
        return self.dest / (
            f"{self.name}.plist" if self.fmt == "launchd" else f"{self.name}.service"
        )

    @property
    def executable(self) -> Path:
        return self.bin_dir / f"fleet-{self.role}"

    @property
    def exit_timeout_s(self) -> int:
        return math.ceil(self.shutdown_grace_s) + STOP_MARGIN_S

    def writable(self) -> list[Path]:
        """Directories the daemon writes: `install` creates them, owned by the service user."""
        own = [self.state_dir] if self.role == "node" else [self.audit_dir, self.state_db.parent]
        return list(dict.fromkeys([self.working_dir, self.log_dir, *own]))

    def values(self) -> dict[str, object]:
        """The template placeholders (a `str` unless the file's key needs a number)."""
        if self.role == "node" and self.model is None:
            raise ServiceError(
                "the node needs its model: give --model DIR (a local MLX model directory)"
            )
        own = (
            {"MODEL": self.model, "STATE_DIR": self.state_dir}
            if self.role == "node"
            else {"AUDIT_DIR": self.audit_dir, "STATE_DB": self.state_db}
        )
        roots = [p for p in self.writable() if not any(q in p.parents for q in self.writable())]
        return {
            "LABEL": self.name,
            "EXECUTABLE": str(self.executable),
            "BIN_DIR": str(self.bin_dir),
            "CONFIG": str(self.config),
            "TLS_DIR": str(self.tls_dir),
            "TLS_NAME": self.tls_name,
            "USER": self.user,
            "GROUP": self.group,
            "WORKING_DIR": str(self.working_dir),
            "LOG_DIR": str(self.log_dir),
            "SHUTDOWN_GRACE_S": f"{self.shutdown_grace_s:g}",
            "EXIT_TIMEOUT_S": self.exit_timeout_s,
            "RESTART_DELAY_S": self.restart_delay_s,
            "READ_WRITE_PATHS": [str(p) for p in roots],
            **{k: str(v) for k, v in own.items()},
        }


def build(
    role: str, fmt: Optional[str] = None, *, prefix: Optional[Path] = None, **given
) -> ServiceSpec:
    """A spec from the options given (None = the default); paths absolute, `~` expanded."""
    fmt = fmt or ("launchd" if sys.platform == "darwin" else "systemd")
    if role not in ROLES or fmt not in FORMATS:
        raise ServiceError(
            f"unknown role {role!r} or format {fmt!r}: use {'|'.join(ROLES)} and {'|'.join(FORMATS)}"
        )
    root, dest, user, work = LAYOUT[fmt]
    base = Path(prefix or root)
    work = Path(given.get("working_dir") or base / work)
    own = (
        {"state_dir": work / "node"}
        if role == "node"
        else {"audit_dir": work / "audit", "state_db": work / "coordinator.db"}
    )
    d = {
        "bin_dir": Path(sys.executable).parent,
        "config": base / "etc/studiofleet/fleet.toml",
        "tls_dir": base / "etc/studiofleet/tls",
        "working_dir": work,
        "log_dir": base / "var/log/studiofleet",
        "dest": Path(dest),
        "user": user,
        "tls_name": socket.gethostname().split(".")[0] if role == "node" else role,
        **own,
        **{k: v for k, v in given.items() if v is not None},
    }
    d.setdefault("group", d["user"])
    for key, value in d.items():
        if any(ord(c) < 32 for c in str(value)):
            raise ServiceError(
                f"--{key.replace('_', '-')} {value!r}: a service file cannot hold control characters"
            )
        if isinstance(value, Path):
            d[key] = Path(os.path.abspath(value.expanduser()))
    d.setdefault("shutdown_grace_s", _grace_in(d["config"], role))
    return ServiceSpec(role=role, fmt=fmt, **d)


def _grace_in(config: Path, role: str) -> float:
    """shutdown_grace_s from the config file's table, so the stop timeout outlasts the drain."""
    from cluster.config_file import ConfigFileError, read_config

    try:
        return float(read_config(config).get(role, {}).get("shutdown_grace_s", DEFAULT_GRACE_S))
    except (ConfigFileError, TypeError, ValueError):
        return DEFAULT_GRACE_S  # `problems` reports an unusable file


def render(spec: ServiceSpec) -> str:
    """The service file's text; ServiceError if the template is missing or names an unknown @NAME@."""
    template = TEMPLATE_DIR / f"{spec.name}.{'plist' if spec.fmt == 'launchd' else 'service'}.in"
    try:
        doc = (
            plistlib.loads(template.read_bytes()) if spec.fmt == "launchd" else template.read_text()
        )
    except (OSError, ValueError, ExpatError) as exc:
        raise ServiceError(
            f"template {template} is unusable ({exc}); the templates ship in the repository's "
            "launchd/ folder: install studiofleet from a checkout (`scripts/bootstrap`)"
        ) from None
    values = spec.values()

    def value(name: str) -> object:
        if name not in values:
            raise ServiceError(
                f"template {template} names @{name}@, which `fleetctl service` does not fill in"
            )
        return values[name]

    def sub(text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: str(value(m[1])), text)

    def fill(obj: object) -> object:  # a string that is exactly @NAME@ takes the value's type
        if isinstance(obj, dict):
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        whole = _PLACEHOLDER.fullmatch(obj) if isinstance(obj, str) else None
        return value(whole[1]) if whole else sub(obj) if isinstance(obj, str) else obj

    if spec.fmt == "launchd":
        return plistlib.dumps(fill(doc), sort_keys=False).decode()
    return "".join(
        _unit_line(line, sub, values["READ_WRITE_PATHS"]) for line in doc.splitlines(True)
    )


def _unit_line(line: str, sub, writable: list[str]) -> str:
    """ExecStart and ReadWritePaths quoted word by word, Environment as one string; `%` doubled."""
    key, sep, rest = line.rstrip("\n").partition("=")
    if not sep or key.startswith(("#", ";")):
        return line
    if key == "ExecStart":
        rest = " ".join(systemd_quote(sub(w), exec_line=True) for w in rest.split())
    elif key == "Environment":
        rest = '"' + sub(rest).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'
    elif key == "ReadWritePaths":
        rest = " ".join(systemd_quote(p) for p in writable)
    else:
        rest = sub(rest).replace("%", "%%")
    return f"{key}={rest}\n"


def systemd_quote(word: str, *, exec_line: bool = False) -> str:
    """One word of a unit file: `%` (and `$` on exec lines) doubled, quoted if it needs it."""
    word = word.replace("%", "%%").replace("$", "$$" if exec_line else "$")
    return (
        word
        if _SAFE_WORD.fullmatch(word)
        else '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    )


def problems(spec: ServiceSpec) -> list[str]:
    """Every input that would stop the daemon, one line each naming the path and the fix."""
    from cluster.config_file import ConfigFileError, read_config

    out: list[str] = []
    try:
        pw = pwd.getpwnam(spec.user)
        grp.getgrnam(spec.group)
    except KeyError:
        pw = None
        out.append(
            f"user or group {spec.user}:{spec.group} does not exist: create it (launchd/README.md) "
            "or pass --user/--group"
        )
    if not (spec.executable.is_file() and os.access(spec.executable, os.X_OK)):
        out.append(
            f"{spec.executable} is not an executable: install studiofleet into that venv (`pip install -c constraints.txt "
            "-e ./client -e '.[mlx]'` from a checkout) or pass --bin-dir DIR"
        )
    reads = [(spec.config, "config file", "create it (launchd/README.md) or pass --config FILE")]
    if spec.config.is_file():
        try:
            read_config(spec.config)
        except ConfigFileError as exc:
            out.append(str(exc))
    if spec.role == "node" and not spec.model.is_dir():
        out.append(
            f"model directory {spec.model} does not exist: copy the model there or pass --model DIR"
        )
    elif spec.role == "node":
        reads.append(
            (spec.model / "config.json", "model file", "--model must name a model directory")
        )
    issue = (
        f"issue it (`fleetctl certs issue --role {spec.role} --name {spec.tls_name}`) and copy it there, "
        "or pass --tls-dir DIR / --tls-name NAME"
    )
    reads += [
        (spec.tls_dir / f, "TLS file", issue)
        for f in ("ca.pem", f"{spec.tls_name}.pem", f"{spec.tls_name}.key")
    ]
    for path, what, fix in reads:
        if not path.is_file():
            out.append(f"{what} {path} does not exist: {fix}")
        elif pw and not _may(pw, path, stat.S_IRUSR):
            out.append(
                f"{what} {path} is not readable by {spec.user}: `chown {spec.user} {path}` or `chmod g+r`"
            )
    for d in spec.writable():
        if d.exists() and pw and not (d.is_dir() and _may(pw, d, stat.S_IWUSR)):
            out.append(
                f"{d} is not a directory {spec.user} can write: `chown {spec.user}:{spec.group} {d}` "
                "or choose another path"
            )
    return out


def _may(pw: pwd.struct_passwd, path: Path, user_bit: int) -> bool:
    """Whether user `pw` has the permission `user_bit` names (S_IRUSR, S_IWUSR) on `path`."""
    st = path.stat()
    shift = (
        0
        if st.st_uid == pw.pw_uid
        else 3
        if st.st_gid in os.getgrouplist(pw.pw_name, pw.pw_gid)
        else 6
    )
    return pw.pw_uid == 0 or bool(st.st_mode & (user_bit >> shift))


def install(spec: ServiceSpec, *, as_root: bool) -> Path:
    """Check the inputs (ServiceError lists every problem), create the daemon's directories,
    then write the service file atomically (0644; root's when run as root)."""
    text = render(spec)
    found = problems(spec)
    if found:
        raise ServiceError("cannot install:\n  " + "\n  ".join(found))
    for d in spec.writable():
        if not d.exists():
            d.mkdir(parents=True, mode=0o750)
            if as_root:  # only directories made here: never re-own an existing path
                os.chown(d, pwd.getpwnam(spec.user).pw_uid, grp.getgrnam(spec.group).gr_gid)
    spec.dest.mkdir(parents=True, exist_ok=True)
    tmp = spec.path.with_name(f".{spec.path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    if as_root:
        os.chown(tmp, 0, 0)
    os.replace(tmp, spec.path)
    return spec.path
