"""Run node agents and coordinators as local child processes: port 0, wait on health,
always clean up. Used by `fleetctl demo`, the benchmarks and the tests.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import fleet_pb2, fleet_pb2_grpc, inference_pb2_grpc, node_pb2, node_pb2_grpc



class DaemonProcess:
    """A daemon subprocess that prints a JSON "listening" line; use as a context manager."""

    module = ""

    def __init__(self, name: str, args: Sequence[str], *, env: Optional[dict] = None,
                 wrapper: Sequence[str] = ()):
        self.name = name
        self.args = list(args)
        self.wrapper = list(wrapper)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.address = ""
        self.port = 0
        self.stderr_path: Optional[Path] = None
        self._stdout: "queue.Queue[str]" = queue.Queue()
        self._channel: Optional[grpc.Channel] = None

    def start(self, log_dir: Path, timeout_s: float = 60.0) -> "DaemonProcess":
        """Start and wait until it listens (not until READY: see wait_serving)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"{self.name}.stderr.log"
        cmd = [*self.wrapper, sys.executable, "-m", self.module, *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=open(self.stderr_path, "wb"), text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            line = self._stdout.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise TimeoutError(f"{self.name} did not report its port in {timeout_s}s: {self.stderr()}")
        if not line:
            raise RuntimeError(f"{self.name} exited before listening: {self.stderr()}")
        info = json.loads(line)
        self.address, self.port = info["address"], info["port"]
        return self

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._stdout.put(line)
        self._stdout.put("")

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel)

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
            raise TimeoutError(f"{self.name} not SERVING within {timeout_s}s "
                               f"({err.code().name}): {self.stderr()}") from None
        raise RuntimeError(f"{self.name} health stream ended: {self.stderr()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path and self.stderr_path.exists() else ""

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
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

    def __init__(self, model: Path, *args: str, node_id: str = "test-node", env: Optional[dict] = None,
                 fleet: Optional[str] = None, listen: str = "127.0.0.1:0", wrapper: Sequence[str] = ()):
        """`fleet` turns mDNS announcement on (off by default); `wrapper` prefixes the
        command (e.g. `ip netns exec NS`)."""
        super().__init__(node_id, ["--model", str(model), "--listen", listen, "--node-id", node_id,
                                   *(("--fleet", fleet) if fleet else ("--no-mdns",)), *args],
                         env=env, wrapper=wrapper)
        self.model = model
        self.node_id = node_id

    def status(self) -> node_pb2.NodeStatus:
        return node_pb2_grpc.NodeStub(self.channel).GetStatus(node_pb2.GetStatusRequest(), timeout=5)


class CoordinatorProcess(DaemonProcess):
    """A `fleet-coordinator`; `nodes` are static addresses, `fleet` turns mDNS browsing on."""

    module = "coordinator.main"

    def __init__(self, *args: str, nodes: Sequence[str] = (), fleet: Optional[str] = None,
                 listen: str = "127.0.0.1:0", mdns_interface: str = "127.0.0.1", name: str = "coordinator",
                 env: Optional[dict] = None, wrapper: Sequence[str] = ()):
        mdns = ("--fleet", fleet, "--mdns-interface", mdns_interface) if fleet else ("--no-mdns",)
        super().__init__(name, ["--listen", listen, "--coordinator-id", name, *mdns,
                                *(a for n in nodes for a in ("--node", n)), *args], env=env, wrapper=wrapper)

    def nodes(self, timeout_s: float = 5.0) -> fleet_pb2.ListNodesResponse:
        return fleet_pb2_grpc.FleetStub(self.channel).ListNodes(fleet_pb2.ListNodesRequest(), timeout=timeout_s)

    def wait_routable(self, count: int, timeout_s: float = 30.0) -> fleet_pb2.ListNodesResponse:
        """Follow the event stream until `count` nodes are routable (no polling loop)."""
        events = fleet_pb2_grpc.FleetStub(self.channel).WatchEvents(fleet_pb2.WatchEventsRequest(),
                                                                    timeout=timeout_s)
        try:
            listing = self.nodes()
            while sum(n.routable for n in listing.nodes) < count:
                next(events)
                listing = self.nodes()
            return listing
        except (grpc.RpcError, StopIteration) as err:
            raise TimeoutError(f"{self.name}: {count} routable nodes not reached in {timeout_s}s "
                               f"({err}); last listing: {self.nodes()}") from None
        finally:
            events.cancel()
