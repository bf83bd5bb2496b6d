"""The fleet's typed state (issue 22): an entry's view is frozen and replaced by the fleet,
its load ledger is written by admission's methods only, and the relay's changes go
through them. Pure objects; no sockets are opened beyond a lazy channel."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from cluster.api import common_pb2, node_pb2
from cluster.routing import Want
from coordinator import health_policy as hp
from coordinator.admission import INTERACTIVE, Admission
from coordinator.ledger import NodeLoad
from coordinator.node_entry import NodeEntry, NodeView
from coordinator.node_link import NodeLink


def _status(node_id: str) -> node_pb2.NodeStatus:
    st = node_pb2.NodeStatus(node_id=node_id, lifecycle=common_pb2.LIFECYCLE_READY)
    st.model.model_id, st.model.weights_digest = "tiny", "sha256:aa"
    st.capacity.max_running, st.capacity.max_queued = 2, 0
    return st


class _Fleet:
    def __init__(self, entries):
        self.entries = entries

    def routable(self):
        return [e for e in self.entries if e.routable]


def _entry(node_id: str) -> NodeEntry:
    return NodeEntry(
        address="127.0.0.1:1",
        source="static",
        link=NodeLink("127.0.0.1:1", None),
        view=NodeView(
            node_id=node_id,
            status=_status(node_id),
            serving=True,
            health=hp.Health(verdict=hp.Verdict.HEALTHY),
        ),
    )


def test_the_view_is_replaced_never_changed_and_the_entry_only_reads_it():
    async def main() -> None:
        entry = _entry("n1")
        assert entry.routable and entry.node_id == "n1" and entry.digest == "sha256:aa"
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.view.serving = False
        for name in (
            "node_id",
            "status",
            "serving",
            "health",
            "in_flight",
            "outstanding_tokens",
            "routed_total",
            "failovers_total",
        ):
            with pytest.raises(AttributeError):
                setattr(entry, name, None)
        entry.view = dataclasses.replace(entry.view, serving=False)
        assert not entry.routable
        await entry.link.close()

    asyncio.run(main())


def test_admission_owns_the_ledger_the_relay_reports_through_it():
    async def main() -> None:
        a, b = _entry("a"), _entry("b")
        adm = Admission(fleet=_Fleet([a, b]), max_depth=4, max_wait_s=0.1, load_factor=1.25)
        first = await adm.acquire(Want(), priority=INTERACTIVE, tokens=10, timeout_s=None)
        second = await adm.acquire(Want(), priority=INTERACTIVE, tokens=10, timeout_s=None)
        assert {first.node_id, second.node_id} == {"a", "b"}  # least work first
        assert (first.in_flight, first.outstanding_tokens, first.routed_total) == (1, 10, 1)
        adm.call_started(first, "call")
        adm.delivered(first, 4)
        assert first.outstanding_tokens == 6 and first.load.attempts == {"call"}
        adm.call_ended(first, "call")
        adm.failed_over(first)
        adm.release(first, 6)
        assert (
            first.in_flight,
            first.outstanding_tokens,
            first.failovers_total,
            first.load.attempts,
        ) == (0, 0, 1, set())
        moved = NodeLoad.moved(first.load)
        assert (moved.in_flight, moved.routed_total, moved.failovers_total) == (0, 1, 1)
        for e in (a, b):
            await e.link.close()

    asyncio.run(main())
