"""The coordinator's one narrow interface to a node agent: status, health watch, generate."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import INFERENCE_SERVICE, inference_pb2, inference_pb2_grpc, node_pb2, node_pb2_grpc

# shared/RELIABILITY.md: ping every ~10 s, 5 s timeout, also on idle channels (the node
# permits it). Reconnect fast: a node restarting should be found in about a second.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),  # the coordinator decides what is retried, and where
]

SERVING = health_pb2.HealthCheckResponse.SERVING


class NodeLink:
    """One channel to one address; call `close()` when the node leaves the fleet."""

    def __init__(self, address: str):
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._node = node_pb2_grpc.NodeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)

    async def status(self, timeout_s: float) -> node_pb2.NodeStatus:
        return await self._node.GetStatus(node_pb2.GetStatusRequest(), timeout=timeout_s,
                                          wait_for_ready=False)

    def watch(self):
        """The node's pushed readiness (grpc.health.v1 Watch on the inference service)."""
        return self._health.Watch(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE))

    def generate(self, request: inference_pb2.GenerateRequest, timeout_s):
        return self._inference.Generate(request, timeout=timeout_s)

    async def close(self) -> None:
        await self._channel.close(grace=None)
