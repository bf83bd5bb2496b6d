"""Issue 19, findings 10 and 11, against real daemons (mTLS, separate processes).

10: two coordinators configured alike on one state database hold the rollout lease apart
    (unique holders), and a node refuses an operation carrying a fencing token older than
    the newest it accepted, also after it restarts.
11: the nodes keep the coordinator's newest signed audit HEAD; a chain cut back with an
    old HEAD put back verifies alone but not against a witness (`--witness`, `--min-seq`),
    and a coordinator restarted on it stops (exit 3) instead of carrying on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from cluster.api import common_pb2, fleet_pb2, fleet_pb2_grpc, node_pb2, node_pb2_grpc
from cluster.audit.chain import HEAD_NAME, list_files
from cluster.config import CoordinatorSettings
from cluster.fleetctl.app import app
from cluster.localfleet import HARNESS_NODE_CALLER
from cluster.security.identity import Role
from coordinator.rollout_store import LeaseLost, NodeRow, RolloutRow, RolloutStore
from coordinator.rollouts import lease_holder
from tests.fleet_helpers import EventWatch, collect, note

K = fleet_pb2


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2-fence", TinyModelSpec(seed=11)
    )


def fleetctl(*args: str):
    return CliRunner().invoke(app, [*args, "--tls-name", "operator"])


def as_coordinator(node) -> node_pb2_grpc.NodeStub:
    """The node, called with a coordinator certificate (what a stale coordinator would use)."""
    return node_pb2_grpc.NodeStub(node.dial(HARNESS_NODE_CALLER, Role.COORDINATOR))


def run_rollout(co, model: Path, rollout_id: str) -> fleet_pb2.Rollout:
    stub = fleet_pb2_grpc.FleetStub(co.channel)
    watch = EventWatch(co)
    try:
        stub.StartRollout(
            fleet_pb2.StartRolloutRequest(
                target=fleet_pb2.RolloutTarget(model_path=str(model), version=rollout_id),
                rollout_id=rollout_id,
            ),
            timeout=60,
        )
        watch.wait_until(
            lambda e: (
                e.kind == K.EVENT_KIND_ROLLOUT
                and e.rollout_id == rollout_id
                and e.step in ("succeeded", "failed")
            ),
            120,
            f"end of rollout {rollout_id}",
        )
    finally:
        watch.close()
    return stub.GetRollout(fleet_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=5)


# -- finding 10: the rollout lease and its fencing token ------------------------------------


def test_coordinators_configured_alike_get_distinct_lease_holders():
    settings = CoordinatorSettings()
    a, b = lease_holder(settings), lease_holder(settings)
    assert a != b and a.startswith("coordinator@") and b.startswith("coordinator@")


def test_a_holder_that_lost_the_lease_cannot_record_rollout_progress(tmp_path):
    a, b = RolloutStore(tmp_path / "co.db"), RolloutStore(tmp_path / "co.db")
    target = fleet_pb2.RolloutTarget(model_path="/m", weights_digest="sha256:" + "1" * 64)
    stale = a.acquire("co-a", ttl_s=0.2)
    a.create(
        RolloutRow(
            id="r1",
            state="RUNNING",
            target=target,
            max_unavailable=1,
            drain_timeout_s=30,
            owner="co-a",
            nodes=[NodeRow("n1")],
        )
    )
    time.sleep(0.3)  # the lease expires by wall-clock time: that is what is under test
    fresh = b.acquire("co-b", ttl_s=10)
    assert fresh.held and fresh.token == stale.token + 1
    with pytest.raises(LeaseLost):
        a.set_step("r1", NodeRow("n1", step="failed", message="stale"), fence=stale)
    with pytest.raises(LeaseLost):
        a.set_state("r1", "FAILED", "stale", fence=stale)
    b.set_step("r1", NodeRow("n1", step="done"), fence=fresh)
    row = b.get("r1")
    assert row.state == "RUNNING" and row.nodes[0].step == "done"


def test_two_coordinators_on_one_database_and_a_node_refusing_a_stale_fencing_token(
    start_node, start_coordinator, new_model, tiny_model, tmp_path
):
    node = start_node(node_id="fenced")
    db = tmp_path / "shared-state.db"
    # Same --coordinator-id (the old lease holder), one database, one node.
    a = start_coordinator(
        "--state-db", str(db), "--coordinator-id", "coordinator", nodes=[node.address], name="co-a"
    )
    b = start_coordinator(
        "--state-db", str(db), "--coordinator-id", "coordinator", nodes=[node.address], name="co-b"
    )
    a.wait_routable(1)
    b.wait_routable(1)

    first = run_rollout(a, new_model, "r-a")
    assert first.state == K.ROLLOUT_STATE_SUCCEEDED, first
    holder_a, _, token_a = RolloutStore(db).lease()
    assert first.owner == holder_a and holder_a.startswith("co-a@"), first.owner
    assert node.status().fencing_token == token_a >= 1

    second = run_rollout(b, tiny_model, "r-b")
    assert second.state == K.ROLLOUT_STATE_SUCCEEDED, second
    holder_b, _, token_b = RolloutStore(db).lease()
    assert holder_b.startswith("co-b@") and holder_b != holder_a, (
        "two coordinators, two lease holders"
    )
    assert token_b > token_a and node.status().fencing_token == token_b

    # A coordinator still acting under the older lease (it stalled past it) is refused by the node.
    for restarted in (False, True):
        if restarted:  # the newest token is kept across an agent restart
            node.restart(tmp_path / "logs")
            node.wait_serving()
            assert node.status().fencing_token == token_b
        with pytest.raises(grpc.RpcError) as err:
            as_coordinator(node).Cordon(
                node_pb2.CordonRequest(
                    operation_id="stale-cordon", cordoned=True, fencing_token=token_a
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"fencing token {token_a} is older than {token_b}" in err.value.details()
        st = node.status()
        assert not st.cordoned and not any(o.operation_id == "stale-cordon" for o in st.operations)

    # An operator's own command carries no token; an operator may not set one.
    op = node_pb2_grpc.NodeStub(node.channel)
    with pytest.raises(grpc.RpcError) as err:
        op.Cordon(
            node_pb2.CordonRequest(
                operation_id="op-fence", cordoned=True, fencing_token=token_b + 100
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert node.status().fencing_token == token_b
    assert (
        op.Cordon(
            node_pb2.CordonRequest(operation_id="op-c", cordoned=True), timeout=10
        ).operation.state
        == node_pb2.OPERATION_STATE_DONE
    )
    op.Cordon(node_pb2.CordonRequest(operation_id="op-u", cordoned=False), timeout=10)


# -- finding 11: witnesses of the audit chain -----------------------------------------------


def _head(directory: Path) -> dict:
    return json.loads((directory / HEAD_NAME).read_bytes())


def _cut_to(directory: Path, seq: int, head_bytes: bytes) -> None:
    """What an attacker does: drop every record after `seq` and put the old HEAD back."""
    for _, path in list_files(directory):
        keep = [
            line
            for line in path.read_bytes().splitlines(keepends=True)
            if json.loads(line)["seq"] <= seq
        ]
        if keep:
            path.write_bytes(b"".join(keep))
        else:
            path.unlink()
    (directory / HEAD_NAME).write_bytes(head_bytes)


def test_a_cut_tail_with_an_old_head_put_back_is_caught_by_the_nodes_witness(
    start_node, start_coordinator, tmp_path
):
    node = start_node(node_id="witness")
    co = start_coordinator("--poll-interval-s", "0.2", nodes=[node.address], name="co-w")
    co.wait_routable(1)
    for i in range(2):
        assert not collect(co.inference, note(i, 4)).error
    old_head = (co.audit_dir / HEAD_NAME).read_bytes()
    old_seq = json.loads(old_head)["seq"]
    for i in range(2, 6):
        assert not collect(co.inference, note(i, 4)).error
    newest = _head(co.audit_dir)["seq"]
    assert newest > old_seq
    st, _ = node.wait_until(
        lambda s: any(h.seq >= newest for h in s.audit_heads),
        timeout_s=10,
        what="the node keeping the coordinator's newest HEAD",
    )
    witnessed = max(h.seq for h in st.audit_heads)
    saved = tmp_path / "node-status.json"
    out = CliRunner().invoke(
        app, ["node", "status", "--target", node.address, "-o", "json", "--tls-name", "operator"]
    )
    assert out.exit_code == 0, out.output
    saved.write_text(out.output)
    co.stop()

    _cut_to(co.audit_dir, old_seq, old_head)
    alone = fleetctl("audit", "verify", str(co.audit_dir))
    assert alone.exit_code == 0, "the cut is invisible to the HEAD file alone (the finding)"

    for witness in (node.address, str(saved)):
        out = fleetctl("audit", "verify", str(co.audit_dir), "--witness", witness)
        assert out.exit_code == 1, out.output
        assert f"the chain ends at record {old_seq}" in out.output and "were cut" in out.output, (
            out.output
        )
    out = fleetctl("audit", "verify", str(co.audit_dir), "--min-seq", str(witnessed))
    assert out.exit_code == 1 and f"--min-seq is {witnessed}" in out.output, out.output

    # The coordinator restarted on the cut chain checks it against the node before showing
    # it any HEAD, raises the alarm and stops; the node keeps its evidence.
    co.restart(tmp_path / "logs")
    assert co.wait_exit(30) == 3
    assert "AUDIT CHAIN BEHIND A WITNESS" in co.stderr()
    assert max(h.seq for h in node.status().audit_heads) == witnessed

    # Only coordinators show a node a HEAD; an older or malformed one never replaces it.
    kept = [h for h in node.status().audit_heads if h.seq == witnessed][0]
    older = common_pb2.AuditHead(seq=1, hash="0" * 64, sig="0" * 128, key=kept.key)
    as_coordinator(node).GetStatus(node_pb2.GetStatusRequest(audit_head=older), timeout=5)
    assert list(node.status().audit_heads) == [kept]
    for caller, head in (
        (node_pb2_grpc.NodeStub(node.channel), older),
        (as_coordinator(node), common_pb2.AuditHead(seq=witnessed + 1, hash="x", key=kept.key)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            caller.GetStatus(node_pb2.GetStatusRequest(audit_head=head), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(node.status().audit_heads) == [kept]


def test_verify_names_an_unreadable_witness_and_exits_2(tmp_path):
    from tests.audit_helpers import fill

    directory = tmp_path / "audit"
    fill(directory, checkpoint_every=50)
    out = fleetctl("audit", "verify", str(directory), "--witness", str(tmp_path / "no-such-file"))
    assert out.exit_code == 2 and "no such file, and not a node's HOST:PORT" in out.output, (
        out.output
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = fleetctl("audit", "verify", str(directory), "--witness", str(bad))
    assert out.exit_code == 2 and "cannot be read as JSON" in out.output, out.output
    head = _head(directory)
    forged = tmp_path / "forged.json"
    forged.write_text(
        json.dumps(dict(head, seq=head["seq"] + 5))
    )  # a later seq its signature does not cover
    out = fleetctl("audit", "verify", str(directory), "--witness", str(forged))
    assert out.exit_code == 0 and "signature that does not verify; not used" in out.output, (
        out.output
    )
