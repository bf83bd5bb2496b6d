"""Node operations on a real node agent process: cordon, drain, stage, activate, restart.

Each test starts its own node(s) with their own state directory; the state must survive
the agent being stopped and started again (the same NodeProcess keeps its directory).
"""

from __future__ import annotations

import grpc
import pytest

from cluster.api import common_pb2, inference_pb2, node_pb2, node_pb2_grpc
from cluster.digest import weights_digest
from node_agent.operations import RESTART_EXIT_CODE
from tests.fleet_helpers import collect, note, start_streams

DONE, RUNNING, FAILED = (
    node_pb2.OPERATION_STATE_DONE,
    node_pb2.OPERATION_STATE_RUNNING,
    node_pb2.OPERATION_STATE_FAILED,
)
pytestmark = pytest.mark.usefixtures("as_node_caller")


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    """Another generated Qwen2 model: same shape, other weights, so another digest."""
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2-v2", TinyModelSpec(seed=7)
    )


def ops(node) -> node_pb2_grpc.NodeStub:
    return node_pb2_grpc.NodeStub(node.channel)  # as the harness's operator


def wait_op(node, call, what: str, timeout_s: float = 60.0) -> node_pb2.OperationReply:
    """Re-issue an operation (same id: returns its record) until it is no longer running."""
    call()
    node.wait_until(lambda st: call().operation.state != RUNNING, timeout_s=timeout_s, what=what)
    return call()


def test_cordon_is_idempotent_refuses_new_work_and_survives_a_restart(start_node, tmp_path):
    node = start_node(node_id="cordon-node")
    stub = ops(node)
    first = stub.Cordon(
        node_pb2.CordonRequest(operation_id="op-c1", cordoned=True, reason="maintenance"), timeout=5
    )
    assert first.operation.state == DONE and first.status.cordoned
    again = stub.Cordon(node_pb2.CordonRequest(operation_id="op-c1", cordoned=True), timeout=5)
    assert again.operation.started_unix_s == first.operation.started_unix_s, (
        "an operation id runs once"
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Drain(node_pb2.DrainRequest(operation_id="op-c1"), timeout=5)
    assert (
        err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "was a cordon" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Cordon(node_pb2.CordonRequest(operation_id="bad id!", cordoned=True), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    s = collect(node.inference, note(1, 8))
    assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "cordoned (maintenance)" in s.error.details()

    node.restart(tmp_path / "logs")
    node.wait_serving()
    st = node.status()
    assert st.cordoned and st.lifecycle == common_pb2.LIFECYCLE_READY
    assert any(o.operation_id == "op-c1" for o in st.operations), (
        "operation records are kept on disk"
    )
    assert collect(node.inference, note(2, 8)).error.code() == grpc.StatusCode.UNAVAILABLE
    stub = ops(node)
    stub.Cordon(node_pb2.CordonRequest(operation_id="op-u1", cordoned=False), timeout=5)
    s = collect(node.inference, note(3, 8))
    assert s.error is None and s.final.finish_reason in (
        inference_pb2.FINISH_REASON_STOP,
        inference_pb2.FINISH_REASON_LENGTH,
    )


def test_drain_lets_requests_in_flight_finish_and_refuses_new_ones(start_node):
    node = start_node(node_id="drain-node")
    streams, threads = start_streams(node.inference, 3, 600, "drain")
    node.wait_until(lambda st: st.load.running == 3, timeout_s=30, what="3 running")
    reply = ops(node).Drain(
        node_pb2.DrainRequest(operation_id="op-d1", timeout_s=60, reason="patching"), timeout=5
    )
    assert reply.status.lifecycle == common_pb2.LIFECYCLE_DRAINING and reply.status.cordoned
    assert 0 < reply.status.drain_deadline_left_s <= 60
    refused = collect(node.inference, note(9, 8))
    assert refused.error.code() == grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(120)
    assert [s.error for s in streams] == [None] * 3
    assert all(
        s.final.finish_reason
        in (inference_pb2.FINISH_REASON_LENGTH, inference_pb2.FINISH_REASON_STOP)
        for s in streams
    )
    done = wait_op(
        node,
        lambda: ops(node).Drain(node_pb2.DrainRequest(operation_id="op-d1"), timeout=5),
        "drained",
    )
    assert (
        done.operation.state == DONE
        and "every request in flight finished" in done.operation.message
    )
    assert done.status.lifecycle == common_pb2.LIFECYCLE_DRAINED


def test_drain_past_its_deadline_ends_the_rest_with_cancelled(start_node):
    node = start_node(node_id="deadline-node")
    streams, threads = start_streams(node.inference, 2, 1800, "deadline")
    node.wait_until(lambda st: st.load.running == 2, timeout_s=30, what="2 running")
    ops(node).Drain(node_pb2.DrainRequest(operation_id="op-d2", timeout_s=0.3), timeout=5)
    for t in threads:
        t.join(60)
    for s in streams:
        assert s.error is None, "the node ends the stream with a final chunk, not an RPC error"
        assert s.final.finish_reason == inference_pb2.FINISH_REASON_CANCELLED
        assert "drain deadline of 0.3s passed" in s.final.message and len(s.ids) < 1800
    done = wait_op(
        node,
        lambda: ops(node).Drain(node_pb2.DrainRequest(operation_id="op-d2"), timeout=5),
        "drained",
    )
    assert "2 requests were ended" in done.operation.message
    st = node.status()
    assert st.lifecycle == common_pb2.LIFECYCLE_DRAINED and st.load.requests_cancelled_total == 2


def test_stage_activate_rollback_and_the_active_model_survives_a_restart(
    start_node, new_model, tiny_model, tmp_path
):
    node = start_node(node_id="swap-node")
    stub = ops(node)
    old, new = weights_digest(tiny_model), weights_digest(new_model)

    def stage0():
        return stub.StageModel(
            node_pb2.StageModelRequest(  # noqa: E731
                operation_id="op-s0",
                source_path=str(new_model),
                expected_digest="sha256:" + "0" * 64,
            ),
            timeout=5,
        )

    bad = wait_op(node, stage0, "s0")
    assert bad.operation.state == FAILED and new[:19] in bad.operation.message
    assert not any(m.state == node_pb2.STAGE_STATE_STAGED for m in bad.status.staged), (
        "a mismatch never stages"
    )

    def stage():
        return stub.StageModel(
            node_pb2.StageModelRequest(  # noqa: E731
                operation_id="op-s1", source_path=str(new_model), version="v2", expected_digest=new
            ),
            timeout=5,
        )

    staged = wait_op(node, stage, "staged")
    assert staged.operation.state == DONE
    assert (
        staged.status.model.weights_digest == old
        and staged.status.lifecycle == common_pb2.LIFECYCLE_READY
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Activate(node_pb2.ActivateRequest(operation_id="op-a0", weights_digest=new), timeout=5)
    assert (
        err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "drain it first" in err.value.details()
    )
    wait_op(
        node, lambda: stub.Drain(node_pb2.DrainRequest(operation_id="op-d"), timeout=5), "drained"
    )
    act = wait_op(
        node,
        lambda: stub.Activate(
            node_pb2.ActivateRequest(operation_id="op-a1", weights_digest=new), timeout=5
        ),
        "activated",
        timeout_s=120,
    )
    assert act.operation.state == DONE, act.operation.message
    st = act.status
    assert st.model.weights_digest == new and st.model.version == "v2" and st.cordoned
    assert st.lifecycle == common_pb2.LIFECYCLE_READY and st.previous_model.weights_digest == old

    node.restart(tmp_path / "logs")
    node.wait_serving()
    st = node.status()
    assert st.model.weights_digest == new and st.cordoned, (
        "the activated model and the cordon persist"
    )

    stub = ops(node)
    wait_op(
        node, lambda: stub.Drain(node_pb2.DrainRequest(operation_id="op-d3"), timeout=5), "drained"
    )
    back = wait_op(
        node,
        lambda: stub.Activate(
            node_pb2.ActivateRequest(operation_id="op-a2", previous=True), timeout=5
        ),
        "rolled back",
        timeout_s=120,
    )
    assert back.operation.state == DONE and back.status.model.weights_digest == old


def test_restart_drains_then_exits_for_the_service_manager(start_node, tmp_path):
    node = start_node(node_id="restart-node")
    reply = ops(node).Restart(node_pb2.RestartRequest(operation_id="op-r1"), timeout=5)
    assert reply.operation.kind == "restart"
    assert node.wait_exit(30) == RESTART_EXIT_CODE
    node.restart(tmp_path / "logs")  # what launchd KeepAlive does
    node.wait_until(
        lambda st: st.lifecycle == common_pb2.LIFECYCLE_DRAINED, timeout_s=60, what="back, drained"
    )
    again = ops(node).Restart(node_pb2.RestartRequest(operation_id="op-r1"), timeout=5)
    assert again.operation.state == DONE, "a retried restart id does not restart again"
    assert node.proc.poll() is None


def test_a_corrupt_state_file_stops_the_agent_with_a_clear_error(tiny_model, tmp_path):
    import subprocess
    import sys

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "node-state.json").write_text("{not json")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.main",
            "--model",
            str(tiny_model),
            "--no-mdns",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert (
        "node-state.json is unreadable" in out.stderr and "forgets the node's cordon" in out.stderr
    )
