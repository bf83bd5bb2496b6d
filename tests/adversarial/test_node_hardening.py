"""A node agent under attack (issue 19, findings 1, 14 and 15): a push of weights by a
caller that may not push, a push past the staging quota or the disk, a plaintext
monitoring port off loopback, and an older revocation list put back."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import grpc
import pytest

from cluster.api import node_pb2, node_pb2_grpc
from cluster.digest import compute_digest, digest_files
from cluster.security import ca
from cluster.security.identity import Role
from coordinator.weights_push import manifest_for
from tests.procs import NodeProcess


def _manifest(model, op="op-push-1", **sizes):
    m = manifest_for(
        model,
        operation_id=op,
        model_id="tiny",
        version="v9",
        expected_digest=compute_digest(model, digest_files(model)),
    )
    for f in m.files:
        f.size = sizes.get(f.name, f.size)
    return m


def _push(channel, manifest, data=b"{}"):
    chunks = [
        node_pb2.WeightsChunk(manifest=manifest),
        node_pb2.WeightsChunk(file="config.json", offset=0, data=data),
    ]
    return node_pb2_grpc.NodeStub(channel).PushWeights(iter(chunks), timeout=10)


@pytest.fixture(scope="module")
def guarded_node(tiny_model, fleet_ca, tmp_path_factory):
    """A node with a 1 MB staging quota (the tiny model is about 3 MB) and a revoked
    coordinator certificate on the CRL it loads at start."""
    victim = ca.issue(fleet_ca, Role.COORDINATOR, "push-revoked")
    ca.revoke(fleet_ca, victim.identity.serial)
    node = NodeProcess(tiny_model, "--max-staged-gb", "0.001", node_id="push-node")
    with node:
        node.start(tmp_path_factory.mktemp("push-logs"))
        node.wait_serving()
        yield node


@pytest.mark.parametrize(
    "name,role,code",
    [
        ("app", Role.APP, grpc.StatusCode.PERMISSION_DENIED),
        ("push-monitor", Role.MONITOR, grpc.StatusCode.PERMISSION_DENIED),
        ("push-other-node", Role.NODE, grpc.StatusCode.PERMISSION_DENIED),
        ("push-revoked", Role.COORDINATOR, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_a_push_by_a_caller_that_may_not_push_writes_nothing(
    guarded_node, tiny_model, name, role, code
):
    models = guarded_node.state_dir / "models"
    before = sorted(p.name for p in models.iterdir()) if models.exists() else []
    ops_before = [o.operation_id for o in guarded_node.status().operations]
    with guarded_node.dial(name, role) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _push(ch, _manifest(tiny_model, op=f"op-claim-{name}"))
    assert err.value.code() == code, err.value.details()
    after = sorted(p.name for p in models.iterdir()) if models.exists() else []
    assert after == before, "a refused push left files in the staging area"
    st = guarded_node.status()
    assert [o.operation_id for o in st.operations] == ops_before, (
        "a refused push touched the operation history"
    )
    assert not st.staged


def test_a_push_past_the_staging_quota_is_refused_before_any_byte(guarded_node, tiny_model):
    with guarded_node.dial() as ch:  # the operator may push; the quota still holds
        with pytest.raises(grpc.RpcError) as err:
            node_pb2_grpc.NodeStub(ch).BeginPush(_manifest(tiny_model), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "staging quota" in err.value.details() and "--max-staged-gb" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _push(ch, _manifest(tiny_model, op="op-push-2"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    models = guarded_node.state_dir / "models"
    assert not models.exists() or not any(models.glob(".incoming-*"))


def test_a_push_larger_than_the_free_disk_is_refused(start_node, tiny_model):
    node = start_node("--max-staged-gb", "1e9", node_id="disk-node")
    free = shutil.disk_usage(tiny_model).free
    with node.dial() as ch:
        with pytest.raises(grpc.RpcError) as err:
            node_pb2_grpc.NodeStub(ch).BeginPush(
                _manifest(tiny_model, **{"config.json": free * 2}), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "free disk space" in err.value.details()
    assert not any((node.state_dir / "models").glob(".incoming-*"))


def test_a_plaintext_node_refuses_a_monitoring_port_off_loopback(tiny_model, monkeypatch):
    monkeypatch.delenv("STUDIOFLEET_TLS_DIR")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.main",
            "--model",
            str(tiny_model),
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            "--plaintext",
            "--http-listen",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--http-listen on loopback only" in out.stderr


def test_an_older_revocation_list_put_back_does_not_un_revoke(tmp_path):
    from cluster.security.tls import Revocations

    authority, host = tmp_path / "ca", tmp_path / "host"
    ca.init_ca(authority)
    host.mkdir()
    victim = ca.issue(authority, Role.APP, "victim").identity.serial
    old = (authority / "crl.pem").read_bytes()  # signed by the fleet CA, but before the revocation
    ca.revoke(authority, victim)
    (host / "old.pem").write_bytes(old)
    assert ca.crl_number(authority / "crl.pem") == ca.crl_number(host / "old.pem") + 1
    shutil.copy(authority / "crl.pem", host / "crl.pem")
    crl = Revocations(host / "crl.pem", authority / "ca.pem")
    assert crl.revoked(victim)
    (host / "crl.pem").write_bytes(old)  # the host's copy rolled back
    crl.refresh(force=True)
    assert crl.revoked(victim), "an older CRL replaced a newer one"
    ca.revoke(authority, ca.issue(authority, Role.APP, "second").identity.serial)
    shutil.copy(authority / "crl.pem", host / "crl.pem")  # a newer list is taken
    crl.refresh(force=True)
    assert crl.revoked(victim) and crl.generation == 2


def test_a_node_keeps_the_newest_revocation_list_it_has_seen(start_node, fleet_ca, tmp_path):
    node = start_node(node_id="crl-rollback-node")
    issued = ca.issue(fleet_ca, Role.COORDINATOR, "rollback-victim")
    old = (fleet_ca / "crl.pem").read_bytes()
    newest = ca.revoke(fleet_ca, issued.identity.serial) and (fleet_ca / "crl.pem").read_bytes()
    with node.dial("rollback-victim", Role.COORDINATOR) as ch:
        _refused_until(ch, lambda: True)
        (fleet_ca / "crl.pem").write_bytes(
            old
        )  # an attacker with write access restores the old list
        try:
            # Each call re-reads the list (at most once a second); every one stays refused.
            _refused_until(ch, lambda: "older than the list already loaded" in node.stderr())
        finally:
            (fleet_ca / "crl.pem").write_bytes(newest)


def _refused_until(ch, done, timeout_s: float = 10.0) -> None:
    """Call until a call is refused as revoked and done() holds; any call let through fails."""
    deadline = time.monotonic() + timeout_s
    refused = False
    while not (refused and done()):
        try:
            node_pb2_grpc.NodeStub(ch).GetStatus(node_pb2.GetStatusRequest(), timeout=5)
            assert not refused, "a revoked certificate was let in again"
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
            refused = True
        assert time.monotonic() < deadline, "not reached within 10 s"
        time.sleep(0.05)
