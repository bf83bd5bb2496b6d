"""Self-test of tests/netns.py: real namespaces, a bridge, TCP, mDNS, cable pulls and shaping."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import netns
from tests.netns import NetnsError, NetnsLab, cleanup_stale, netns_unavailable

_why = netns_unavailable()
if _why:
    pytest.skip(_why, allow_module_level=True)

PY = sys.executable

# A threaded TCP server: "hello" mode answers one line, "bulk N" mode sends N bytes.
SERVER = r"""
import os, socketserver, sys
ip, mode = sys.argv[1], sys.argv[2]
size = int(sys.argv[3]) if len(sys.argv) > 3 else 0
class H(socketserver.BaseRequestHandler):
    def handle(self):
        if mode == "hello":
            self.request.sendall(f"hello from {ip}\n".encode())
        else:
            self.request.sendall(b"x" * size)
socketserver.ThreadingTCPServer.daemon_threads = True
srv = socketserver.ThreadingTCPServer((ip, 0), H)
print("listening", srv.server_address[1], os.getpid(), flush=True)
srv.serve_forever()
"""

CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.makefile().readline().strip(), flush=True)
"""

MDNS_REGISTER = r"""
import asyncio, socket, sys
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf
ip, port = sys.argv[1], int(sys.argv[2])
async def main():
    azc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    info = ServiceInfo("_sftest._tcp.local.", "sfnode1._sftest._tcp.local.",
                       addresses=[socket.inet_aton(ip)], port=port, server="sfnode1.local.",
                       properties={"role": "node"})
    await azc.async_register_service(info)
    print("registered", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

MDNS_BROWSE = r"""
import asyncio, sys
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
ip = sys.argv[1]
TYPE = "_sftest._tcp.local."
async def main():
    azc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    names = asyncio.Queue()
    def on_change(zeroconf, service_type, name, state_change):
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put_nowait(name)
    browser = AsyncServiceBrowser(azc.zeroconf, [TYPE], handlers=[on_change])
    print("browsing", flush=True)
    while True:
        name = await names.get()
        info = AsyncServiceInfo(TYPE, name)
        if await info.async_request(azc.zeroconf, 3000):
            for addr in info.parsed_addresses(IPVersion.V4Only):
                print("found", name, addr, info.port, flush=True)
            break
    await browser.async_cancel()
    await azc.async_close()
asyncio.run(main())
"""


class Lines:
    """Reads a process's stdout lines on a thread; expect() waits (bounded) for a matching one."""

    def __init__(self, proc: subprocess.Popen, what: str):
        self.proc, self.what = proc, what
        self.seen: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._q.put(None)  # keep EOF visible to later expect() calls
                break
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(
            f"{self.what}: no line matching {pattern!r} within {timeout}s; "
            f"output (stdout+stderr)={self.seen[-40:]} rc={self.proc.poll()}"
        )


def start(host, script: str, *args, what: str) -> tuple[subprocess.Popen, Lines]:
    proc = host.popen(
        [PY, "-u", "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, Lines(proc, what)


def start_server(host, *args) -> tuple[subprocess.Popen, int]:
    proc, lines = start(host, SERVER, host.ip, *args, what=f"server on {host.name}")
    m = lines.expect(r"^listening (\d+) (\d+)$")
    assert int(m[2]) == proc.pid, "ip netns exec should exec: the Popen pid is the program's"
    return proc, int(m[1])


def hello(ip: str, port: int, timeout: float) -> str:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.settimeout(timeout)
        return s.makefile().readline().strip()


def throughput(ip: str, port: int, size: int, deadline_s: float) -> float:
    """Bytes/s of reading up to size bytes (stopping at the deadline)."""
    got = 0
    t0 = time.monotonic()
    with socket.create_connection((ip, port), timeout=deadline_s) as s:
        while got < size:
            left = t0 + deadline_s - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            got += len(chunk)
    return got / (time.monotonic() - t0)


@pytest.fixture(scope="module")
def lab():
    cleanup_stale()
    with NetnsLab() as lab:
        lab.add_host("node1")
        lab.add_host("node2")
        yield lab


def test_tcp_between_root_and_hosts(lab):
    h1, h2 = lab.hosts
    assert h1.ip != h2.ip and lab.root_ip and h1.ip.startswith(str(lab.subnet.network_address)[:-1])
    _, port = start_server(h1, "hello")
    assert hello(h1.ip, port, timeout=5) == f"hello from {h1.ip}"  # root ns -> host1
    out = h2.run([PY, "-c", CLIENT, h1.ip, port], timeout=15).stdout.strip()  # host2 -> host1
    assert out == f"hello from {h1.ip}"
    # The hosts really are separate stacks: host1's port is not open in host2's namespace.
    assert h2.run([PY, "-c", CLIENT, h2.ip, port], check=False, timeout=15).returncode != 0


def test_mdns_across_namespaces(lab):
    h1, h2 = lab.hosts
    reg, reg_lines = start(h1, MDNS_REGISTER, h1.ip, 8123, what="mdns register")
    reg_lines.expect(r"^registered$", timeout=10)
    browse, lines = start(h2, MDNS_BROWSE, h2.ip, what="mdns browse")
    m = lines.expect(r"^found (\S+) (\S+) (\d+)$", timeout=10)
    assert m[1] == "sfnode1._sftest._tcp.local."
    assert (m[2], int(m[3])) == (h1.ip, 8123)
    assert browse.wait(timeout=10) == 0
    reg.kill()
    reg.wait(timeout=5)


def test_link_down_cuts_host_and_link_up_restores(lab):
    h1, h2 = lab.hosts
    _, port1 = start_server(h1, "hello")
    _, port2 = start_server(h2, "hello")
    assert hello(h1.ip, port1, timeout=5) == f"hello from {h1.ip}"
    h1.link_down()
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError):  # timeout, or EHOSTUNREACH once ARP gives up
            hello(h1.ip, port1, timeout=1.5)
        assert time.monotonic() - t0 < 2.5
        assert hello(h2.ip, port2, timeout=5) == f"hello from {h2.ip}"  # only host1's cable
        carrier = h1.run(["ip", "-br", "link", "show", "eth0"]).stdout
        assert "NO-CARRIER" in carrier or "LOWERLAYERDOWN" in carrier, carrier
    finally:
        h1.link_up()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert hello(h1.ip, port1, timeout=2) == f"hello from {h1.ip}"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise


def test_throttle_slows_host_egress(lab):
    h1 = lab.hosts[0]
    size = 64 * 1024
    _, port = start_server(h1, "bulk", size)
    fast = throughput(h1.ip, port, size, deadline_s=5)
    h1.throttle(rate="256kbit")
    try:
        assert "tbf" in h1.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
        slow = throughput(h1.ip, port, size, deadline_s=1.0)
    finally:
        h1.unthrottle()
    again = throughput(h1.ip, port, size, deadline_s=5)
    print(f"fast={fast:.0f} B/s slow={slow:.0f} B/s again={again:.0f} B/s")
    assert slow < 64_000, slow  # 256 kbit/s = 32 kB/s plus the burst
    assert fast > 5 * slow and again > 5 * slow, (fast, slow, again)
    h1.unthrottle()  # idempotent


def test_exit_removes_everything():
    with NetnsLab() as lab:
        a = lab.add_host("a")
        lab.add_host("b")
        sleeper = a.popen(["sleep", "300"])
        # A grandchild the lab did not start itself still dies with the namespace.
        orphan = a.popen(
            ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True
        )
        orphan_pid = int(orphan.stdout.readline())
        names = lab.namespaces
        assert len(names) == 3 and all(n in netns._list_netns() for n in names)
        assert lab.root_veth in netns._list_links()
        with pytest.raises(NetnsError, match="false"):
            a.run(["false"])
        with pytest.raises(NetnsError, match="already exists"):
            lab.add_host("a")
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert not any(n in listed for n in names), listed
    assert lab.prefix not in listed
    links = subprocess.run(
        ["ip", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    assert lab.root_veth not in links
    routes = subprocess.run(
        ["ip", "route", "show"], capture_output=True, text=True, check=True
    ).stdout
    assert str(lab.subnet) not in routes
    assert sleeper.returncode == -9
    orphan.stdout.close()
    try:
        state = Path(f"/proc/{orphan_pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"grandchild {orphan_pid} survived the lab: {state}"
    lab.close()  # twice is fine
    with pytest.raises(NetnsError):
        a.popen(["true"])


def test_failed_setup_leaves_nothing(monkeypatch):
    real_ip = netns._ip

    def failing_ip(*args, **kw):
        if args[:2] == ("route", "add"):
            raise NetnsError("injected failure: ip route add")
        return real_ip(*args, **kw)

    lab = NetnsLab()
    with pytest.raises(NetnsError, match="injected"), lab:
        monkeypatch.setattr(netns, "_ip", failing_ip)
        lab.add_host("x")
    monkeypatch.undo()
    assert not any(n.startswith(lab.prefix) for n in netns._list_netns())
    assert lab.root_veth not in netns._list_links()

    lab2 = NetnsLab()
    monkeypatch.setattr(
        NetnsLab, "_free_subnet", lambda self: (_ for _ in ()).throw(NetnsError("no subnet"))
    )
    with pytest.raises(NetnsError, match="no subnet"):
        lab2.start()
    monkeypatch.undo()
    assert not any(n.startswith(lab2.prefix) for n in netns._list_netns())
    assert lab2.root_veth not in netns._list_links()


def test_two_labs_get_distinct_subnets_and_cleanup_stale():
    with NetnsLab() as a, NetnsLab() as b:
        assert a.subnet != b.subnet and not a.subnet.overlaps(b.subnet)
        ha, hb = a.add_host("n"), b.add_host("n")
        assert ha.ns != hb.ns
    # Leftovers of a dead process are reaped; our own (live pid) names are kept.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_ns, stale_link = f"sf{dead.pid}l0-br", f"sf{dead.pid}l0r"
    mine = f"sf{os.getpid()}l99999-br"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                stale_link,
                "type",
                "veth",
                "peer",
                "name",
                "up0",
                "netns",
                stale_ns,
            ],
            check=True,
        )
        removed = cleanup_stale()
        assert stale_ns in removed and stale_link in removed
        assert stale_ns not in netns._list_netns() and stale_link not in netns._list_links()
        assert mine in netns._list_netns()
    finally:
        subprocess.run(["ip", "netns", "del", mine], check=False)
        subprocess.run(["ip", "netns", "del", stale_ns], check=False, stderr=subprocess.DEVNULL)
