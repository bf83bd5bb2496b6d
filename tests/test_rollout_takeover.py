"""A rollout outlives the coordinator that started it (issue 24): two real coordinators
on one real PostgreSQL (tests/pg.py) over two real node agents (mTLS, separate processes).
A starts a rollout and is killed (SIGKILL) mid-rollout; B, already running, takes the
lease over once it lapses and finishes the rollout, paused through B and resumed through
A (whose runner is gone); A restarted cannot act on any node, and a node refuses a call
carrying A's old fencing token."""

from __future__ import annotations

import time

import grpc
import pytest

from cluster.api import common_pb2, fleet_pb2, fleet_pb2_grpc, node_pb2
from cluster.digest import weights_digest
from coordinator.rollout_store import TERMINAL_STEPS, RolloutStore
from tests.adversarial.test_lease_and_witness import as_coordinator
from tests.fleet_helpers import EventWatch, note
from tests.test_rollout import rollout, wait_rollout

K = fleet_pb2
LEASE_S = 3.0
RID = "r-takeover"


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2-takeover", TinyModelSpec(seed=13)
    )


def _until(what: str, predicate, timeout_s: float, show=lambda: ""):
    """Re-check predicate() until it returns something truthy; returns it."""
    deadline = time.monotonic() + timeout_s
    while not (got := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s; {show()}")
        time.sleep(0.05)
    return got


def test_a_standby_coordinator_takes_a_killed_coordinators_rollout_over_and_fencing_stops_the_old_one(
    start_node, start_coordinator, new_model, pg_url, tmp_path
):
    nodes = [start_node(node_id=n, wait=False) for n in ("tk-a", "tk-b")]
    for n in nodes:
        n.wait_serving()
    first, second = nodes
    old = first.status().model.weights_digest
    new = weights_digest(new_model)
    args = ("--state-url", pg_url, "--rollout-lease-s", str(LEASE_S))
    a = start_coordinator(*args, nodes=[n.address for n in nodes], name="tk-co-a")
    b = start_coordinator(*args, nodes=[n.address for n in nodes], name="tk-co-b")
    a.wait_routable(2)
    b.wait_routable(2)
    db = RolloutStore(pg_url)  # its own engine: what a third coordinator would read
    # A long request on tk-a (sent to the node directly) holds its drain open until the
    # test cancels it, so A dies while tk-a is mid-rollout and tk-b is still pending.
    hold = first.inference.Generate(note(0, 1800), timeout=120)
    next(hold)
    first.wait_until(lambda st: st.load.running == 1, timeout_s=30, what="a long request on tk-a")
    try:
        watch = EventWatch(a)
        fleet_pb2_grpc.FleetStub(a.channel).StartRollout(
            fleet_pb2.StartRolloutRequest(
                target=fleet_pb2.RolloutTarget(model_path=str(new_model), version="v2"),
                rollout_id=RID,
            ),
            timeout=60,
        )
        watch.wait_until(
            lambda e: (
                e.kind == K.EVENT_KIND_ROLLOUT
                and e.rollout_id == RID
                and e.node_id == "tk-a"
                and e.step == "drain"
            ),
            60,
            "tk-a's drain under A",
        )
        watch.close()
        # The node has begun the drain A asked for (A reports the step before its call):
        # a call cut by the kill before the node began would leave its record RUNNING.
        first.wait_until(
            lambda st: (
                st.lifecycle in (common_pb2.LIFECYCLE_DRAINING, common_pb2.LIFECYCLE_DRAINED)
            ),
            timeout_s=30,
            what="tk-a draining for A",
        )
        holder_a, _, token_a = db.lease()
        assert holder_a.startswith("tk-co-a@") and token_a >= 1
        assert first.status().fencing_token == token_a  # A staged tk-a under its token
        assert [n.step for n in db.get(RID).nodes] == ["drain", "pending"]

        a.proc.kill()  # kill -9: no release of the lease, no last word in the database
        a.proc.wait(10)
        killed_at = time.time()

        # B takes the lapsed lease over (the lease's term, then a third of it at most) ...
        holder_b, _, token_b = _until(
            "B holding the rollout lease",
            lambda: (got := db.lease()) and got[0].startswith("tk-co-b@") and got,
            timeout_s=3 * LEASE_S + 10,
        )
        assert token_b > token_a
        took_over_s = time.time() - killed_at
        assert took_over_s < 2 * LEASE_S + 5, f"B took {took_over_s:.1f}s to take the lease over"
        first.wait_until(
            lambda st: st.fencing_token == token_b, timeout_s=30, what="tk-a fenced by B's token"
        )
    finally:
        hold.cancel()  # tk-a's drain completes (if the note has not ended by itself)

    # B acts on tk-a under its token. Paused through B, it stops starting nodes but keeps
    # the lease; A restarted on the same database waits for that lease and does nothing.
    stub_b = fleet_pb2_grpc.FleetStub(b.channel)
    stub_b.PauseRollout(fleet_pb2.RolloutControl(rollout_id=RID), timeout=10)
    _until(
        "B's step under way to finish",
        lambda: {n.step for n in db.get(RID).nodes} <= {"pending", *TERMINAL_STEPS},
        timeout_s=90,
        show=lambda: (db.get(RID), [n.status() for n in nodes]),
    )
    paused = {n.node_id: [o.operation_id for o in n.status().operations] for n in nodes}
    a.restart(tmp_path / "logs")
    a.wait_serving()
    _until(
        "A's restarted instance to wait for the lease",
        lambda: "waiting: coordinator tk-co-b@" in a.stderr_path.read_text(),
        timeout_s=30,
    )
    assert db.get(RID).state == "PAUSED" and db.lease()[:3:2] == (holder_b, token_b), db.get(RID)
    for n in nodes:
        assert [o.operation_id for o in n.status().operations] == paused[n.node_id], n.node_id
    # Resumed through A, which does not run it: B's paused runner reads the resume from the
    # database (at the lease's pace) and goes on; A, the lease alive under B, starts nothing.
    resumed = fleet_pb2_grpc.FleetStub(a.channel).ResumeRollout(
        fleet_pb2.RolloutControl(rollout_id=RID), timeout=10
    )
    assert resumed.state == K.ROLLOUT_STATE_RUNNING and resumed.owner == holder_b, resumed

    r = wait_rollout(b, RID, timeout_s=90)
    assert r.state == K.ROLLOUT_STATE_SUCCEEDED, r
    assert r.owner == holder_b and [n.step for n in r.nodes] == ["done", "done"], r
    ended = db.get(RID)
    assert ended.state == "SUCCEEDED" and ended.owner == holder_b
    for n in nodes:
        st = n.status()
        assert st.model.weights_digest == new != old and not st.cordoned, n.node_id
        assert st.fencing_token == token_b, n.node_id
    # tk-b was never reached by A: every operation on it is B's, once each.
    ops_b = second.status().operations
    assert ops_b and all(o.started_unix_s > killed_at for o in ops_b), ops_b
    assert sorted(o.kind for o in ops_b) == sorted({o.kind for o in ops_b}), ops_b
    # tk-a's drain, under way when A died, was not started twice.
    assert sum(o.kind == "drain" for o in first.status().operations) == 1
    done_ops = {n.node_id: [o.operation_id for o in n.status().operations] for n in nodes}

    # A restarted gets the lease once B frees it (a new holder, a newer token) and finds
    # nothing to run: it leaves the rollout, its owner and every node as they were.
    holder_a2, _, token_a2 = _until(
        "A's restarted instance taking the freed lease",
        lambda: (got := db.lease()) and got[0].startswith("tk-co-a@") and got,
        timeout_s=3 * LEASE_S + 10,
    )
    assert holder_a2 != holder_a and token_a2 > token_b
    assert rollout(a, RID).owner == holder_b and db.get(RID).state == "SUCCEEDED"
    for n in nodes:
        st = n.status()
        assert st.fencing_token == token_b and not st.cordoned, n.node_id
        assert [o.operation_id for o in st.operations] == done_ops[n.node_id], n.node_id

    # A coordinator still acting under A's old lease is refused by the node directly.
    for n in nodes:
        with pytest.raises(grpc.RpcError) as err:
            as_coordinator(n).Cordon(
                node_pb2.CordonRequest(
                    operation_id="stale-cordon", cordoned=True, fencing_token=token_a
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"fencing token {token_a} is older than {token_b}" in err.value.details()
        st = n.status()
        assert not st.cordoned and not any(o.operation_id == "stale-cordon" for o in st.operations)
    db.close()
