"""A small network-namespace lab for multi-host integration tests (Linux, root).

Topology of one lab (all names carry the lab prefix ``sf<pid>l<counter>``)::

    root ns                     bridge ns "<prefix>-br"                host ns "<prefix>-h-<name>"
    <prefix>r 10.213.N.1/24 ==== up0 --+
                                       br0 (bridge, up, no STP, no mcast snooping)
                                       +-- h0 ========================= eth0 10.213.N.10/24
                                       +-- h1 ========================= eth0 10.213.N.11/24

* The test process (root ns) reaches every host directly over ``<prefix>r``.
* Hosts reach each other (and root) through the bridge; each host has ``lo`` up and a
  ``224.0.0.0/4 dev eth0`` route so multicast (mDNS 224.0.0.251:5353) works.
* ``Host.link_down()`` sets the *bridge-side* veth end (``hN`` in the bridge ns) down:
  the cable is pulled, the host's ``eth0`` loses carrier (NO-CARRIER) but keeps its
  address and routes, exactly like a real unplugged host.
* ``Host.throttle()`` puts a tbf qdisc on the host's ``eth0`` (the host's egress only).

Only ``ip`` and ``tc`` (iproute2) are used, via subprocess.  Every failing command
raises :class:`NetnsError` naming the command and its stderr.

Usage::

    from tests.netns import NetnsLab, netns_unavailable
    if (why := netns_unavailable()):
        pytest.skip(why)
    with NetnsLab() as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        srv = a.popen([sys.executable, "-m", "http.server", "--bind", a.ip, "8000"])
        b.run(["python3", "-c", f"import urllib.request as u; u.urlopen('http://{a.ip}:8000')"])
        a.link_down(); ...; a.link_up()
        a.throttle(rate="256kbit"); ...; a.unthrottle()
    # every namespace, the root veth and every process started with popen are gone here
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Self

__all__ = ["Host", "NetnsError", "NetnsLab", "cleanup_stale", "netns_unavailable"]

_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)
_CMD_TIMEOUT_S = 15.0
_LOCK_PATH = "/tmp/studiofleet-netns-lab.lock"
# Third octet space of 10.213.0.0/16: one /24 per lab.
_SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")
_HOST_FIRST = 10  # hosts get .10, .11, ...
_HOST_MAX = 240  # .10 .. .249
# Namespaces: sf<pid>l<counter>-br, sf<pid>l<counter>-h-<name>, probe sf<pid>lp-probe.
_STALE_NS_RE = re.compile(r"^sf(?P<pid>\d+)l(?:\d+|p)-")
# Root-side veth: sf<pid>l<counter>r (<= 15 chars: pid is at most 7 digits).
_STALE_LINK_RE = re.compile(r"^sf(?P<pid>\d+)l\d+r$")
_HOST_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")

_counter = itertools.count()
_counter_lock = threading.Lock()


class NetnsError(RuntimeError):
    """A lab command failed (or the lab is misused)."""

    def __init__(
        self,
        message: str,
        *,
        cmd: Sequence[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
    ):
        self.cmd = list(cmd) if cmd is not None else None
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message)


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_SEARCH_PATH)


def _tool(tool: str) -> str:
    path = _which(tool)
    if path is None:
        raise NetnsError(f"{tool!r} (iproute2) not found in PATH or /usr/sbin, /sbin")
    return path


def _run(
    cmd: Sequence[str],
    *,
    timeout: float = _CMD_TIMEOUT_S,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run a command, capture text output; raise NetnsError naming it (and its stderr) on failure."""
    cmd = [str(c) for c in cmd]
    try:
        cp = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"command timed out after {timeout}s: {' '.join(cmd)}", cmd=cmd) from e
    except OSError as e:
        raise NetnsError(f"cannot run {' '.join(cmd)}: {e}", cmd=cmd) from e
    if check and cp.returncode != 0:
        err = (cp.stderr or "").strip() or (cp.stdout or "").strip()
        raise NetnsError(
            f"command failed (rc={cp.returncode}): {' '.join(cmd)}: {err}",
            cmd=cmd,
            returncode=cp.returncode,
            stderr=cp.stderr or "",
        )
    return cp


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    pre = ["-n", ns] if ns else []
    return _run([_tool("ip"), *pre, *args], check=check)


def _tc(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    pre = ["-n", ns] if ns else []
    return _run([_tool("tc"), *pre, *args], check=check)


def _list_netns() -> list[str]:
    out = _ip("-j", "netns", "list").stdout.strip()
    if not out:
        return []
    return [entry["name"] for entry in json.loads(out)]


def _list_links(ns: str | None = None) -> list[str]:
    out = _ip("-j", "link", "show", ns=ns).stdout.strip()
    return [entry["ifname"] for entry in json.loads(out)] if out else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(ns: str) -> None:
    """SIGKILL every process still living in namespace ns (they would keep it alive)."""
    cp = _ip("netns", "pids", ns, check=False)
    if cp.returncode != 0:
        return
    for tok in cp.stdout.split():
        try:
            pid = int(tok)
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _delete_netns(ns: str) -> None:
    """Kill its processes and delete ns; a namespace that is already gone is fine."""
    if ns not in _list_netns():
        return
    _kill_ns_pids(ns)
    cp = _ip("netns", "del", ns, check=False)
    if cp.returncode != 0 and ns in _list_netns():
        raise NetnsError(
            f"command failed (rc={cp.returncode}): ip netns del {ns}: {cp.stderr.strip()}",
            cmd=["ip", "netns", "del", ns],
            returncode=cp.returncode,
            stderr=cp.stderr,
        )


def _delete_link(ifname: str) -> None:
    if ifname not in _list_links():
        return
    cp = _ip("link", "del", ifname, check=False)
    if cp.returncode != 0 and ifname in _list_links():
        raise NetnsError(
            f"command failed (rc={cp.returncode}): ip link del {ifname}: {cp.stderr.strip()}",
            cmd=["ip", "link", "del", ifname],
            returncode=cp.returncode,
            stderr=cp.stderr,
        )


@functools.lru_cache(maxsize=1)
def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (a sentence), or None if they can. Cached."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (euid is not 0)"
    if _which("ip") is None:
        return "'ip' (iproute2) not found"
    probe = f"sf{os.getpid()}lp-probe"
    try:
        _delete_netns(probe)
        _ip("netns", "add", probe)
        try:
            _ip("link", "add", "br0", "type", "bridge", ns=probe)
            _ip("link", "add", "v0", "type", "veth", "peer", "name", "v1", ns=probe)
        finally:
            _delete_netns(probe)
    except NetnsError as e:
        return f"cannot create network namespaces/bridges/veths: {e}"
    return None


def cleanup_stale() -> list[str]:
    """Best effort: delete lab namespaces and root veths left behind by processes that are gone.

    Returns what was removed. Names are matched by the lab pattern (sf<pid>l...) and kept
    when that pid is still alive (its lab may be running).
    """
    removed: list[str] = []
    try:
        names = _list_netns()
    except NetnsError:
        names = []
    for ns in names:
        m = _STALE_NS_RE.match(ns)
        if m and not _pid_alive(int(m["pid"])):
            try:
                _delete_netns(ns)
                removed.append(ns)
            except NetnsError:
                pass
    try:
        links = _list_links()
    except NetnsError:
        links = []
    for link in links:
        m = _STALE_LINK_RE.match(link)
        if m and not _pid_alive(int(m["pid"])):
            try:
                _delete_link(link)
                removed.append(link)
            except NetnsError:
                pass
    return removed


class Host:
    """One emulated machine: its own network namespace with lo and eth0 on the lab bridge."""

    def __init__(self, lab: NetnsLab, name: str, index: int, ns: str, ip: str, bridge_port: str):
        self.lab = lab
        self.name = name
        self.index = index
        self.ns = ns  # namespace name (for `ip netns exec`)
        self.ip = ip  # eth0 address, e.g. "10.213.7.10"
        self.ifname = "eth0"  # host-side interface
        self.bridge_port = bridge_port  # bridge-side veth end (in lab.bridge_ns), e.g. "h0"

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, ip={self.ip!r})"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped in `ip netns exec <ns>` (which execs: the pid is the program's own)."""
        return [_tool("ip"), "netns", "exec", self.ns, *[str(a) for a in argv]]

    def popen(self, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start argv inside this host; the lab SIGKILLs it on exit if it is still alive.

        `ip netns exec` execs the program, so ``proc.pid`` is the program's pid and
        signals sent to it reach the program directly.
        """
        self.lab._check_open()
        proc = subprocess.Popen(self.exec_argv(argv), **popen_kwargs)
        self.lab._procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run argv inside this host to completion; text stdout/stderr captured."""
        self.lab._check_open()
        return _run(self.exec_argv(argv), timeout=timeout, check=check, input=input)

    def link_down(self) -> None:
        """Pull the cable: set the bridge-side veth end down (eth0 here goes NO-CARRIER)."""
        _ip("link", "set", self.bridge_port, "down", ns=self.lab.bridge_ns)

    def link_up(self) -> None:
        """Plug the cable back in (the bridge has no STP, so the port forwards at once)."""
        _ip("link", "set", self.bridge_port, "up", ns=self.lab.bridge_ns)

    def throttle(self, rate: str = "64kbit", burst: str = "4kb", latency: str = "400ms") -> None:
        """Shape this host's egress on eth0 with a token bucket (tbf).

        tc units: "kbit" = kilobits, "kb" = kilobytes. burst must be at least one full
        frame (1514 bytes) or tbf drops every full-size packet and TCP stalls, which is
        why the default is "4kb" (4096 bytes), not "4kbit" (500 bytes).
        """
        _tc(
            "qdisc",
            "replace",
            "dev",
            self.ifname,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            burst,
            "latency",
            latency,
            ns=self.ns,
        )

    def unthrottle(self) -> None:
        """Remove the shaping qdisc (no-op when none is installed)."""
        shown = _tc("qdisc", "show", "dev", self.ifname, ns=self.ns).stdout
        if "tbf" in shown:
            _tc("qdisc", "del", "dev", self.ifname, "root", ns=self.ns)


_live_labs: set[NetnsLab] = set()


@atexit.register
def _close_live_labs() -> None:
    for lab in list(_live_labs):
        try:
            lab.close(_raise=False)
        except NetnsError as e:
            warnings.warn(
                f"netns lab {lab.prefix} cleanup at exit failed: {e}", RuntimeWarning, stacklevel=1
            )


class NetnsLab:
    """A bridge namespace plus hosts; use as a context manager (or start()/close())."""

    def __init__(self) -> None:
        with _counter_lock:
            self.counter = next(_counter)
        self.prefix = f"sf{os.getpid()}l{self.counter}"
        self.bridge_ns = f"{self.prefix}-br"
        self.root_veth = f"{self.prefix}r"  # root-namespace end of the uplink
        self.uplink = "up0"  # bridge-namespace end of the uplink
        self.subnet: ipaddress.IPv4Network | None = None
        self.root_ip: str | None = None  # the test process's address on the lab
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []  # created by us, in creation order
        self._root_veth_created = False
        self._procs: list[subprocess.Popen] = []
        self._state = "new"  # new -> open -> closed
        if len(self.root_veth) > 15:
            raise NetnsError(f"interface name {self.root_veth!r} longer than 15 characters")

    # ----- lifecycle -----
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(_raise=exc_type is None)

    def start(self) -> Self:
        if self._state != "new":
            raise NetnsError(f"lab {self.prefix} already {self._state}")
        reason = netns_unavailable()
        if reason:
            raise NetnsError(reason)
        self._state = "open"
        _live_labs.add(self)
        try:
            self._add_netns(self.bridge_ns)
            _ip(
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
                ns=self.bridge_ns,
            )
            _ip("link", "set", "br0", "up", ns=self.bridge_ns)
            self._root_veth_created = True  # set first: a half-made link must still be cleaned
            _ip(
                "link",
                "add",
                self.root_veth,
                "type",
                "veth",
                "peer",
                "name",
                self.uplink,
                "netns",
                self.bridge_ns,
            )
            _ip("link", "set", self.uplink, "master", "br0", ns=self.bridge_ns)
            _ip("link", "set", self.uplink, "up", ns=self.bridge_ns)
            # Choose and claim a free /24 atomically with respect to other labs on this machine.
            with open(_LOCK_PATH, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.subnet = self._free_subnet()
                self.root_ip = str(self.subnet.network_address + 1)
                _ip("addr", "add", f"{self.root_ip}/{self.subnet.prefixlen}", "dev", self.root_veth)
            _ip("link", "set", self.root_veth, "up")
        except BaseException:
            self.close(_raise=False)
            raise
        return self

    def close(self, _raise: bool = True) -> None:
        """Kill popen'ed processes, delete the root veth and every namespace. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        errors: list[str] = []
        for proc in self._procs:
            try:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired) as e:  # pragma: no cover - defensive
                errors.append(f"pid {proc.pid}: {e}")
        if self._root_veth_created:
            try:
                _delete_link(self.root_veth)
            except NetnsError as e:
                errors.append(str(e))
        for ns in reversed(self._namespaces):
            try:
                _delete_netns(ns)
            except NetnsError as e:
                errors.append(str(e))
        _live_labs.discard(self)
        if errors:
            msg = f"lab {self.prefix} cleanup left problems: " + "; ".join(errors)
            if _raise:
                raise NetnsError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def _check_open(self) -> None:
        if self._state != "open":
            raise NetnsError(f"lab {self.prefix} is {self._state}, not open")

    def _add_netns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "set", "lo", "up", ns=ns)

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """A /24 of 10.213.0.0/16 not overlapping any root-ns route or address (any table)."""
        used: list[ipaddress.IPv4Network] = []
        for args in (("-4", "-j", "route", "show", "table", "all"), ("-4", "-j", "addr", "show")):
            data = json.loads(_ip(*args).stdout or "[]")
            for entry in data:
                nets = []
                if "dst" in entry and entry["dst"] not in ("default", ""):
                    nets.append(entry["dst"])
                for a in entry.get("addr_info", []):
                    nets.append(f"{a['local']}/{a.get('prefixlen', 32)}")
                for n in nets:
                    try:
                        net = ipaddress.ip_network(n if "/" in n else f"{n}/32", strict=False)
                    except ValueError:
                        continue
                    if net.prefixlen > 0:
                        used.append(net)
        subnets = list(_SUBNET_BASE.subnets(new_prefix=24))
        start = (os.getpid() * 31 + self.counter * 7) % len(subnets)
        for k in range(len(subnets)):
            cand = subnets[(start + k) % len(subnets)]
            if not any(cand.overlaps(u) for u in used):
                return cand
        raise NetnsError(f"no free /24 left in {_SUBNET_BASE} for lab {self.prefix}")

    # ----- hosts -----
    def add_host(self, name: str) -> Host:
        """Create a host namespace: lo up, eth0 = 10.213.N.(10+i)/24 on the bridge, mcast route."""
        self._check_open()
        if not _HOST_NAME_RE.match(name):
            raise NetnsError(f"bad host name {name!r} (letters, digits, _ . - ; at most 40)")
        if any(h.name == name for h in self.hosts):
            raise NetnsError(f"host {name!r} already exists in lab {self.prefix}")
        index = len(self.hosts)
        if index >= _HOST_MAX:
            raise NetnsError(f"lab {self.prefix} is full ({_HOST_MAX} hosts)")
        assert self.subnet is not None
        ns = f"{self.prefix}-h-{name}"
        port = f"h{index}"
        ip = str(self.subnet.network_address + _HOST_FIRST + index)
        # On failure the namespace stays recorded and is removed at close(); the
        # bridge-side veth end lives in the bridge namespace and dies with it.
        self._add_netns(ns)
        _ip(
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
            ns=self.bridge_ns,
        )
        _ip("link", "set", port, "master", "br0", ns=self.bridge_ns)
        _ip("link", "set", port, "up", ns=self.bridge_ns)
        _ip("addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("route", "add", "224.0.0.0/4", "dev", "eth0", ns=ns)
        host = Host(self, name, index, ns, ip, port)
        self.hosts.append(host)
        return host
