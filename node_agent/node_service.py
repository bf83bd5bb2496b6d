"""The Node service: the node's whole state for the coordinator and fleetctl."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from cluster.api import API_VERSION, common_pb2, node_pb2, node_pb2_grpc
from node_agent import __version__
from node_agent.telemetry import cpu_load_1m, host_memory

if TYPE_CHECKING:
    from node_agent.agent import NodeAgent


def build_status(agent: "NodeAgent") -> node_pb2.NodeStatus:
    snap = agent.lifecycle.snapshot
    s = agent.settings
    c = agent.registry.counters
    engine = agent.engine.stats()
    mem = host_memory()
    queued = agent.registry.queued
    return node_pb2.NodeStatus(
        node_id=agent.node_id,
        lifecycle=common_pb2.Lifecycle.Value(f"LIFECYCLE_{snap.state.value}"),
        lifecycle_reason=snap.reason,
        model=agent.model_info,
        capacity=node_pb2.Capacity(
            max_running=s.max_running,
            max_queued=s.max_queued,
            max_tokens_per_request=s.max_tokens_limit,
            max_prompt_tokens=agent.limits.context_length - 1 if agent.facts else 0,
        ),
        load=node_pb2.Load(
            running=agent.registry.running,
            queued=len(queued),
            queued_prompt_tokens=sum(q.prompt_len for q in queued),
            tokens_generated_total=c.tokens_generated,
            prompt_tokens_total=c.prompt_tokens,
            requests_accepted_total=c.accepted,
            requests_completed_total=c.completed,
            requests_cancelled_total=c.cancelled,
            requests_deadline_total=c.deadline,
            requests_failed_total=c.failed,
            requests_rejected_total=c.rejected,
            decode_tokens_per_s=engine.decode_tokens_per_s,
            engine_sequences=engine.running,
            engine_waiting=engine.waiting,
            prompt_cache_entries=engine.prompt_cache_entries,
            prompt_cache_bytes=engine.prompt_cache_bytes,
            cached_prompt_tokens_total=engine.cached_prompt_tokens_total,
        ),
        memory=node_pb2.Memory(
            total_bytes=mem.total_bytes,
            available_bytes=mem.available_bytes,
            process_rss_bytes=mem.process_rss_bytes,
            engine_active_bytes=engine.active_memory_bytes,
            engine_peak_bytes=engine.peak_memory_bytes,
            unified=mem.unified,
            gpu_recommended_working_set_bytes=engine.recommended_working_set_bytes,
        ),
        uptime_s=time.monotonic() - agent.started_at,
        agent_version=__version__,
        api_version=API_VERSION,
        hostname=socket.gethostname(),
        cpu_load_1m=cpu_load_1m(),
    )


class NodeService(node_pb2_grpc.NodeServicer):
    def __init__(self, agent: "NodeAgent"):
        self._agent = agent

    async def GetStatus(self, request, context) -> node_pb2.NodeStatus:
        return build_status(self._agent)
