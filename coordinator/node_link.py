"""The coordinator's one narrow interface to a node agent: status, health watch, generate.

With mTLS the channel checks that the node's certificate names the node id the
coordinator expects (DESIGN invariant 7): the id announced over mDNS, or, for a static
address, the id the node reported over a first channel that only proves "some node of
this fleet". `bind(node_id)` moves to a channel that proves that id; all traffic goes there.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import (
    INFERENCE_SERVICE,
    inference_pb2,
    inference_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from cluster.security.identity import ANY_NODE, Role, dns_name
from cluster.security.tls import ClientTLS, open_channel, served_serial, tls_refusal  # noqa: F401 - fleet.py uses it

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
RETIRED_GRACE_S = 600.0  # a replaced channel's running streams get this long to finish

SERVING = health_pb2.HealthCheckResponse.SERVING


class NodeLink:
    """One channel to one address; call `close()` when the node leaves the fleet."""

    def __init__(self, address: str, tls: Optional[ClientTLS], node_id: str = "", witness=None):
        self.address = address
        self._tls = tls
        self._witness = witness  # coordinator.audit_witness.AuditWitness, or None (no audit)
        self._retired: list = []  # replaced channels, closed with the link
        self._open(node_id)

    def _open(self, node_id: str) -> None:
        name = (dns_name(Role.NODE, node_id) if node_id else ANY_NODE) if self._tls else None
        # Each link remembers which certificate files it dialled with (links share one ClientTLS).
        stamp = self._tls.files.stamp() if self._tls else None
        self._channel = open_channel(
            self.address, self._tls, server_name=name, options=CHANNEL_OPTIONS, aio=True
        )
        self.node_id, self._server_name, self._stamp = node_id, name, stamp
        self.generation = (
            getattr(self, "generation", -1) + 1
        )  # a Watch on an older channel may end quietly
        self._node = node_pb2_grpc.NodeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)

    def _replace(self, node_id: str) -> None:
        old = self._channel
        self._open(node_id)
        self._retired.append(old)
        asyncio.get_running_loop().create_task(old.close(grace=RETIRED_GRACE_S))

    def bind(self, node_id: str) -> bool:
        """Expect `node_id` from now on; True if that took a new channel (TLS)."""
        if node_id == self.node_id:
            return False
        if self._tls is None:
            self.node_id = node_id
            return False
        self._replace(node_id)
        return True

    def refresh_credentials(self) -> bool:
        """New channel when the coordinator's certificate was re-issued (rotation);
        streams on the old one run to their end."""
        if self._tls is None or self._tls.files.stamp() == self._stamp:
            return False
        self._replace(self.node_id)
        return True

    async def served_serial(self) -> int:
        """The serial of the certificate the node presents (for the revocation check)."""
        return await asyncio.to_thread(served_serial, self.address, self._tls, self._server_name)

    async def status(self, timeout_s: float) -> node_pb2.NodeStatus:
        """The node's status; it is shown the audit chain's HEAD to keep (a witness)."""
        w = self._witness
        st = await self._node.GetStatus(
            node_pb2.GetStatusRequest(audit_head=w.head_for(self) if w else None),
            timeout=timeout_s,
            wait_for_ready=False,
        )
        if w is not None:
            await w.observe(self, st)
        return st

    def watch(self):
        """The node's pushed readiness (grpc.health.v1 Watch on the inference service)."""
        return self._health.Watch(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE))

    def generate(self, request: inference_pb2.GenerateRequest, timeout_s, metadata=None):
        return self._inference.Generate(request, timeout=timeout_s, metadata=metadata)

    @property
    def ops(self) -> node_pb2_grpc.NodeStub:
        """The node's operations (cordon, drain, stage, push, activate, restart)."""
        return self._node

    async def close(self) -> None:
        for channel in (*self._retired, self._channel):
            await channel.close(grace=None)
