"""Streaming a model's files to a node that has no shared storage (a Mac rack rarely has).

BeginPush tells what the node already holds; PushWeights sends the rest in order, in
chunks. A broken stream is resumed from what the node reports holding, so a dropped
link or a restarted agent costs the bytes in flight, not the whole model. The node
checks the digest before it counts the model as staged.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

import grpc

from cluster.api import node_pb2, node_pb2_grpc
from cluster.digest import model_files

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 3 << 20  # under gRPC's default 4 MiB limit on a received message
ATTEMPTS = 5
BEGIN_TIMEOUT_S = 30.0
RESUMABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


def _resumable(err: grpc.aio.AioRpcError) -> bool:
    """A broken stream, not a refusal. gRPC's own client core reports a chunk it could not
    send because the stream had already ended (the node aborted it, or the link dropped
    between two writes) as INTERNAL "Internal error from Core": that is a broken stream too
    (seen in CI when a node cut a push), and resuming is safe: BeginPush says what arrived."""
    if err.code() in RESUMABLE:
        return True
    return (
        err.code() == grpc.StatusCode.INTERNAL
        and (err.details() or "") == "Internal error from Core"
    )


class PushSourceError(OSError):
    """A model file changed or vanished on the coordinator while it was being pushed."""


def manifest_for(
    model_dir: Path,
    *,
    operation_id: str,
    model_id: str,
    version: str,
    expected_digest: str,
    fencing_token: int = 0,
) -> node_pb2.WeightsManifest:
    """Every file the node needs to load the model (cluster.digest.model_files), with sizes."""
    return node_pb2.WeightsManifest(
        operation_id=operation_id,
        model_id=model_id,
        version=version,
        expected_digest=expected_digest,
        fencing_token=fencing_token,
        files=[
            node_pb2.WeightsFile(name=p.name, size=p.stat().st_size) for p in model_files(model_dir)
        ],
    )


async def push_weights(
    stub: node_pb2_grpc.NodeStub,
    manifest: node_pb2.WeightsManifest,
    model_dir: Path,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Optional[Callable[[int, int], None]] = None,
    attempts: int = ATTEMPTS,
    timeout_s: Optional[float] = None,
    backoff_s: float = 0.2,
) -> node_pb2.OperationReply:
    """Push until the node answers with the operation's record (DONE or FAILED).

    A stream that breaks (UNAVAILABLE, DEADLINE_EXCEEDED past `timeout_s` per stream,
    CANCELLED by the node) is resumed up to `attempts` times; then the last AioRpcError is
    raised, as is any other RPC error at once. A file that changes while it is read raises
    PushSourceError."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be 1..{MAX_CHUNK_BYTES}, not {chunk_bytes}")
    total = sum(f.size for f in manifest.files)
    for attempt in range(1, attempts + 1):
        source_error: list[BaseException] = []
        try:
            offsets = await stub.BeginPush(manifest, timeout=BEGIN_TIMEOUT_S)
            held = {} if offsets.complete else {f.name: f.size for f in offsets.held}
            if progress:
                progress(total if offsets.complete else sum(held.values()), total)
            send = _chunks(
                manifest,
                model_dir,
                held,
                chunk_bytes,
                progress,
                total,
                offsets.complete,
                source_error,
            )
            return await stub.PushWeights(send, timeout=timeout_s)
        except asyncio.CancelledError:
            if source_error:  # grpc cancels the call when the request iterator raises
                raise source_error[0] from None
            raise
        except grpc.aio.AioRpcError as err:
            if not _resumable(err) or attempt == attempts:
                raise
            log.warning(
                "push of %s broke (%s); resuming from what the node holds (attempt %d/%d)",
                manifest.expected_digest[:19],
                err.code().name,
                attempt + 1,
                attempts,
            )
            await asyncio.sleep(min(backoff_s * 2**attempt, 5.0))  # reconnect backoff
    raise AssertionError("unreachable")


async def _chunks(
    manifest: node_pb2.WeightsManifest,
    model_dir: Path,
    held: dict[str, int],
    chunk_bytes: int,
    progress,
    total: int,
    skip: bool,
    failed: list,
) -> AsyncIterator[node_pb2.WeightsChunk]:
    """The manifest, then each file from the node's offset on; files are read off the loop."""
    yield node_pb2.WeightsChunk(manifest=manifest)
    done = sum(held.values())
    for f in [] if skip else manifest.files:
        offset = held.get(f.name, 0)
        try:
            src = await asyncio.to_thread(open, model_dir / f.name, "rb")
        except OSError as exc:
            failed.append(PushSourceError(f"cannot read {model_dir / f.name} to push it: {exc}"))
            raise
        try:
            await asyncio.to_thread(src.seek, offset)
            while offset < f.size:
                data = await asyncio.to_thread(src.read, min(chunk_bytes, f.size - offset))
                if not data:
                    failed.append(
                        PushSourceError(
                            f"{model_dir / f.name} is shorter than its {f.size} bytes; "
                            "it changed after the manifest was made: start the push again"
                        )
                    )
                    raise failed[-1]
                yield node_pb2.WeightsChunk(file=f.name, offset=offset, data=data)
                offset += len(data)
                done += len(data)
                if progress:
                    progress(done, total)
        finally:
            src.close()
