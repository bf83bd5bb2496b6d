"""Run node agents and coordinators as local child processes: port 0, wait on health,
always clean up. Used by `fleetctl demo`, the benchmarks and the tests.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import fleet_pb2, fleet_pb2_grpc, inference_pb2_grpc, node_pb2, node_pb2_grpc
from cluster.security.identity import Role, dns_name
from cluster.security.tls import ENV_DIR, ClientTLS, open_channel

HARNESS_OPERATOR, HARNESS_APP = "operator", "app"  # the certificates this harness calls with
# Nodes serve inference to coordinators only: the harness calls a node as one.
HARNESS_NODE_CALLER = "harness-coordinator"


def free_ports(n: int) -> list[int]:
    """`n` loopback ports free for both TCP and UDP: a node group's ranks (the ring backend's
    TCP and the heartbeat's UDP on one port each)."""
    ports: list[int] = []
    while len(ports) < n:
        with closing(socket.socket()) as tcp, closing(socket.socket(type=socket.SOCK_DGRAM)) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            if port not in ports:
                ports.append(port)
    return ports


def ensure_cert(tls_dir: Path, role: Role, name: str) -> None:
    """Issue NAME's certificate from the CA in `tls_dir` if it has none (a test or demo CA)."""
    if not (tls_dir / f"{name}.pem").exists() and (tls_dir / "ca.key").exists():
        from cluster.security.ca import issue

        issue(tls_dir, role, name)


class DaemonProcess:
    """A daemon subprocess that prints a JSON "listening" line; use as a context manager."""

    module = ""
    role = Role.NODE

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Optional[dict] = None,
        wrapper: Sequence[str] = (),
        tls_dir: Optional[Path] = None,
        plaintext: bool = False,
    ):
        """mTLS from `tls_dir` (default: $STUDIOFLEET_TLS_DIR; certificates are issued there
        on demand when it holds the CA key), plaintext when neither is given."""
        self.name = name
        found = os.environ.get(ENV_DIR)
        self.tls_dir: Optional[Path] = (
            None if plaintext else (Path(tls_dir) if tls_dir else Path(found) if found else None)
        )
        if self.tls_dir is not None:
            ensure_cert(self.tls_dir, self.role, name)
            args = [*args, "--tls-dir", str(self.tls_dir), "--tls-name", name]
        else:
            args = [*args, "--plaintext"]
        self.args = list(args)
        self.wrapper = list(wrapper)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.address = ""
        self.port = 0
        self.http_address = self.http_scheme = self.openai_address = self.openai_scheme = ""
        self.stderr_path: Optional[Path] = None
        self._stdout: "queue.Queue[str]" = queue.Queue()
        self._channel: Optional[grpc.Channel] = None
        self._app_channel: Optional[grpc.Channel] = None

    def start(self, log_dir: Path, timeout_s: float = 60.0) -> "DaemonProcess":
        """Start and wait until it listens (not until READY: see wait_serving)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"{self.name}.stderr.log"
        cmd = [
            *self.wrapper,
            sys.executable,
            "-m",
            self.module,
            *self.args,
            *self.late_args(log_dir),
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=open(self.stderr_path, "wb"),
            text=True,
        )
        self._stdout = queue.Queue()  # a restart must not read the previous process's end
        threading.Thread(target=self._pump, args=(self.proc, self._stdout), daemon=True).start()
        try:
            line = self._stdout.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise TimeoutError(
                f"{self.name} did not report its port in {timeout_s}s: {self.stderr()}"
            ) from None
        if not line:
            raise RuntimeError(f"{self.name} exited before listening: {self.stderr()}")
        info = json.loads(line)
        self.address, self.port = info["address"], info["port"]
        # The monitoring port (/metrics, the coordinator's dashboard), if it runs one.
        self.http_address, self.http_scheme = (
            info.get("http_address", ""),
            info.get("http_scheme", ""),
        )
        # The coordinator's OpenAI-compatible front door, if it runs one.
        self.openai_address, self.openai_scheme = (
            info.get("openai_address", ""),
            info.get("openai_scheme", ""),
        )
        return self

    @staticmethod
    def _pump(proc: subprocess.Popen, lines: "queue.Queue[str]") -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    def late_args(self, log_dir: Path) -> list[str]:
        return []

    def credentials(self, name: str, role: Role) -> Optional[ClientTLS]:
        """A caller's credentials from this daemon's CA directory (None in plaintext)."""
        if self.tls_dir is None:
            return None
        ensure_cert(self.tls_dir, role, name)
        return ClientTLS(self.tls_dir, name)

    def http_get(
        self,
        path: str,
        name: Optional[str] = HARNESS_OPERATOR,
        role: Role = Role.OPERATOR,
        timeout_s: float = 10.0,
        headers: Optional[dict] = None,
        follow_redirects: bool = True,
    ) -> tuple[int, bytes, dict]:
        """GET `path` on the monitoring port as `name` (None: with no client certificate);
        (status, body, headers), errors and (unless followed) redirects included."""
        import ssl
        import urllib.error
        import urllib.request

        context = None
        if self.http_scheme == "https":
            context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.pem"))
            if name is not None:
                self.credentials(name, role)
                context.load_cert_chain(self.tls_dir / f"{name}.pem", self.tls_dir / f"{name}.key")
        handlers = [urllib.request.HTTPSHandler(context=context)] if context is not None else []
        if not follow_redirects:

            class Stay(urllib.request.HTTPRedirectHandler):
                def redirect_request(self, *_args, **_kwargs):
                    return None  # the 3xx itself comes back as an HTTPError

            handlers.append(Stay())
        request = urllib.request.Request(
            f"{self.http_scheme}://{self.http_address}{path}", headers=headers or {}
        )
        try:
            with urllib.request.build_opener(*handlers).open(request, timeout=timeout_s) as reply:
                return reply.status, reply.read(), dict(reply.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    def dial(self, name: str = HARNESS_OPERATOR, role: Role = Role.OPERATOR) -> grpc.Channel:
        """A new channel to this daemon as `name` (checking its certificate names it)."""
        return open_channel(
            self.address, self.credentials(name, role), server_name=dns_name(self.role, self.name)
        )

    @property
    def channel(self) -> grpc.Channel:
        """The operator's channel: status, health, admin."""
        if self._channel is None:
            self._channel = self.dial()
        return self._channel

    inference_caller = (HARNESS_APP, Role.APP)

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        """Inference as the identity this daemon serves it to (an app; a coordinator for nodes)."""
        if self._app_channel is None:
            self._app_channel = self.dial(*self.inference_caller)
        return inference_pb2_grpc.InferenceStub(self._app_channel)

    def health_watch(self, timeout_s: float):
        """Iterate health statuses pushed by the node (Watch), until timeout_s."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)

    def wait_serving(self, timeout_s: float = 60.0) -> None:
        """Block on the health Watch stream until SERVING; no polling."""
        try:
            for resp in self.health_watch(timeout_s):
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            raise TimeoutError(
                f"{self.name} not SERVING within {timeout_s}s ({err.code().name}): {self.stderr()}"
            ) from None
        raise RuntimeError(f"{self.name} health stream ended: {self.stderr()}")

    def restart(
        self, log_dir: Path, *, kill: bool = False, timeout_s: float = 60.0
    ) -> "DaemonProcess":
        """Stop (SIGTERM, or SIGKILL with `kill`) and start again on the same address, as a
        service manager would; state directories given by late_args are kept."""
        if kill and self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.stop()
        if "--listen" in self.args and self.address:
            self.args[self.args.index("--listen") + 1] = self.address
        # Its HTTP ports too: by default they follow the gRPC port (+1, +2), and a port the
        # first start was given by the kernel may have gone to another process since.
        for flag, address in (
            ("--http-listen", self.http_address),
            ("--openai-listen", self.openai_address),
        ):
            if address and flag in self.args:
                self.args[self.args.index(flag) + 1] = address
            elif address:
                self.args += [flag, address]
        return self.start(log_dir, timeout_s)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stderr(self) -> str:
        return (
            self.stderr_path.read_text(errors="replace")
            if self.stderr_path and self.stderr_path.exists()
            else ""
        )

    def stop(self) -> None:
        for channel in (self._channel, self._app_channel):
            if channel is not None:
                channel.close()
        self._channel = self._app_channel = None
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class NodeProcess(DaemonProcess):
    """A `fleet-node` serving `model`."""

    module = "node_agent.main"
    inference_caller = (HARNESS_NODE_CALLER, Role.COORDINATOR)

    def __init__(
        self,
        model: Path,
        *args: str,
        node_id: str = "test-node",
        env: Optional[dict] = None,
        fleet: Optional[str] = None,
        listen: str = "127.0.0.1:0",
        wrapper: Sequence[str] = (),
        tls_dir: Optional[Path] = None,
        plaintext: bool = False,
    ):
        """`fleet` turns mDNS announcement on (off by default); `wrapper` prefixes the
        command (e.g. `ip netns exec NS`)."""
        super().__init__(
            node_id,
            [
                "--model",
                str(model),
                "--listen",
                listen,
                "--node-id",
                node_id,
                *(("--fleet", fleet) if fleet else ("--no-mdns",)),
                *args,
            ],
            env=env,
            wrapper=wrapper,
            tls_dir=tls_dir,
            plaintext=plaintext,
        )
        self.model = model
        self.node_id = node_id
        self.state_dir: Optional[Path] = None

    def late_args(self, log_dir: Path) -> list[str]:
        """Its own state directory (cordon, drain, activated model), kept across restarts
        of this process object: LOG_DIR/NAME-state unless --state-dir was given."""
        if "--state-dir" in self.args:
            return []
        self.state_dir = self.state_dir or log_dir / f"{self.name}-state"
        return ["--state-dir", str(self.state_dir)]

    def status(self) -> node_pb2.NodeStatus:
        return node_pb2_grpc.NodeStub(self.channel).GetStatus(
            node_pb2.GetStatusRequest(), timeout=5
        )


class CoordinatorProcess(DaemonProcess):
    """A `fleet-coordinator`; `nodes` are static addresses, `fleet` turns mDNS browsing on."""

    module = "coordinator.main"
    role = Role.COORDINATOR

    def __init__(
        self,
        *args: str,
        nodes: Sequence[str] = (),
        fleet: Optional[str] = None,
        listen: str = "127.0.0.1:0",
        mdns_interface: str = "127.0.0.1",
        name: str = "coordinator",
        env: Optional[dict] = None,
        wrapper: Sequence[str] = (),
        tls_dir: Optional[Path] = None,
        plaintext: bool = False,
        audit_dir: Optional[Path] = None,
    ):
        """The audit chain goes to `audit_dir` (default: LOG_DIR/NAME-audit)."""
        mdns = ("--fleet", fleet, "--mdns-interface", mdns_interface) if fleet else ("--no-mdns",)
        super().__init__(
            name,
            [
                "--listen",
                listen,
                "--coordinator-id",
                name,
                *mdns,
                *(a for n in nodes for a in ("--node", n)),
                *args,
            ],
            env=env,
            wrapper=wrapper,
            tls_dir=tls_dir,
            plaintext=plaintext,
        )
        self.audit_dir = audit_dir
        self.state_db: Optional[Path] = None

    def late_args(self, log_dir: Path) -> list[str]:
        """Its audit chain and rollout database under LOG_DIR unless given: a restarted
        process object keeps both (the chain continues, a rollout resumes)."""
        args = []
        if "--state-db" not in self.args:
            self.state_db = self.state_db or log_dir / f"{self.name}-state.db"
            args += ["--state-db", str(self.state_db)]
        if "--no-audit" in self.args or "--audit-dir" in self.args:
            return args
        self.audit_dir = self.audit_dir or log_dir / f"{self.name}-audit"
        return [*args, "--audit-dir", str(self.audit_dir)]

    @property
    def openai_base_url(self) -> str:
        """The base URL an OpenAI SDK takes for this coordinator's front door."""
        return f"{self.openai_scheme}://{self.openai_address}/v1"

    def nodes(self, timeout_s: float = 5.0) -> fleet_pb2.ListNodesResponse:
        return fleet_pb2_grpc.FleetStub(self.channel).ListNodes(
            fleet_pb2.ListNodesRequest(), timeout=timeout_s
        )

    def wait_routable(self, count: int, timeout_s: float = 30.0) -> fleet_pb2.ListNodesResponse:
        """Follow the event stream until `count` nodes are routable (no polling loop). The
        stream replays the coordinator's recent history first: a change made after the first
        listing but before the subscription reached the coordinator is in it, so it is not
        missed; events older than this call are skipped without listing again."""
        since = time.time() - 1.0  # the host's one clock; a second's slack for rounding
        events = fleet_pb2_grpc.FleetStub(self.channel).WatchEvents(
            fleet_pb2.WatchEventsRequest(replay=True), timeout=timeout_s
        )
        try:
            listing = self.nodes()
            while sum(n.routable for n in listing.nodes) < count:
                if next(events).time_unix_s >= since:
                    listing = self.nodes()
            return listing
        except (grpc.RpcError, StopIteration) as err:
            raise TimeoutError(
                f"{self.name}: {count} routable nodes not reached in {timeout_s}s "
                f"({err}); last listing: {self.nodes()}"
            ) from None
        finally:
            events.cancel()
