"""A node group across two network-namespace "hosts" with real multicast mDNS: a coordinator
on a third host discovers the group as one node (rank 0 announces, rank 1 does not) and
routes to it (docs/node-groups.md, tests/netns.py)."""

from __future__ import annotations

import time

import pytest

from cluster.api import inference_pb2
from cluster.localfleet import CoordinatorProcess
from tests.fleet_helpers import collect, note
from tests.group_helpers import make_group_model
from tests.netns import NetnsLab, netns_unavailable
from tests.procs import NodeProcess

_why = netns_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"network namespaces unavailable: {_why}")

GROUP_PORT = 7790


@pytest.fixture(scope="module")
def group_model(tmp_path_factory):
    return make_group_model(tmp_path_factory.mktemp("models") / "tiny-group")


@pytest.mark.slow
@pytest.mark.allow_blocking("drives node processes")
def test_a_group_across_hosts_is_discovered_as_one_node(group_model, tmp_path):
    logs = tmp_path / "logs"
    fleet = f"grp{int(time.time() * 1000) % 10**8}"
    with NetnsLab() as lab:
        hosts = [lab.add_host(f"rank{r}") for r in range(2)]
        coord_host = lab.add_host("coord")
        group = ",".join(f"{h.ip}:{GROUP_PORT}" for h in hosts)
        procs = []
        try:
            for r, h in enumerate(hosts):
                proc = NodeProcess(
                    group_model,
                    "--group",
                    group,
                    "--rank",
                    str(r),
                    node_id=f"netns-rank-{r}",
                    fleet=fleet,
                    listen=f"{h.ip}:7700",
                    wrapper=h.exec_argv([]),
                )
                procs.append(proc)
                proc.start(logs)
            co = CoordinatorProcess(
                fleet=fleet,
                name="coord",
                listen=f"{coord_host.ip}:7800",
                mdns_interface=coord_host.ip,
                wrapper=coord_host.exec_argv([]),
            )
            procs.append(co)
            co.start(logs)
            co.wait_serving()
            procs[0].wait_serving(timeout_s=90)
            co.wait_routable(1, timeout_s=60)
            s = collect(co.inference, note(0, 8, request_id="across-hosts"), 60)
            assert s.final is not None and s.final.finish_reason != (
                inference_pb2.FINISH_REASON_ERROR
            )
            assert s.final.node_id == "netns-rank-0"
            listing = co.nodes()
            assert [n.status.node_id for n in listing.nodes] == ["netns-rank-0"]
            ranks = listing.nodes[0].status.group.ranks
            assert [(r.address, r.health) for r in ranks] == [
                (f"{h.ip}:{GROUP_PORT}", "ok") for h in hosts
            ]
        finally:
            for proc in reversed(procs):
                proc.stop()
