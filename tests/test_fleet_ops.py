"""Drain and cordon through the coordinator and `fleetctl` (real processes, mTLS): requests
in flight finish, new ones go elsewhere, and no caller sees an error."""

from __future__ import annotations

import json
import re

import grpc
import pytest

from cluster.api import common_pb2, fleet_pb2, fleet_pb2_grpc
from tests.fleet_helpers import EventWatch, collect, note, start_streams
from tests.test_rollout import fleetctl


@pytest.fixture
def two_nodes(start_node, start_coordinator):
    nodes = [start_node(node_id=n, wait=False) for n in ("ops-a", "ops-b")]
    for n in nodes:
        n.wait_serving()
    co = start_coordinator(nodes=[n.address for n in nodes])
    co.wait_routable(2)
    return co, nodes


def test_drain_through_fleetctl_finishes_in_flight_requests_and_routes_new_ones_elsewhere(
    two_nodes,
):
    co, (a, b) = two_nodes
    first, threads = start_streams(co.inference, 6, 400, "before")
    a.wait_until(lambda st: st.load.running >= 1, timeout_s=30, what="work on ops-a")
    out = fleetctl(co, "drain", "ops-a", "--timeout", "120", "--reason", "patching")
    assert out.exit_code == 0, out.output
    assert (
        "node ops-a: DRAINED (cordoned)" in out.output
        and "every request in flight finished" in out.output
    )
    later, more = start_streams(co.inference, 4, 16, "during")
    for t in threads + more:
        t.join(120)
    assert [s.error for s in first + later] == [None] * 10
    assert all(s.final.failovers == 0 for s in first), "in-flight requests finished where they ran"
    assert any(list(s.final.nodes) == ["ops-a"] for s in first)
    assert all(list(s.final.nodes) == ["ops-b"] for s in later), (
        "a drained node gets no new request"
    )

    shown = fleetctl(co, "node", "show", "ops-a", "-o", "json")
    node = json.loads(shown.output)
    assert node["status"]["lifecycle"] == "LIFECYCLE_DRAINED" and node["status"]["cordoned"]
    assert any(o["kind"] == "drain" for o in node["status"]["operations"])
    assert fleetctl(co, "node", "show", "nope").exit_code == 6

    back = fleetctl(co, "uncordon", "ops-a")
    assert back.exit_code == 0 and "READY" in back.output
    co.wait_routable(2)


def test_drain_past_its_deadline_moves_the_rest_to_another_node_without_errors(two_nodes):
    co, (a, b) = two_nodes
    watch = EventWatch(co)
    first, threads = start_streams(co.inference, 6, 1800, "long")
    a.wait_until(lambda st: st.load.running >= 1, timeout_s=30, what="work on ops-a")
    out = fleetctl(co, "drain", "ops-a", "--timeout", "0.5")
    assert out.exit_code == 0, out.output
    assert re.search(r"\d+ requests? (was|were) ended with a CANCELLED final chunk", out.output), (
        out.output
    )
    for t in threads:
        t.join(120)
    assert [s.error for s in first] == [None] * 6
    moved = [s for s in first if s.final.failovers]
    assert moved and all(list(s.final.nodes) == ["ops-a", "ops-b"] for s in moved)
    watch.wait_for(fleet_pb2.EVENT_KIND_OPERATION, node_id="ops-a")
    watch.close()


def test_a_cordon_outlives_the_node_agent_and_the_coordinator_respects_it(two_nodes, tmp_path):
    co, (a, b) = two_nodes
    out = fleetctl(co, "cordon", "ops-a", "--reason", "disk check")
    assert out.exit_code == 0 and "cordoned" in out.output
    a.restart(
        tmp_path / "logs-again"
    )  # same address: the coordinator's static entry finds it again
    a.wait_serving()
    st = a.status()
    assert st.cordoned and st.lifecycle == common_pb2.LIFECYCLE_READY
    results = [collect(co.inference, note(i, 8)) for i in range(4)]
    assert all(s.error is None and list(s.final.nodes) == ["ops-b"] for s in results)
    listing = co.nodes()
    row = next(n for n in listing.nodes if n.status.node_id == "ops-a")
    assert not row.routable and row.status.cordoned


def test_only_operators_and_coordinators_run_operations(start_node, start_coordinator, fleet_ca):
    from cluster.api import node_pb2, node_pb2_grpc
    from cluster.security import ca
    from cluster.security.identity import Role

    node = start_node(node_id="perm-node")
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    ca.issue(fleet_ca, Role.NODE, "other-node")
    for name, role in (("app", Role.APP), ("other-node", Role.NODE)):
        with node.dial(name, role) as ch:
            for call in (
                lambda s: s.Cordon(node_pb2.CordonRequest(cordoned=True), timeout=5),
                lambda s: s.Drain(node_pb2.DrainRequest(), timeout=5),
                lambda s: s.Activate(node_pb2.ActivateRequest(previous=True), timeout=5),
                lambda s: s.Restart(node_pb2.RestartRequest(), timeout=5),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(node_pb2_grpc.NodeStub(ch))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        with co.dial(name, role) as ch:
            stub = fleet_pb2_grpc.FleetStub(ch)
            for call in (
                lambda s: s.CordonNode(fleet_pb2.CordonNodeRequest(node_id="perm-node"), timeout=5),
                lambda s: s.StartRollout(fleet_pb2.StartRolloutRequest(), timeout=5),
                lambda s: s.AbortRollout(fleet_pb2.RolloutControl(), timeout=5),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(stub)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    st = node.status()
    assert not st.cordoned and st.lifecycle == common_pb2.LIFECYCLE_READY and not st.operations


def test_bad_operation_requests_get_a_clear_status(two_nodes):
    co, (a, b) = two_nodes
    stub = fleet_pb2_grpc.FleetStub(co.channel)
    cases = [
        (
            lambda: stub.CordonNode(
                fleet_pb2.CordonNodeRequest(node_id="nope", cordoned=True), timeout=5
            ),
            grpc.StatusCode.NOT_FOUND,
            "no node 'nope'",
        ),
        (
            lambda: stub.DrainNode(
                fleet_pb2.DrainNodeRequest(node_id="ops-a", timeout_s=-1), timeout=5
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "timeout_s",
        ),
        (
            lambda: stub.CordonNode(
                fleet_pb2.CordonNodeRequest(node_id="ops-a", reason="x\n" * 3), timeout=5
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "printable",
        ),
        (
            lambda: stub.StartRollout(fleet_pb2.StartRolloutRequest(), timeout=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "model_path",
        ),
        (
            lambda: stub.StartRollout(
                fleet_pb2.StartRolloutRequest(
                    target=fleet_pb2.RolloutTarget(model_path="/no/such/model")
                ),
                timeout=5,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a directory",
        ),
        (
            lambda: stub.StartRollout(
                fleet_pb2.StartRolloutRequest(
                    target=fleet_pb2.RolloutTarget(restart=True), max_unavailable=2
                ),
                timeout=5,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "use at most 1",
        ),
        (
            lambda: stub.StartRollout(
                fleet_pb2.StartRolloutRequest(
                    target=fleet_pb2.RolloutTarget(restart=True), node_ids=["ops-a", "ghost"]
                ),
                timeout=5,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown or repeated node ids",
        ),
        (
            lambda: stub.GetRollout(fleet_pb2.GetRolloutRequest(rollout_id="r-none"), timeout=5),
            grpc.StatusCode.NOT_FOUND,
            "no rollout r-none",
        ),
        (
            lambda: stub.ResumeRollout(fleet_pb2.RolloutControl(), timeout=5),
            grpc.StatusCode.NOT_FOUND,
            "no rollout is running",
        ),
    ]
    for call, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and words in err.value.details(), (
            code,
            err.value.details(),
        )
    co.wait_routable(2)
    assert collect(co.inference, note(1, 8)).error is None, "the coordinator serves on"
