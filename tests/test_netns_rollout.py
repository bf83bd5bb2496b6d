"""A rolling update across "hosts" (network namespaces on a bridge, tests/netns.py): nodes
found over real multicast mDNS, the new weights pushed by the coordinator over the
network (no shared storage between the hosts' agents), under load from four callers.

Skipped with the reason where namespaces are unavailable; tests/test_rollout.py covers
the same logic on loopback.
"""

from __future__ import annotations

import pytest

from cluster.api import fleet_pb2, fleet_pb2_grpc
from cluster.digest import weights_digest
from tests.netns import NetnsLab, netns_unavailable
from tests.test_netns_fleet import Fleet
from tests.test_rollout import Load, wait_rollout

_why = netns_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"network namespaces unavailable: {_why}")


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2-v2", TinyModelSpec(seed=7)
    )


def test_a_rolling_update_across_hosts_pushes_weights_and_fails_no_request(
    tiny_model, new_model, tmp_path
):
    new = weights_digest(new_model)
    with NetnsLab() as lab:
        f = Fleet(lab, tiny_model, tmp_path / "logs")
        try:
            co = f.start_coordinator("coord")
            for name in ("host1", "host2", "host3"):
                f.start_node(name, "--max-running", "8", "--max-queued", "16")
            co.wait_routable(3)
            load = Load(co)
            load.wait_served(8)  # traffic is flowing before the rollout starts
            fleet_pb2_grpc.FleetStub(co.channel).StartRollout(
                fleet_pb2.StartRolloutRequest(
                    target=fleet_pb2.RolloutTarget(model_path=str(new_model), version="v2"),
                    rollout_id="r-hosts",
                ),
                timeout=60,
            )
            r = wait_rollout(co, "r-hosts")
            results = load.finish()
            assert r.state == fleet_pb2.ROLLOUT_STATE_SUCCEEDED, r
            failed = [(s.request.request_id, s.error.details()) for s in results if s.error]
            assert not failed, failed[:3]
            assert load.min_routable >= 2
            for node in f.nodes.values():
                st = node.status()
                assert st.model.weights_digest == new and not st.cordoned
                assert any(o.kind == "push" for o in st.operations), (
                    "weights arrived over the network"
                )
            print(
                f"rollout across 3 hosts: {len(results)} requests, 0 failed, least routable {load.min_routable}"
            )
        finally:
            f.close()
