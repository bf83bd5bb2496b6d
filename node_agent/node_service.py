"""The Node service: the node's whole state for the coordinator and fleetctl."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import grpc

from cluster.api import API_VERSION, common_pb2, node_pb2, node_pb2_grpc
from cluster.security.identity import DEVELOPER, Role
from cluster.validation import MAX_REQUEST_ID_LEN, valid_id
from node_agent import __version__, audit_witness
from node_agent.operations import OperationError, to_proto
from node_agent.staging import StagingError, StagingFull
from node_agent.telemetry import cpu_load_1m, host_memory

log = logging.getLogger(__name__)

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
        cordoned=agent.cordoned,
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
            kv_cache_usage=engine.kv_cache_usage,
        ),
        memory=node_pb2.Memory(
            total_bytes=mem.total_bytes,
            available_bytes=mem.available_bytes,
            process_rss_bytes=mem.process_rss_bytes,
            engine_active_bytes=engine.active_memory_bytes,
            engine_peak_bytes=engine.peak_memory_bytes,
            unified=mem.unified,
            gpu_recommended_working_set_bytes=engine.recommended_working_set_bytes,
            gpus=[node_pb2.Gpu(index=g.index, name=g.name, memory_used_bytes=g.memory_used_bytes,
                               memory_total_bytes=g.memory_total_bytes, utilization=g.utilization)
                  for g in engine.gpus],
        ),
        uptime_s=time.monotonic() - agent.started_at,
        agent_version=__version__,
        api_version=API_VERSION,
        hostname=socket.gethostname(),
        cpu_load_1m=cpu_load_1m(),
        staged=[m.to_proto() for m in agent.staging.list()],
        previous_model=_model_ref(agent.ops.state.previous),
        drain_deadline_left_s=agent.ops.drain_left_s(),
        operations=agent.ops.recent(),
        engine_server=_engine_server(engine.server),
        fencing_token=agent.ops.state.fencing_token,
        audit_heads=audit_witness.to_proto(agent.ops.state),
    )


def _engine_server(info) -> Optional[node_pb2.EngineServer]:
    if info is None:
        return None
    return node_pb2.EngineServer(pid=info.pid, url=info.url, restarts=info.restarts, last_exit=info.last_exit,
                                 up_s=info.up_s)


def _model_ref(ref) -> common_pb2.ModelInfo:
    if ref is None:
        return common_pb2.ModelInfo()
    return common_pb2.ModelInfo(model_id=ref.model_id, version=ref.version, weights_digest=ref.digest)


def _staging_code(exc: StagingError, default=grpc.StatusCode.INVALID_ARGUMENT) -> grpc.StatusCode:
    """A staging refused for room is RESOURCE_EXHAUSTED; any other is `default`."""
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, StagingFull) else default


class NodeService(node_pb2_grpc.NodeServicer):
    """Status and operations. Operations are validated here, run by node_agent.operations,
    and answered with the operation's record and the node's status."""

    def __init__(self, agent: "NodeAgent"):
        self._agent = agent

    async def GetStatus(self, request, context) -> node_pb2.NodeStatus:
        if request.HasField("audit_head"):
            await self._witness(request.audit_head, context)
        return build_status(self._agent)

    async def _witness(self, head, context) -> None:
        """Keep a coordinator's signed audit HEAD if newer (saved before the answer)."""
        agent = self._agent
        why = audit_witness.invalid(head) or (None if self._from_coordinator(context) else
                                              "audit_head is sent by coordinators only; leave it unset")
        if why:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {agent.node_id}: {why}")
        if audit_witness.keep(agent.ops.state, head, agent.node_id):
            try:
                agent.ops.save()
            except OSError as exc:
                log.error("node=%s audit HEAD %d not saved (%s)", agent.node_id, head.seq, type(exc).__name__)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {agent.node_id}: its state file cannot be "
                                    "written, so it cannot keep the audit HEAD; see the node log")

    def _from_coordinator(self, context) -> bool:
        """A coordinator's certificate (or plaintext development, where every caller is one)."""
        authz = getattr(self._agent, "authz", None)
        if authz is None:
            return True
        who = authz.peer(context)
        return who.role is Role.COORDINATOR or who == DEVELOPER

    async def _fenced(self, context, token: int) -> None:
        """Refuse an operation whose rollout-lease fencing token is stale (or not a coordinator's)."""
        if token and not self._from_coordinator(context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"node {self._agent.node_id}: fencing_token is sent by coordinators holding the "
                                "rollout lease; leave it 0 for an operator's command")
        try:
            self._agent.ops.fence(token)
        except OperationError as exc:
            await context.abort(exc.code, str(exc))

    async def _run(self, context, op_id: str, start, fencing_token: int = 0) -> node_pb2.OperationReply:
        agent = self._agent
        op_id = op_id or f"op-{uuid.uuid4().hex[:12]}"
        if not valid_id(op_id):  # the request-id rule: ids land in key=value log lines
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"node {agent.node_id}: operation_id must be 1-{MAX_REQUEST_ID_LEN} characters of "
                                "[A-Za-z0-9._:@/+-]")
        if agent.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {agent.node_id} is shutting down")
        who = agent.authz.peer(context) if getattr(agent, "authz", None) else None
        log.info("node=%s operation=%s requested by caller=%s peer=%s", agent.node_id, op_id,
                 f"{who.role.value}/{who.name}" if who else "-", context.peer())
        await self._fenced(context, fencing_token)
        try:
            rec = await start(op_id)
        except OperationError as exc:
            await context.abort(exc.code, str(exc))
        except StagingError as exc:
            await context.abort(_staging_code(exc, grpc.StatusCode.FAILED_PRECONDITION), f"node {agent.node_id}: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. the state file's disk: never UNKNOWN
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("node=%s operation=%s failed", agent.node_id, op_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"node {agent.node_id}: operation {op_id} failed "
                                f"({type(exc).__name__}); see the node log")
        return node_pb2.OperationReply(operation=to_proto(rec), status=build_status(agent))

    async def Cordon(self, request, context) -> node_pb2.OperationReply:
        reason = await self._reason(request.reason, context)
        return await self._run(context, request.operation_id,
                               lambda op: self._agent.ops.cordon(op, request.cordoned, reason),
                               request.fencing_token)

    async def Drain(self, request, context) -> node_pb2.OperationReply:
        reason = await self._reason(request.reason, context)
        if not (0 <= request.timeout_s <= 86_400):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"node {self._agent.node_id}: timeout_s must be 0 (the node's default) to 86400")
        return await self._run(context, request.operation_id,
                               lambda op: self._agent.ops.drain(op, request.timeout_s, reason),
                               request.fencing_token)

    async def StageModel(self, request, context) -> node_pb2.OperationReply:
        source = Path(request.source_path)
        if not request.source_path or not source.is_absolute():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"node {self._agent.node_id}: source_path must be an absolute directory "
                                "path on the node's host")
        return await self._run(context, request.operation_id, lambda op: self._agent.ops.stage(
            op, source, request.model_id or source.name, request.version, request.expected_digest),
            request.fencing_token)

    async def BeginPush(self, request, context) -> node_pb2.PushOffsets:
        await self._fenced(context, request.fencing_token)
        try:
            return await asyncio.to_thread(self._agent.staging.begin_push, request)
        except StagingError as exc:
            await context.abort(_staging_code(exc), f"node {self._agent.node_id}: {exc}")
        except OSError as exc:
            await self._disk_failed(context, exc)

    async def PushWeights(self, request_iterator, context) -> node_pb2.OperationReply:
        manifest = None
        staging = self._agent.staging
        try:
            async for chunk in request_iterator:
                if manifest is None:
                    if not chunk.HasField("manifest"):
                        raise StagingError("the first chunk must carry the manifest (call BeginPush first)")
                    manifest = chunk.manifest
                    await self._fenced(context, manifest.fencing_token)
                    await asyncio.to_thread(staging.begin_push, manifest)
                if chunk.data:
                    await asyncio.to_thread(staging.write_chunk, manifest.expected_digest, chunk)
            if manifest is None:
                raise StagingError("no chunks were sent")
        except StagingError as exc:
            await context.abort(_staging_code(exc), f"node {self._agent.node_id}: {exc}")
        except OSError as exc:
            await self._disk_failed(context, exc)
        return await self._run(context, manifest.operation_id,
                               lambda op: self._agent.ops.finish_push(op, manifest), manifest.fencing_token)

    async def Activate(self, request, context) -> node_pb2.OperationReply:
        if not request.previous and not request.weights_digest:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"node {self._agent.node_id}: give weights_digest (a staged model) or previous")
        return await self._run(context, request.operation_id, lambda op: self._agent.ops.activate(
            op, request.weights_digest, request.previous), request.fencing_token)

    async def Restart(self, request, context) -> node_pb2.OperationReply:
        return await self._run(context, request.operation_id,
                               lambda op: self._agent.ops.restart(op, request.drain_timeout_s),
                               request.fencing_token)

    async def _disk_failed(self, context, exc: OSError) -> None:
        log.error("node=%s staging failed on its disk: %s", self._agent.node_id, type(exc).__name__)
        await context.abort(grpc.StatusCode.INTERNAL, f"node {self._agent.node_id}: staging failed on the node's "
                            f"disk ({type(exc).__name__}, errno {exc.errno}); see the node log, then push again")

    async def _reason(self, reason: str, context) -> str:
        if len(reason) > 200 or not reason.isprintable():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"node {self._agent.node_id}: reason must be printable and at most 200 "
                                "characters (never patient information)")
        return reason
