"""The staging area and the coordinator's weights push, without an engine.

A digest mismatch never stages anything, unsafe names are refused before a byte is
written, and a push cut mid-stream resumes from the node's offsets. Pushes go over a
real grpc.aio server on loopback (port 0) whose servicer is the node's own NodeService
over a real StagingArea and Operations, with no agent, engine or model behind them.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest

from cluster.api import node_pb2, node_pb2_grpc
from cluster.digest import model_files, weights_digest
from coordinator.weights_push import PushSourceError, manifest_for, push_weights
from node_agent.node_service import NodeService
from node_agent.node_state import NodeState
from node_agent.operations import Operations
from node_agent.staging import StagingArea, StagingError

pytestmark = pytest.mark.timeout(90)
WRONG = "sha256:" + "3" * 64
DONE, FAILED = node_pb2.OPERATION_STATE_DONE, node_pb2.OPERATION_STATE_FAILED


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("src") / "tiny-s1", TinyModelSpec(seed=1))


@pytest.fixture(scope="module")
def digest(model) -> str:
    return weights_digest(model)


def _total(model: Path) -> int:
    return sum(p.stat().st_size for p in model_files(model))


def _manifest(model: Path, expected: str) -> node_pb2.WeightsManifest:
    return manifest_for(
        model, operation_id="push-1", model_id="tiny", version="v1", expected_digest=expected
    )


class CuttingNodeService(NodeService):
    """The node's own NodeService (its BeginPush/PushWeights glue and Operations) over a
    real StagingArea, with no agent around it and no model loaded: staging needs none, and
    Operations gets no lifecycle, registry or model callbacks (a push uses none). Replies
    carry an empty status (there is no engine to report on). With `cut_after` > 0 the
    first PushWeights stream is aborted with UNAVAILABLE after that many data chunks: a
    link dropped in the middle of a model."""

    def __init__(self, staging: StagingArea, cut_after: int = 0):
        ops = Operations(
            node_id="push-node",
            state=NodeState(),
            state_dir=staging.root.parent / "node-state",
            lifecycle=None,
            registry=None,
            staging=staging,
            drain_timeout_s=0.0,
            configured_model=None,
            model_info=None,
            enter=None,
            load_and_warm=None,
            request_restart=None,
        )
        super().__init__(
            node_id="push-node",
            ops=ops,
            staging=staging,
            status=node_pb2.NodeStatus,
            stopping=lambda: False,
        )
        self.staging, self.cut_after = staging, cut_after
        self.bytes_received = 0
        self.streams: list[
            list[tuple[str, int]]
        ] = []  # (file, offset) of each chunk written, per stream

    async def PushWeights(self, request_iterator, context):
        self.streams.append([])

        async def counted():
            chunks = 0
            async for chunk in request_iterator:
                if chunk.data:
                    if self.cut_after and chunks == self.cut_after:
                        self.cut_after = 0
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "link dropped (test)")
                    chunks += 1
                    self.bytes_received += len(chunk.data)
                    self.streams[-1].append((chunk.file, chunk.offset))
                yield chunk

        return await super().PushWeights(counted(), context)


def _push(service: CuttingNodeService, model: Path, manifest: node_pb2.WeightsManifest, **kw):
    """Run push_weights against `service` on a loopback server; returns (reply, progress seen)."""
    seen: list[tuple[int, int]] = []

    async def run():
        server = grpc.aio.server()
        node_pb2_grpc.add_NodeServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await asyncio.wait_for(
                    push_weights(
                        node_pb2_grpc.NodeStub(channel),
                        manifest,
                        model,
                        progress=lambda d, t: seen.append((d, t)),
                        backoff_s=0.01,
                        **kw,
                    ),
                    timeout=60,
                )
        finally:
            await server.stop(None)

    return asyncio.run(run()), seen


# -- pushes ------------------------------------------------------------------------------
def test_a_push_stages_the_model_under_its_digest(model, digest, tmp_path):
    area = StagingArea(tmp_path / "models")
    reply, seen = _push(
        CuttingNodeService(area), model, _manifest(model, digest), chunk_bytes=32 << 10
    )
    assert reply.operation.state == DONE, reply.operation.message
    info = area.get(digest)
    assert info.state == node_pb2.STAGE_STATE_STAGED and info.path == str(area.path_for(digest))
    assert weights_digest(area.path_for(digest)) == digest
    assert {p.name: p.read_bytes() for p in model_files(area.path_for(digest))} == {
        p.name: p.read_bytes() for p in model_files(model)
    }
    assert seen[0] == (0, _total(model)) and seen[-1] == (_total(model), _total(model))
    assert not list((tmp_path / "models").glob(".incoming-*"))
    again, _ = _push(CuttingNodeService(area), model, _manifest(model, digest))
    assert again.operation.state == DONE, "pushing a staged model again is a no-op"


def test_a_cut_push_resumes_from_the_offsets_the_node_holds(model, digest, tmp_path):
    service = CuttingNodeService(StagingArea(tmp_path / "models"), cut_after=4)
    reply, seen = _push(service, model, _manifest(model, digest), chunk_bytes=16 << 10)
    assert reply.operation.state == DONE, reply.operation.message
    first, second = service.streams
    assert len(first) == 4 and second and not set(first) & set(second), (
        "the second stream resumed, not restarted"
    )
    total = _total(model)
    assert service.bytes_received == total, "each byte was written once"
    assert any(done < total for done, _ in seen[1:]) and seen[-1] == (total, total)
    assert weights_digest(service.staging.path_for(digest)) == digest


def test_a_wrong_digest_is_an_error_and_nothing_is_staged(model, tmp_path):
    area = StagingArea(tmp_path / "models")
    reply, _ = _push(CuttingNodeService(area), model, _manifest(model, WRONG), chunk_bytes=64 << 10)
    assert reply.operation.state == FAILED
    assert WRONG in reply.operation.message and weights_digest(model) in reply.operation.message
    assert area.get(WRONG).state == node_pb2.STAGE_STATE_FAILED
    assert [i.state for i in area.list()] == [node_pb2.STAGE_STATE_FAILED]
    assert not area.path_for(WRONG).exists() and not list((tmp_path / "models").iterdir())


def test_an_unsafe_manifest_is_refused_over_grpc_without_retrying(model, digest, tmp_path):
    manifest = _manifest(model, digest)
    manifest.files.add(name="../escape", size=3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _push(CuttingNodeService(StagingArea(tmp_path / "models")), model, manifest)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "plain, unique names" in err.value.details()
    )
    assert not (tmp_path / "escape").exists() and not (tmp_path / "models").exists()


def test_a_file_that_shrinks_during_a_push_raises_a_source_error_not_a_cancellation(
    model, digest, tmp_path
):
    src = tmp_path / "src"
    src.mkdir()
    for p in model_files(model):
        (src / p.name).write_bytes(p.read_bytes())
    manifest = _manifest(src, digest)
    big = max(model_files(src), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:100])
    with pytest.raises(PushSourceError, match="shorter than"):
        _push(CuttingNodeService(StagingArea(tmp_path / "models")), src, manifest)


# -- the staging area ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "/abs", ".hidden", "..", "", "x" * 300, "staged.json"]
)
def test_unsafe_file_names_are_refused_before_anything_is_written(tmp_path, name):
    area = StagingArea(tmp_path / "models")
    manifest = node_pb2.WeightsManifest(
        expected_digest=WRONG,
        files=[
            node_pb2.WeightsFile(name="config.json", size=10),
            node_pb2.WeightsFile(name=name, size=10),
        ],
    )
    with pytest.raises(StagingError, match="plain, unique names"):
        area.begin_push(manifest)
    assert not (tmp_path / "models").exists() and not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    "digest, files, match",
    [
        ("", [("config.json", 1)], "is not sha256"),
        ("sha256:" + "A" * 64, [("config.json", 1)], "is not sha256"),
        ("sha256:../../x", [("config.json", 1)], "is not sha256"),
        (WRONG, [("model.safetensors", 1)], "no config.json"),
        (WRONG, [("config.json", 1), ("config.json", 1)], "unique"),
        (WRONG, [("config.json", 600), ("model.safetensors", 600)], "1000-byte staging quota"),
    ],
)
def test_a_bad_manifest_is_refused(tmp_path, digest, files, match):
    area = StagingArea(tmp_path / "models", max_bytes=1000)
    with pytest.raises(StagingError, match=match):
        area.begin_push(
            node_pb2.WeightsManifest(
                expected_digest=digest,
                files=[node_pb2.WeightsFile(name=n, size=s) for n, s in files],
            )
        )


def test_chunks_must_continue_at_the_held_offset_and_fit_the_declared_size(tmp_path):
    area = StagingArea(tmp_path / "models")
    area.begin_push(
        node_pb2.WeightsManifest(
            expected_digest=WRONG, files=[node_pb2.WeightsFile(name="config.json", size=4)]
        )
    )
    with pytest.raises(StagingError, match="holds 0 bytes of it; call BeginPush again"):
        area.write_chunk(WRONG, node_pb2.WeightsChunk(file="config.json", offset=2, data=b"{}"))
    area.write_chunk(WRONG, node_pb2.WeightsChunk(file="config.json", offset=0, data=b"{}"))
    with pytest.raises(StagingError, match="holds 2 bytes"):
        area.write_chunk(WRONG, node_pb2.WeightsChunk(file="config.json", offset=0, data=b"{}"))
    with pytest.raises(StagingError, match="exceed its declared 4 bytes"):
        area.write_chunk(WRONG, node_pb2.WeightsChunk(file="config.json", offset=2, data=b"{}{}"))
    with pytest.raises(StagingError, match="not in the manifest"):
        area.write_chunk(WRONG, node_pb2.WeightsChunk(file="other.json", offset=0, data=b"x"))
    with pytest.raises(StagingError, match="has 2 of 4 bytes; call BeginPush"):
        area.finish_push(WRONG)
    with pytest.raises(StagingError, match="call BeginPush first"):
        area.write_chunk(
            "sha256:" + "4" * 64, node_pb2.WeightsChunk(file="config.json", offset=0, data=b"x")
        )


def test_concurrent_writers_at_one_offset_never_both_append(tmp_path):
    area = StagingArea(tmp_path / "models")
    area.begin_push(
        node_pb2.WeightsManifest(
            expected_digest=WRONG, files=[node_pb2.WeightsFile(name="config.json", size=1 << 20)]
        )
    )
    chunk = node_pb2.WeightsChunk(file="config.json", offset=0, data=b"x" * (1 << 19))
    errors: list[Exception] = []

    def write():
        try:
            area.write_chunk(WRONG, chunk)
        except StagingError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 3 and all("call BeginPush again" in str(e) for e in errors)
    assert (
        tmp_path / "models" / f".incoming-{WRONG[7:]}" / "config.json"
    ).stat().st_size == 1 << 19


def test_a_push_survives_an_agent_restart_and_resumes(model, digest, tmp_path):
    manifest = _manifest(model, digest)
    area = StagingArea(tmp_path / "models")
    assert all(f.size == 0 for f in area.begin_push(manifest).held)
    first = max(model_files(model), key=lambda p: p.stat().st_size)
    area.write_chunk(
        digest, node_pb2.WeightsChunk(file=first.name, offset=0, data=first.read_bytes()[:1000])
    )
    restarted = StagingArea(tmp_path / "models")  # a new agent process over the same state dir
    [paused] = restarted.list()
    assert (paused.state, paused.bytes_done, paused.bytes_total) == (
        node_pb2.STAGE_STATE_RECEIVING,
        1000,
        _total(model),
    )
    assert "BeginPush" in paused.message and paused.to_proto().weights_digest == digest
    held = {f.name: f.size for f in restarted.begin_push(manifest).held}
    assert held[first.name] == 1000 and sum(held.values()) == 1000
    other = manifest_for(
        model, operation_id="p2", model_id="tiny", version="v1", expected_digest=digest
    )
    del other.files[-1]  # the same digest announced with other files: the partial data is dropped
    assert sum(f.size for f in restarted.begin_push(other).held) == 0


def test_a_zero_byte_file_is_pushed(tmp_path, model):
    src = tmp_path / "src"
    src.mkdir()
    for p in model_files(model):
        (src / p.name).write_bytes(p.read_bytes())
    (src / "generation_config.json").write_bytes(
        b""
    )  # hashed: the digest fails if it is not created
    digest = weights_digest(src)
    area = StagingArea(tmp_path / "models")
    reply, _ = _push(CuttingNodeService(area), src, _manifest(src, digest))
    assert reply.operation.state == DONE, reply.operation.message
    assert (area.path_for(digest) / "generation_config.json").stat().st_size == 0


def test_stage_from_a_path_checks_the_digest_and_is_idempotent(model, digest, tmp_path):
    area = StagingArea(tmp_path / "models")
    with pytest.raises(StagingError, match=f"hashes to {digest}, not the expected {WRONG}"):
        area.stage_from_path(model, model_id="tiny", version="v1", expected_digest=WRONG)
    assert [i.state for i in area.list()] == [node_pb2.STAGE_STATE_FAILED]
    assert not [p for p in (tmp_path / "models").iterdir()], "the partial copy was deleted"
    seen: list[tuple[int, int]] = []
    info = area.stage_from_path(
        model,
        model_id="tiny",
        version="v1",
        expected_digest=digest,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert (info.state, info.digest, info.model_id, info.version) == (
        node_pb2.STAGE_STATE_STAGED,
        digest,
        "tiny",
        "v1",
    )
    assert seen[-1] == (_total(model), _total(model)) and Path(info.path) == area.path_for(digest)
    assert sorted(p.name for p in model_files(Path(info.path))) == sorted(
        p.name for p in model_files(model)
    )
    assert weights_digest(Path(info.path)) == digest
    mtime = (Path(info.path) / "config.json").stat().st_mtime_ns
    assert (
        area.stage_from_path(model, model_id="tiny", version="v1", expected_digest=digest) == info
    )
    assert area.stage_from_path(model, model_id="tiny", version="v1", expected_digest="") == info
    assert (Path(info.path) / "config.json").stat().st_mtime_ns == mtime, (
        "staged once, never copied over"
    )
    assert area.begin_push(_manifest(model, digest)).complete
    assert [(i.digest, i.state) for i in area.list()] == [
        (digest, node_pb2.STAGE_STATE_STAGED),
        (WRONG, node_pb2.STAGE_STATE_FAILED),
    ]


def test_a_missing_source_is_refused(tmp_path):
    area = StagingArea(tmp_path / "models")
    with pytest.raises(StagingError, match="is not a model directory"):
        area.stage_from_path(tmp_path / "nope", model_id="m", version="", expected_digest="")
    with pytest.raises(StagingError, match="is not sha256"):
        area.stage_from_path(tmp_path, model_id="m", version="", expected_digest="sha256:abc")


def test_prune_keeps_what_it_is_told_and_remove_forgets(model, digest, tmp_path):
    area = StagingArea(tmp_path / "models")
    area.stage_from_path(model, model_id="tiny", version="v1", expected_digest=digest)
    area.begin_push(_manifest(model, WRONG))
    assert area.prune({digest}) == [] and area.get(digest) is not None
    assert area.prune(set()) == [digest[7:]] and area.get(digest) is None
    assert area.get(WRONG).state == node_pb2.STAGE_STATE_RECEIVING, "prune leaves pushes under way"
    area.remove(WRONG)
    assert (
        area.get(WRONG) is None and area.list() == [] and not list((tmp_path / "models").iterdir())
    )


def test_a_staged_model_loads_with_mlx_lm(model, digest, tmp_path):
    import mlx_lm

    info = StagingArea(tmp_path / "models").stage_from_path(
        model, model_id="tiny", version="v1", expected_digest=digest
    )
    loaded, tokenizer = mlx_lm.load(info.path)
    assert loaded is not None and tokenizer.eos_token_ids


def test_a_chunk_that_could_not_be_sent_after_the_stream_ended_resumes_the_push():
    """gRPC's client reports a write after the node ended the stream as INTERNAL "Internal
    error from Core" (seen once in CI, racing the abort above): a broken stream, resumed.
    An INTERNAL the node itself sent is not retried."""
    from grpc.aio import AioRpcError, Metadata

    from coordinator.weights_push import _resumable

    def err(code, details):
        return AioRpcError(code, Metadata(), Metadata(), details=details)

    assert _resumable(err(grpc.StatusCode.INTERNAL, "Internal error from Core"))
    assert _resumable(err(grpc.StatusCode.UNAVAILABLE, "link dropped"))
    assert not _resumable(err(grpc.StatusCode.INTERNAL, "node push-node: staging failed"))
    assert not _resumable(err(grpc.StatusCode.INVALID_ARGUMENT, "bad manifest"))
