"""Pausing and resuming a rollout through either of two coordinators on one state database
(docs/ha.md "Rollouts and the dashboard across the pair"), in process on a real SQLite
file: two `Rollouts` (two coordinators' rollout control, each with its own engine) and
real runners. The rollout's node is absent, so each run pauses on its own after the
rollout's wait timeout (Blocked), which is what the test resumes. The event-loop guard
(tests/loop_guard.py) is on: every database call of the runner, the lease holder, the
standby and the commands must run off the loop."""

from __future__ import annotations

import asyncio
import time

from cluster.api import fleet_pb2
from cluster.config import RolloutSection
from coordinator.events import EventLog
from coordinator.rollout_store import NodeRow, RolloutRow, RolloutStore
from coordinator.rollouts import Rollouts

LEASE_S = 0.6
RID = "r-pair"


class _NoNodes:
    """A fleet view in which the rollout's node never appears."""

    entries: dict = {}

    def by_id(self, _node_id):
        return None


def _rollouts(store: RolloutStore, name: str) -> tuple[Rollouts, EventLog]:
    events = EventLog()
    return (
        Rollouts(
            settings=RolloutSection(rollout_lease_s=LEASE_S),
            holder=f"{name}@test/0000",
            probe_timeout_s=1.0,
            fleet=_NoNodes(),
            events=events,
            gates=[],
            store=store,
        ),
        events,
    )


def _pauses(events: EventLog) -> int:
    return sum(e.step == "pause" and e.rollout_id == RID for e in events.history())


async def _until(what: str, predicate, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        await asyncio.sleep(0.02)
    return got


def test_a_rollout_run_by_one_coordinator_is_resumed_through_the_other(tmp_path):
    db = tmp_path / "state.db"
    setup = RolloutStore(db)
    setup.create(
        RolloutRow(
            id=RID,
            state="RUNNING",
            target=fleet_pb2.RolloutTarget(restart=True),
            max_unavailable=1,
            drain_timeout_s=30,
            owner="",
            started_by="operator/alice",
            nodes=[NodeRow("absent-node")],
            wait_timeout_s=0.3,
        )
    )
    setup.close()
    reader = RolloutStore(db)  # a third engine: what the operator's `fleetctl` would see
    stores = RolloutStore(db), RolloutStore(db)  # opened before the loop, as at start

    async def scenario():
        a, a_events = _rollouts(stores[0], "co-a")
        b, b_events = _rollouts(stores[1], "co-b")
        a.resume_pending()  # A picks the rollout up at start and runs it
        await _until("A's run pausing on the absent node", lambda: _pauses(a_events) == 1)
        row = await asyncio.to_thread(reader.get, RID)
        assert row.state == "PAUSED" and row.owner == a.holder and "absent-node" in row.message

        # Resumed through B while A runs it: A's runner reads it and runs again (and pauses
        # again on the absent node); B starts nothing, A's lease being alive.
        resumed = await b.control(RID, "resume")
        assert resumed.state == "RUNNING"
        await _until("A's runner resuming from B's command", lambda: _pauses(a_events) == 2)
        lease = await asyncio.to_thread(reader.lease)
        assert lease[0] == a.holder
        assert (await asyncio.to_thread(reader.get, RID)).owner == a.holder
        assert b._lease_task is None and b._task is None

        # A dies (its tasks end without releasing the lease, as a kill leaves it). Once the
        # lease lapses, a resume through B makes B take the rollout on.
        for task in (a._task, a._lease_task, a._standby_task):
            task.cancel()
        await asyncio.sleep(LEASE_S + 0.1)
        await b.control(RID, "resume")
        await _until("B's run pausing on the absent node", lambda: _pauses(b_events) == 1)
        row = await asyncio.to_thread(reader.get, RID)
        lease = await asyncio.to_thread(reader.lease)
        assert row.owner == b.holder and lease[0] == b.holder and lease[2] == 2
        assert b.latest is not None and b.latest.id == RID
        await b.close()
        await asyncio.to_thread(a.store.close)

    try:
        asyncio.run(scenario())
    finally:
        reader.close()
