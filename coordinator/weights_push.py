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
ATTEMPTS = 5
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def manifest_for(model_dir: Path, *, operation_id: str, model_id: str, version: str,
                 expected_digest: str) -> node_pb2.WeightsManifest:
    return node_pb2.WeightsManifest(
        operation_id=operation_id, model_id=model_id, version=version, expected_digest=expected_digest,
        files=[node_pb2.WeightsFile(name=p.name, size=p.stat().st_size) for p in model_files(model_dir)])


async def push_weights(stub: node_pb2_grpc.NodeStub, manifest: node_pb2.WeightsManifest, model_dir: Path, *,
                       chunk_bytes: int = CHUNK_BYTES, progress: Optional[Callable[[int, int], None]] = None,
                       attempts: int = ATTEMPTS) -> node_pb2.OperationReply:
    """Push until the node answers with the operation's record; raises the last RPC error."""
    total = sum(f.size for f in manifest.files)
    for attempt in range(1, attempts + 1):
        try:
            offsets = await stub.BeginPush(manifest, timeout=30)
            held = {f.name: f.size for f in offsets.held}
            if progress:
                progress(total if offsets.complete else sum(held.values()), total)
            send = _chunks(manifest, model_dir, {} if offsets.complete else held, chunk_bytes, progress, total,
                           skip=offsets.complete)
            return await stub.PushWeights(send)
        except grpc.aio.AioRpcError as err:
            if err.code() not in RESUMABLE or attempt == attempts:
                raise
            log.warning("push of %s broke (%s); resuming from what the node holds (attempt %d/%d)",
                        manifest.expected_digest[:19], err.code().name, attempt + 1, attempts)
            await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))  # reconnect backoff
    raise AssertionError("unreachable")


async def _chunks(manifest, model_dir: Path, held: dict, chunk_bytes: int, progress, total: int,
                  skip: bool) -> AsyncIterator[node_pb2.WeightsChunk]:
    yield node_pb2.WeightsChunk(manifest=manifest)
    if skip:
        return
    done = sum(held.values())
    for f in manifest.files:
        offset = held.get(f.name, 0)
        with open(model_dir / f.name, "rb") as src:
            src.seek(offset)
            while offset < f.size:
                data = await asyncio.to_thread(src.read, min(chunk_bytes, f.size - offset))
                if not data:
                    raise OSError(f"{model_dir / f.name} is shorter than its {f.size} bytes; did it change?")
                yield node_pb2.WeightsChunk(file=f.name, offset=offset, data=data)
                offset += len(data)
                done += len(data)
                if progress:
                    progress(done, total)
