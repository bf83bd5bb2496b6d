"""Staging and pushed weights: digest checks, path safety, and a push that resumes after
its stream broke. The push runs over a real grpc.aio server on loopback whose servicer
is the node's own NodeService over a real StagingArea and Operations (the agent around
them is a small stand-in: no model is loaded, none is needed to stage one)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from cluster.api import node_pb2, node_pb2_grpc
from cluster.digest import model_files, weights_digest
from coordinator.weights_push import manifest_for, push_weights
from node_agent.node_service import NodeService
from node_agent.node_state import NodeState
from node_agent.operations import Operations
from node_agent.staging import StagingArea, StagingError


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-v2", TinyModelSpec(seed=3))


def test_stage_from_a_path_checks_the_digest_and_is_idempotent(model, tmp_path):
    area = StagingArea(tmp_path / "models")
    digest = weights_digest(model)
    with pytest.raises(StagingError, match=f"hashes to {digest}"):
        area.stage_from_path(model, model_id="m", version="v2", expected_digest="sha256:" + "1" * 64)
    assert not any(i.state == node_pb2.STAGE_STATE_STAGED for i in area.list())
    assert not [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]
    info = area.stage_from_path(model, model_id="m", version="v2", expected_digest=digest)
    assert info.state == node_pb2.STAGE_STATE_STAGED and Path(info.path).name == digest[7:]
    assert sorted(p.name for p in model_files(Path(info.path))) == sorted(p.name for p in model_files(model))
    assert weights_digest(Path(info.path)) == digest
    again = area.stage_from_path(model, model_id="m", version="v2", expected_digest=digest)
    assert again.path == info.path
    assert area.prune({digest}) == [] and area.prune(set()) == [digest[7:]]


def test_a_staged_model_loads_with_mlx_lm(model, tmp_path):
    import mlx_lm

    info = StagingArea(tmp_path / "models").stage_from_path(model, model_id="m", version="", expected_digest="")
    loaded, tokenizer = mlx_lm.load(info.path)
    assert loaded is not None and tokenizer.eos_token_ids


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 300])
def test_a_manifest_with_an_unsafe_file_name_is_refused(tmp_path, name):
    area = StagingArea(tmp_path / "models")
    manifest = node_pb2.WeightsManifest(expected_digest="sha256:" + "2" * 64, files=[
        node_pb2.WeightsFile(name="config.json", size=10), node_pb2.WeightsFile(name=name, size=10)])
    with pytest.raises(StagingError, match="plain, unique names"):
        area.begin_push(manifest)
    assert not (tmp_path / "evil").exists()


class BreakingService(NodeService):
    """The node's service, except that the first push stream is cut (UNAVAILABLE) after
    `cut_after` data chunks: a dropped link in the middle of a model."""

    def __init__(self, agent, cut_after: int):
        super().__init__(agent)
        self.cut_after = cut_after
        self.bytes_received = 0

    async def PushWeights(self, request_iterator, context):
        count = self.cut_after

        async def counted():
            nonlocal count
            async for chunk in request_iterator:
                self.bytes_received += len(chunk.data)
                if chunk.data:
                    count -= 1
                    if count < 0 and self.cut_after:
                        self.cut_after = 0
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "link dropped (test)")
                yield chunk
        return await super().PushWeights(counted(), context)


async def _push(model: Path, state_dir: Path, *, cut_after: int, expected: str, chunk_bytes: int = 64 << 10):
    staging = StagingArea(state_dir / "models")
    agent = SimpleNamespace(node_id="push-node", staging=staging, stopping=False)
    agent.ops = Operations(agent, NodeState(), state_dir)
    service = BreakingService(agent, cut_after)
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            manifest = manifest_for(model, operation_id="push-1", model_id="m", version="v2", expected_digest=expected)
            reply = await push_weights(node_pb2_grpc.NodeStub(channel), manifest, model, chunk_bytes=chunk_bytes,
                                       progress=lambda done, total: seen.append((done, total)))
    finally:
        await server.stop(None)
    return reply, service, staging, seen


def test_a_broken_push_resumes_where_the_node_stopped_receiving(model, tmp_path, monkeypatch):
    monkeypatch.setattr("node_agent.node_service.build_status", lambda agent: node_pb2.NodeStatus())
    digest = weights_digest(model)
    total = sum(p.stat().st_size for p in model_files(model))
    reply, service, staging, seen = asyncio.run(_push(model, tmp_path, cut_after=5, expected=digest))
    assert reply.operation.state == node_pb2.OPERATION_STATE_DONE, reply.operation.message
    assert staging.get(digest).state == node_pb2.STAGE_STATE_STAGED
    assert weights_digest(staging.path_for(digest)) == digest
    assert total < service.bytes_received < 2 * total, "the second stream sent only what was missing"
    assert seen[-1] == (total, total) and any(done < total for done, _ in seen[1:])
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model_files(model)}
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in model_files(staging.path_for(digest))} == files


def test_pushed_weights_that_do_not_match_the_digest_are_deleted_never_staged(model, tmp_path, monkeypatch):
    monkeypatch.setattr("node_agent.node_service.build_status", lambda agent: node_pb2.NodeStatus())
    wrong = "sha256:" + "3" * 64
    reply, _service, staging, _ = asyncio.run(_push(model, tmp_path, cut_after=0, expected=wrong))
    assert reply.operation.state == node_pb2.OPERATION_STATE_FAILED
    assert "not the expected" in reply.operation.message and weights_digest(model) in reply.operation.message
    assert staging.get(wrong).state == node_pb2.STAGE_STATE_FAILED
    assert not staging.path_for(wrong).exists() and not list((tmp_path / "models").glob(".incoming-*"))


def test_a_chunk_at_the_wrong_offset_is_refused(model, tmp_path):
    area = StagingArea(tmp_path / "models")
    digest = weights_digest(model)
    area.begin_push(manifest_for(model, operation_id="p", model_id="m", version="", expected_digest=digest))
    with pytest.raises(StagingError, match="call BeginPush again"):
        area.write_chunk(digest, node_pb2.WeightsChunk(file="config.json", offset=5, data=b"{}"))
    with pytest.raises(StagingError, match="not in the manifest"):
        area.write_chunk(digest, node_pb2.WeightsChunk(file="other.bin", offset=0, data=b"x"))
