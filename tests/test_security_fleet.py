"""Security through a real coordinator: roles, per-caller quotas, and a stranger on mDNS."""

from __future__ import annotations

import grpc
import pytest

from cluster.api import fleet_pb2, fleet_pb2_grpc, inference_pb2, inference_pb2_grpc
from cluster.security import ca
from cluster.security.identity import Role
from tests.fleet_helpers import EventWatch, collect, note
from tests.procs import NodeProcess

K = fleet_pb2


def test_roles_on_the_coordinator(start_node, start_coordinator, fleet_ca):
    node = start_node(node_id="roles-node")
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    ca.issue(fleet_ca, Role.NODE, "some-node")
    ca.issue(fleet_ca, Role.COORDINATOR, "other-coordinator")
    for name, role in (
        ("operator", Role.OPERATOR),
        ("some-node", Role.NODE),
        ("other-coordinator", Role.COORDINATOR),
    ):
        with co.dial(name, role) as ch:
            s = collect(inference_pb2_grpc.InferenceStub(ch), note(0, 2))
        assert s.error is not None and s.error.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert f"{role.value}/{name}" in s.error.details() and "allowed: app" in s.error.details()
    for name, role in (("app", Role.APP), ("some-node", Role.NODE)):
        with co.dial(name, role) as ch:
            with pytest.raises(grpc.RpcError) as err:
                fleet_pb2_grpc.FleetStub(ch).ListNodes(fleet_pb2.ListNodesRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert collect(co.inference, note(1, 2)).final is not None  # the app may generate
    assert co.nodes().nodes[0].routable  # the operator may list


def test_per_caller_quota(start_node, start_coordinator, fleet_ca):
    node = start_node("--max-running", "8", node_id="quota-node")
    co = start_coordinator("--max-concurrent-per-caller", "2", nodes=[node.address])
    co.wait_routable(1)
    streams = [co.inference.Generate(note(i, 1500, temperature=0.7), timeout=60) for i in range(2)]
    for s in streams:
        next(s)  # both are running for app/app
    third = collect(co.inference, note(3, 2))
    assert third.error is not None and third.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "app/app already has 2 requests in flight" in third.error.details()
    assert dict(third.error.trailing_metadata()).get("grpc-retry-pushback-ms") == "500"
    ca.issue(fleet_ca, Role.APP, "second-app")
    with co.dial("second-app", Role.APP) as ch:  # another caller is not held back by the first
        assert collect(inference_pb2_grpc.InferenceStub(ch), note(4, 2)).final is not None
    for s in streams:
        s.cancel()
    assert collect(co.inference, note(5, 2)).final is not None  # the quota frees with the streams


def test_a_stranger_announcing_the_service_gets_no_traffic(
    start_node, start_coordinator, fleet_name, tiny_model, tmp_path
):
    """A node agent with a certificate from another CA announces itself in our fleet over
    mDNS. The coordinator rejects it at the TLS handshake and routes nothing to it."""
    foreign = tmp_path / "foreign-ca"
    ca.init_ca(foreign)
    co = start_coordinator(fleet=fleet_name)
    start_node(node_id="good-node", fleet=fleet_name)
    watch = EventWatch(co)
    rogue = NodeProcess(tiny_model, node_id="rogue-node", fleet=fleet_name, tls_dir=foreign)
    with rogue:
        rogue.start(tmp_path / "logs")
        rogue.wait_serving()
        ev = watch.wait_for(K.EVENT_KIND_REJECTED, address=rogue.address, timeout_s=30)
        assert "TLS" in ev.reason and "CA" in ev.reason
        co.wait_routable(1)
        results = [collect(co.inference, note(i, 3)) for i in range(12)]
        assert all(r.final is not None and r.final.node_id == "good-node" for r in results)
        listing = {n.address: n for n in co.nodes().nodes}
        assert (
            listing[rogue.address].health == K.NODE_HEALTH_REJECTED
            and not listing[rogue.address].routable
        )
        assert rogue.status().load.requests_accepted_total == 0  # read with its own CA's operator
    watch.close()


def test_coordinator_certificate_rotation_keeps_serving(start_node, start_coordinator, fleet_ca):
    """Re-issue the coordinator's certificate mid-stream: its server serves the new one on
    the next handshake, its node links move to new channels (the old stream ends on the
    old one), and requests keep flowing with no restart."""
    from tests.test_security import _served_serial

    node = start_node(node_id="rot-node")
    co = start_coordinator(nodes=[node.address], name="rot-co")
    co.wait_routable(1)
    stream = co.inference.Generate(note(0, 300, temperature=0.7), timeout=60)
    first = next(stream)
    new = ca.issue(fleet_ca, Role.COORDINATOR, "rot-co").identity.serial
    name = "rot-co.coordinator.studiofleet"
    import time

    deadline = time.monotonic() + 10
    while _served_serial(co.address, fleet_ca, name) != new:
        assert time.monotonic() < deadline, (
            "the coordinator did not serve its new certificate within 10 s"
        )
    chunks = [first, *stream]
    final = chunks[
        -1
    ].final  # the stream ended cleanly with every token (a random seed may sample EOS early)
    assert final.finish_reason in (
        inference_pb2.FINISH_REASON_STOP,
        inference_pb2.FINISH_REASON_LENGTH,
    ), final
    assert final.usage.completion_tokens == sum(len(c.token_ids) for c in chunks) > 0
    watch = EventWatch(co)
    after = time.time()
    # Two probe rounds later the node link runs on the new credentials; traffic still flows.
    for i in range(1, 6):
        assert collect(co.inference, note(i, 3)).final is not None
    assert not [
        e
        for e in watch.events
        if e.kind in (K.EVENT_KIND_EJECTED, K.EVENT_KIND_REJECTED) and e.time_unix_s >= after
    ]
    assert "certificate reload" not in co.stderr() and "reloaded TLS certificate" in co.stderr()
    watch.close()


def test_a_revoked_node_certificate_is_rejected(start_node, start_coordinator, fleet_ca):
    """gRPC does not check revocation in the handshake; the coordinator reads the
    certificate each node serves and checks it against crl.pem when either changes."""
    a, b = start_node(node_id="keep-node"), start_node(node_id="revoked-node")
    co = start_coordinator(nodes=[a.address, b.address])
    co.wait_routable(2)
    watch = EventWatch(co)
    serial = ca.read_certificate(fleet_ca / "revoked-node.pem").serial_number
    ca.revoke(fleet_ca, serial)
    ev = watch.wait_for(K.EVENT_KIND_REJECTED, node_id="revoked-node", timeout_s=15)
    assert "revoked" in ev.reason
    results = [collect(co.inference, note(i, 3)) for i in range(6)]
    assert all(r.final is not None and r.final.node_id == "keep-node" for r in results)
    watch.close()
