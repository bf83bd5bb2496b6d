"""The node's whole state as one NodeStatus (GetStatus, operation replies, /metrics)."""

from __future__ import annotations

import socket
import time

from cluster.api import API_VERSION, common_pb2, node_pb2
from cluster.config import NodeSettings
from node_agent import __version__, audit_witness
from node_agent.engine import Engine
from node_agent.lifecycle import Lifecycle
from node_agent.operations import Operations
from node_agent.requests import RequestRegistry
from node_agent.serving import Serving
from node_agent.staging import StagingArea
from node_agent.telemetry import CHIP, CPU_CORES, cpu_load_1m, host_memory


def build_status(
    *,
    node_id: str,
    settings: NodeSettings,
    lifecycle: Lifecycle,
    registry: RequestRegistry,
    engine: Engine,
    serving: Serving,
    staging: StagingArea,
    ops: Operations,
    started_at: float,
) -> node_pb2.NodeStatus:
    snap = lifecycle.snapshot
    s = settings
    c = registry.counters
    stats = engine.stats()
    mem = host_memory()
    queued = registry.queued
    return node_pb2.NodeStatus(
        node_id=node_id,
        lifecycle=common_pb2.Lifecycle.Value(f"LIFECYCLE_{snap.state.value}"),
        lifecycle_reason=snap.reason,
        cordoned=ops.state.cordoned,
        model=serving.model_info,
        capacity=node_pb2.Capacity(
            max_running=s.max_running,
            max_queued=s.max_queued,
            max_tokens_per_request=s.max_tokens_limit,
            max_prompt_tokens=serving.limits.context_length - 1 if serving.facts else 0,
        ),
        load=node_pb2.Load(
            running=registry.running,
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
            decode_tokens_per_s=stats.decode_tokens_per_s,
            engine_sequences=stats.running,
            engine_waiting=stats.waiting,
            prompt_cache_entries=stats.prompt_cache_entries,
            prompt_cache_bytes=stats.prompt_cache_bytes,
            cached_prompt_tokens_total=stats.cached_prompt_tokens_total,
            kv_cache_usage=stats.kv_cache_usage,
        ),
        memory=node_pb2.Memory(
            total_bytes=mem.total_bytes,
            available_bytes=mem.available_bytes,
            process_rss_bytes=mem.process_rss_bytes,
            engine_active_bytes=stats.active_memory_bytes,
            engine_peak_bytes=stats.peak_memory_bytes,
            unified=mem.unified,
            gpu_recommended_working_set_bytes=stats.recommended_working_set_bytes,
            gpus=[
                node_pb2.Gpu(
                    index=g.index,
                    name=g.name,
                    memory_used_bytes=g.memory_used_bytes,
                    memory_total_bytes=g.memory_total_bytes,
                    utilization=g.utilization,
                )
                for g in stats.gpus
            ],
        ),
        uptime_s=time.monotonic() - started_at,
        agent_version=__version__,
        api_version=API_VERSION,
        hostname=socket.gethostname(),
        chip=CHIP,
        cpu_cores=CPU_CORES,
        cpu_load_1m=cpu_load_1m(),
        staged=[m.to_proto() for m in staging.list()],
        previous_model=_model_ref(ops.state.previous),
        drain_deadline_left_s=ops.drain_left_s(),
        operations=ops.recent(),
        engine_server=_engine_server(stats.server),
        fencing_token=ops.state.fencing_token,
        audit_heads=audit_witness.to_proto(ops.state),
        group=engine.group_status() if hasattr(engine, "group_status") else None,
        phi_allowed=s.phi_allowed,
        node_class=s.node_class,
    )


def _engine_server(info) -> node_pb2.EngineServer | None:
    if info is None:
        return None
    return node_pb2.EngineServer(
        pid=info.pid, url=info.url, restarts=info.restarts, last_exit=info.last_exit, up_s=info.up_s
    )


def _model_ref(ref) -> common_pb2.ModelInfo:
    if ref is None:
        return common_pb2.ModelInfo()
    return common_pb2.ModelInfo(
        model_id=ref.model_id, version=ref.version, weights_digest=ref.digest
    )
