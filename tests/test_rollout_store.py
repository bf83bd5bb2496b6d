"""The rollout database on a real SQLite file: records survive a reopen, and the lease
keeps two coordinators (two connections, as two processes would have) apart."""

from __future__ import annotations

import time

from cluster.api import fleet_pb2
from coordinator.rollout_store import NodeRow, RolloutRow, RolloutStore


def test_a_rollout_and_its_steps_survive_reopening(tmp_path):
    db = tmp_path / "co.db"
    store = RolloutStore(db)
    target = fleet_pb2.RolloutTarget(
        model_path="/models/v2", model_id="m", version="v2", weights_digest="sha256:" + "1" * 64
    )
    store.create(
        RolloutRow(
            id="r1",
            state="RUNNING",
            target=target,
            max_unavailable=1,
            drain_timeout_s=30,
            owner="co-1",
            started_by="alice",
            nodes=[NodeRow("n1"), NodeRow("n2")],
        )
    )
    n1 = store.get("r1").nodes[0]
    n1.step, n1.message, n1.from_digest = "done", "serving v2", "sha256:" + "0" * 64
    store.set_step("r1", n1)
    store.close()

    again = RolloutStore(db)
    row = again.active()
    assert row.id == "r1" and row.target == target and row.started_by == "alice"
    assert [(n.node_id, n.step) for n in row.nodes] == [("n1", "done"), ("n2", "pending")]
    again.set_state("r1", "SUCCEEDED", "2 nodes")
    assert again.active() is None and again.get().state == "SUCCEEDED"


def test_the_lease_is_held_by_one_coordinator_until_it_expires_or_is_released(tmp_path):
    a, b = RolloutStore(tmp_path / "co.db"), RolloutStore(tmp_path / "co.db")
    first = a.acquire("co-1", ttl_s=0.5)
    assert first.held and first.token == 1
    assert a.acquire("co-1", ttl_s=0.5) == first, "the holder renews, keeping its fencing token"
    held = b.acquire("co-2", ttl_s=0.5)
    assert not held.held and "coordinator co-1 holds the rollout lease" in held.refused
    time.sleep(0.6)  # let the lease expire (the behaviour under test is expiry by wall-clock time)
    second = b.acquire("co-2", ttl_s=10)
    assert second.held and second.token == 2, (
        "an expired lease can be taken over, with a newer token"
    )
    assert not a.acquire("co-1", ttl_s=10).held
    b.release("co-2")
    third = a.acquire("co-1", ttl_s=10)
    assert third.held and third.token == 3, "a released lease's token is not reused"
