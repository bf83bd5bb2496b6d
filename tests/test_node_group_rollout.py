"""A rolling update of a fleet of a 2-rank node group and a single node, through a real
coordinator under constant load (docs/node-groups.md, Rollouts): no request fails, the group
is updated as one node (compared by the model's own digest, staged on every rank before it
activates), and it can go back with `activate --previous`."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from cluster.api import common_pb2, node_pb2, node_pb2_grpc
from cluster.digest import layout_digest, weights_digest
from tests.group_helpers import make_group_model, start_group
from tests.procs import NodeProcess
from tests.test_rollout import K, Load, fleetctl, rollout

DRAINED = common_pb2.Lifecycle.Value("LIFECYCLE_DRAINED")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The group's model and a second one with other weights (the rollout's target)."""
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    base = tmp_path_factory.mktemp("models")
    old = make_group_model(base / "tiny-group")
    new = make_tiny_model(base / "tiny-group-v2", TinyModelSpec(num_key_value_heads=2, seed=7))
    return old, new


def _op(st: node_pb2.NodeStatus, op_id: str) -> node_pb2.Operation:
    return next(o for o in st.operations if o.operation_id == op_id)


@pytest.mark.allow_blocking("drives node and coordinator processes")
def test_rolling_update_of_a_group_and_a_node_under_load_fails_no_request(
    models, tmp_path, start_coordinator
):
    old_model, new_model = models
    old, new = weights_digest(old_model), weights_digest(new_model)
    with ExitStack() as stack:
        single = stack.enter_context(NodeProcess(old_model, node_id="single"))
        single.start(tmp_path / "logs")
        rank0, rank1 = start_group(stack, old_model, tmp_path / "logs", "tensor")
        single.wait_serving()
        co = start_coordinator(nodes=[rank0.address, single.address])
        co.wait_routable(2)
        assert rank0.status().model.weights_digest == layout_digest(old, "tensor", 2)

        # Weights pushed by a coordinator would reach rank 0 only: the rollout stops before
        # draining anything and says what to do instead.
        pushed = fleetctl(
            co,
            "rollout",
            "start",
            "--model",
            str(new_model),
            "--version",
            "v2",
            "--node",
            rank0.node_id,
            "--rollout-id",
            "r-push",
            "--wait",
        )
        assert pushed.exit_code != 0, pushed.output
        refused = rollout(co, "r-push").nodes[0]
        assert refused.step == "failed" and "--shared-path" in refused.message, refused.message
        assert not rank0.status().cordoned

        load = Load(co, callers=3)
        load.wait_served(4)  # traffic is flowing before the rollout starts
        out = fleetctl(
            co,
            "rollout",
            "start",
            "--model",
            str(new_model),
            "--version",
            "v2",
            "--shared-path",
            "--digest",
            new,
            "--rollout-id",
            "r-group",
            "--wait",
        )
        results = load.finish()
        assert out.exit_code == 0, out.output
        failed = [
            (s.request.request_id, s.error.code().name, s.error.details())
            for s in results
            if s.error
        ]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
        assert load.min_routable >= 1, "no node served at one point"
        print(f"group rolling update: {len(results)} requests, 0 failed")
        r = rollout(co, "r-group")
        assert r.state == K.ROLLOUT_STATE_SUCCEEDED, [(n.node_id, n.message) for n in r.nodes]
        assert {n.node_id: n.step for n in r.nodes} == {rank0.node_id: "done", "single": "done"}

        st = rank0.status()
        assert st.group.model_digest == new and not st.cordoned and st.model.version == "v2"
        assert st.model.weights_digest == layout_digest(new, "tensor", 2)
        assert rank1.status().group.model_digest == new  # the whole group switched
        assert single.status().model.weights_digest == new
        # Rank 0's stage ended only once every rank had staged.
        assert _op(st, f"r-group/{rank0.node_id}/stage").message.endswith(" on all 2 ranks")
        # The model it went back from is recorded by its own digest: --previous finds it.
        assert st.previous_model.weights_digest == old

        # Rolled out again, the group is found on the target by the model's own digest.
        again = fleetctl(
            co,
            "rollout",
            "start",
            "--model",
            str(new_model),
            "--version",
            "v2",
            "--shared-path",
            "--digest",
            new,
            "--rollout-id",
            "r-again",
            "--wait",
        )
        assert again.exit_code == 0, again.output
        assert all(n.message.startswith("already on") for n in rollout(co, "r-again").nodes)

        stub = node_pb2_grpc.NodeStub(rank0.channel)
        stub.Drain(node_pb2.DrainRequest(operation_id="back-drain"), timeout=5)
        rank0.wait_until(lambda s: s.lifecycle == DRAINED, 30, "drained")
        stub.Activate(node_pb2.ActivateRequest(operation_id="back", previous=True), timeout=5)
        st, _ = rank0.wait_until(
            lambda s: _op(s, "back").state != node_pb2.OPERATION_STATE_RUNNING, 60, "back"
        )
        assert _op(st, "back").state == node_pb2.OPERATION_STATE_DONE, _op(st, "back").message
        assert st.group.model_digest == old
        assert st.model.weights_digest == layout_digest(old, "tensor", 2)
