"""The Node service: the node's whole state for the coordinator and fleetctl."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Callable

import grpc

from cluster.api import node_pb2, node_pb2_grpc
from cluster.security.identity import DEVELOPER, Role
from cluster.validation import MAX_REQUEST_ID_LEN, valid_id
from node_agent import audit_witness
from node_agent.operations import OperationError, Operations, to_proto
from node_agent.staging import StagingArea, StagingError, StagingFull

log = logging.getLogger(__name__)


def _staging_code(exc: StagingError, default=grpc.StatusCode.INVALID_ARGUMENT) -> grpc.StatusCode:
    """A staging refused for room is RESOURCE_EXHAUSTED; any other is `default`."""
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, StagingFull) else default


class NodeService(node_pb2_grpc.NodeServicer):
    """Status and operations. Operations are validated here, run by node_agent.operations,
    and answered with the operation's record and the node's status."""

    def __init__(
        self,
        *,
        node_id: str,
        ops: Operations,
        staging: StagingArea,
        status: Callable[[], node_pb2.NodeStatus],
        stopping: Callable[[], bool],
        authz=None,
    ):
        self._node_id = node_id
        self._ops = ops
        self._staging = staging
        self._status = status  # -> the node's whole status now (node_agent.status)
        self._stopping = stopping  # -> True once the agent is shutting down
        self._authz = authz  # the server's Authorizer (None: no interceptor, as in a unit test)

    async def GetStatus(self, request, context) -> node_pb2.NodeStatus:
        if request.HasField("audit_head"):
            await self._witness(request.audit_head, context)
        return self._status()

    async def _witness(self, head, context) -> None:
        """Keep a coordinator's signed audit HEAD if newer (saved before the answer)."""
        node = self._node_id
        why = audit_witness.invalid(head) or (
            None
            if self._from_coordinator(context)
            else "audit_head is sent by coordinators only; leave it unset"
        )
        if why:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {node}: {why}")
        if audit_witness.keep(self._ops.state, head, node):
            try:
                await self._ops.save()
            except OSError as exc:
                log.error(
                    "node=%s audit HEAD %d not saved (%s)", node, head.seq, type(exc).__name__
                )
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"node {node}: its state file cannot be "
                    "written, so it cannot keep the audit HEAD; see the node log",
                )

    def _from_coordinator(self, context) -> bool:
        """A coordinator's certificate (or plaintext development, where every caller is one)."""
        if self._authz is None:
            return True
        who = self._authz.peer(context)
        return who.role is Role.COORDINATOR or who == DEVELOPER

    async def _fenced(self, context, token: int) -> None:
        """Refuse an operation whose rollout-lease fencing token is stale (or not a coordinator's)."""
        if token and not self._from_coordinator(context):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {self._node_id}: fencing_token is sent by coordinators holding the "
                "rollout lease; leave it 0 for an operator's command",
            )
        try:
            await self._ops.fence(token)
        except OperationError as exc:
            await context.abort(exc.code, str(exc))

    async def _run(
        self, context, op_id: str, start, fencing_token: int = 0
    ) -> node_pb2.OperationReply:
        node = self._node_id
        op_id = op_id or f"op-{uuid.uuid4().hex[:12]}"
        if not valid_id(op_id):  # the request-id rule: ids land in key=value log lines
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {node}: operation_id must be 1-{MAX_REQUEST_ID_LEN} characters of "
                "[A-Za-z0-9._:@/+-]",
            )
        if self._stopping():
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {node} is shutting down")
        who = self._authz.peer(context) if self._authz is not None else None
        log.info(
            "node=%s operation=%s requested by caller=%s peer=%s",
            node,
            op_id,
            f"{who.role.value}/{who.name}" if who else "-",
            context.peer(),
        )
        await self._fenced(context, fencing_token)
        try:
            rec = await start(op_id)
        except OperationError as exc:
            await context.abort(exc.code, str(exc))
        except StagingError as exc:
            await context.abort(
                _staging_code(exc, grpc.StatusCode.FAILED_PRECONDITION), f"node {node}: {exc}"
            )
        except Exception as exc:  # noqa: BLE001 - e.g. the state file's disk: never UNKNOWN
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("node=%s operation=%s failed", node, op_id)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"node {node}: operation {op_id} failed ({type(exc).__name__}); see the node log",
            )
        return node_pb2.OperationReply(operation=to_proto(rec), status=self._status())

    async def Cordon(self, request, context) -> node_pb2.OperationReply:
        reason = await self._reason(request.reason, context)
        return await self._run(
            context,
            request.operation_id,
            lambda op: self._ops.cordon(op, request.cordoned, reason),
            request.fencing_token,
        )

    async def Drain(self, request, context) -> node_pb2.OperationReply:
        reason = await self._reason(request.reason, context)
        if not (0 <= request.timeout_s <= 86_400):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {self._node_id}: timeout_s must be 0 (the node's default) to 86400",
            )
        return await self._run(
            context,
            request.operation_id,
            lambda op: self._ops.drain(op, request.timeout_s, reason),
            request.fencing_token,
        )

    async def StageModel(self, request, context) -> node_pb2.OperationReply:
        source = Path(request.source_path)
        if not request.source_path or not source.is_absolute():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {self._node_id}: source_path must be an absolute directory "
                "path on the node's host",
            )
        return await self._run(
            context,
            request.operation_id,
            lambda op: self._ops.stage(
                op,
                source,
                request.model_id or source.name,
                request.version,
                request.expected_digest,
            ),
            request.fencing_token,
        )

    async def BeginPush(self, request, context) -> node_pb2.PushOffsets:
        await self._fenced(context, request.fencing_token)
        try:
            return await asyncio.to_thread(self._staging.begin_push, request)
        except StagingError as exc:
            await context.abort(_staging_code(exc), f"node {self._node_id}: {exc}")
        except OSError as exc:
            await self._disk_failed(context, exc)

    async def PushWeights(self, request_iterator, context) -> node_pb2.OperationReply:
        manifest = None
        staging = self._staging
        try:
            async for chunk in request_iterator:
                if manifest is None:
                    if not chunk.HasField("manifest"):
                        raise StagingError(
                            "the first chunk must carry the manifest (call BeginPush first)"
                        )
                    manifest = chunk.manifest
                    await self._fenced(context, manifest.fencing_token)
                    await asyncio.to_thread(staging.begin_push, manifest)
                if chunk.data:
                    await asyncio.to_thread(staging.write_chunk, manifest.expected_digest, chunk)
            if manifest is None:
                raise StagingError("no chunks were sent")
        except StagingError as exc:
            await context.abort(_staging_code(exc), f"node {self._node_id}: {exc}")
        except OSError as exc:
            await self._disk_failed(context, exc)
        return await self._run(
            context,
            manifest.operation_id,
            lambda op: self._ops.finish_push(op, manifest),
            manifest.fencing_token,
        )

    async def Activate(self, request, context) -> node_pb2.OperationReply:
        if not request.previous and not request.weights_digest:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {self._node_id}: give weights_digest (a staged model) or previous",
            )
        return await self._run(
            context,
            request.operation_id,
            lambda op: self._ops.activate(op, request.weights_digest, request.previous),
            request.fencing_token,
        )

    async def Restart(self, request, context) -> node_pb2.OperationReply:
        return await self._run(
            context,
            request.operation_id,
            lambda op: self._ops.restart(op, request.drain_timeout_s),
            request.fencing_token,
        )

    async def _disk_failed(self, context, exc: OSError) -> None:
        log.error("node=%s staging failed on its disk: %s", self._node_id, type(exc).__name__)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"node {self._node_id}: staging failed on the node's "
            f"disk ({type(exc).__name__}, errno {exc.errno}); see the node log, then push again",
        )

    async def _reason(self, reason: str, context) -> str:
        if len(reason) > 200 or not reason.isprintable():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {self._node_id}: reason must be printable and at most 200 "
                "characters (never patient information)",
            )
        return reason
