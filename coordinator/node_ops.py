"""Calling a node's operations from the coordinator and waiting for them to end.

Node operations are idempotent by operation id (node_agent/operations.py): asking again
with the same id returns that operation's record. Waiting is therefore "ask again until
the record is no longer running", which also survives a dropped connection or a node that
restarted in between (its records are saved on disk).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Optional

import grpc

from cluster.api import node_pb2

RUNNING = node_pb2.OPERATION_STATE_RUNNING
DONE = node_pb2.OPERATION_STATE_DONE
CALL_TIMEOUT_S = 10.0
POLL_S = 0.2  # a node's operation record is read this often while it runs
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class OpFailed(Exception):
    """The operation failed, was refused, or did not end in time; the message says which."""


async def wait_op(
    call: Callable[[], Awaitable[node_pb2.OperationReply]],
    *,
    what: str,
    timeout_s: float,
    on_status: Optional[Callable[[node_pb2.NodeStatus], None]] = None,
) -> node_pb2.OperationReply:
    """Issue the operation, then re-issue it (same id) until its record ends; returns the
    final reply (DONE), raises OpFailed otherwise. Transient RPC errors are retried."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reply = await call()
        except grpc.aio.AioRpcError as err:
            if err.code() not in RETRYABLE or time.monotonic() > deadline:
                raise OpFailed(f"{what}: {err.code().name}: {err.details()}") from None
        else:
            if on_status is not None:
                on_status(reply.status)
            if reply.operation.state != RUNNING:
                if reply.operation.state != DONE:
                    raise OpFailed(f"{what}: {reply.operation.message}")
                return reply
            if time.monotonic() > deadline:
                raise OpFailed(
                    f"{what}: still running after {timeout_s:g}s ({reply.operation.message or 'no detail'})"
                )
        await asyncio.sleep(POLL_S)  # pacing between reads of the node's record
