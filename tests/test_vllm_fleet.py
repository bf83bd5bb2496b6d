"""A mixed fleet behind one coordinator: MLX and vLLM nodes, one contract.

vLLM node (conftest `vllm_node`) and MLX node `mlx-same` serve the same files (one
weights digest); `mlx-other` serves other weights. A request resumes only on a node
with the digest it started on, whatever its engine.
"""

from __future__ import annotations

import time

import grpc
import pytest

from cluster.api import fleet_pb2, fleet_pb2_grpc
from cluster.tinymodel import TinyModelSpec, make_tiny_model
from tests.fleet_helpers import collect, in_threads, note

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(vllm_node, start_node, start_coordinator, tmp_path):
    other = make_tiny_model(tmp_path / "other", TinyModelSpec(seed=7))
    same = start_node(node_id="mlx-same")
    different = start_node(node_id="mlx-other", model=other)
    co = start_coordinator(nodes=[vllm_node.address, same.address, different.address])
    co.wait_routable(3)
    return co, {"vllm": vllm_node, "same": same, "other": different}


def _cordon(co, node_id: str, cordoned: bool) -> None:
    fleet_pb2_grpc.FleetStub(co.channel).CordonNode(
        fleet_pb2.CordonNodeRequest(node_id=node_id, cordoned=cordoned, reason="test"), timeout=10
    )


def _stream_on(co, nodes, target: str, request, kill_after: int = 20):
    """Start `request` on node `target` (the others cordoned), make every node routable
    again, then SIGKILL `target` mid-stream; returns the caller's stream."""
    others = [n.node_id for k, n in nodes.items() if k != target]
    for node_id in others:
        _cordon(co, node_id, True)
    co.wait_routable(1)
    live = [None]
    results, threads = in_threads(
        lambda _: collect(co.inference, request, on_chunk=lambda s: live.__setitem__(0, s)), [0]
    )
    try:
        deadline = time.monotonic() + 60
        while live[0] is None or len(live[0].ids) < kill_after:
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.005)
    finally:
        for node_id in others:
            _cordon(co, node_id, False)
    co.wait_routable(3)
    nodes[target].proc.kill()
    threads[0].join(120)
    return results[0]


def test_the_coordinator_routes_across_mlx_and_vllm_nodes(fleet):
    co, nodes = fleet
    results, threads = in_threads(
        lambda i: collect(co.inference, note(i, 12, request_id=f"mix-{i}")), list(range(24))
    )
    for t in threads:
        t.join(120)
    assert all(r.error is None and r.final.usage.completion_tokens == len(r.ids) for r in results)
    engines = {r.final.model.engine for r in results}
    served = {r.final.node_id for r in results}
    assert engines == {"mlx", "vllm"}, f"both engines serve: {served}"
    assert nodes["vllm"].node_id in served


def test_a_stream_resumes_across_engines_on_the_same_weights(fleet, tiny_model):
    from transformers import AutoTokenizer

    co, nodes = fleet
    max_tokens = 1500
    s = _stream_on(co, nodes, "same", note(1, max_tokens, request_id="cross-engine"))
    assert s.error is None, s.error
    f = s.final
    assert list(f.nodes) == ["mlx-same", "vllm-node"] and f.failovers == 1
    assert f.model.engine == "vllm", (
        "finished on the vLLM node: the MLX node with other weights never resumes it"
    )
    assert f.usage.completion_tokens == max_tokens == len(s.ids)
    # Each token once: the spliced text is exactly the decoded token ids.
    assert s.text == AutoTokenizer.from_pretrained(tiny_model).decode(s.ids)


def test_a_stream_on_weights_no_other_node_serves_fails_with_aborted(fleet):
    co, nodes = fleet
    s = _stream_on(co, nodes, "other", note(2, 1500, request_id="orphaned"))
    assert s.error is not None and s.error.code() == grpc.StatusCode.ABORTED
    assert "no other READY node serves weights" in s.error.details()
    assert len(s.ids) >= 20


def test_a_rollout_can_take_one_engine_only(fleet):
    """Each engine loads its own weights: `--engine` picks that engine's nodes, and a node
    of the other engine named with it is refused before anything starts."""
    co, nodes = fleet
    stub = fleet_pb2_grpc.FleetStub(co.channel)
    target = fleet_pb2.RolloutTarget(restart=True)
    with pytest.raises(grpc.RpcError) as err:
        stub.StartRollout(
            fleet_pb2.StartRolloutRequest(target=target, engine="vllm", node_ids=["mlx-same"]),
            timeout=10,
        )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "known: vllm-node" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.StartRollout(
            fleet_pb2.StartRolloutRequest(target=target, engine="tensorrt"), timeout=10
        )
    assert (
        err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "no verified tensorrt nodes" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.StartRollout(fleet_pb2.StartRolloutRequest(target=target, engine="mlx\nx"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
