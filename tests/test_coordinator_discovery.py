"""Clients find coordinators over mDNS (docs/ha.md "Finding coordinators"): real coordinator
processes announce on loopback under a fleet name of this test's own; the client package's
discovery finds them, and a note completes through a discovered address."""

from __future__ import annotations

import uuid

import pytest

from cluster.localfleet import HARNESS_APP
from cluster.security.identity import Role, dns_name
from coordinator.announce import COORDINATOR_SERVICE_TYPE
from studiofleet_client import FleetClient, UnavailableError
from studiofleet_client.discover import SERVICE_TYPE, browse_coordinators, discover_coordinators


def test_client_and_coordinator_agree_on_the_service_type():
    assert SERVICE_TYPE == COORDINATOR_SERVICE_TYPE


def test_announced_coordinators_are_found_and_serve_a_note(node, start_coordinator):
    fleet = f"disc-{uuid.uuid4().hex[:8]}"
    a = start_coordinator(nodes=[node.address], fleet=fleet, name="disc-a")
    b = start_coordinator(nodes=[node.address], fleet=fleet, name="disc-b")
    quiet = start_coordinator(
        "--no-mdns-announce", nodes=[node.address], fleet=fleet, name="disc-quiet"
    )

    found = browse_coordinators(fleet, interface="127.0.0.1", timeout_s=10, want=2)
    assert [c.coordinator_id for c in found] == ["disc-a", "disc-b"]
    by_id = {c.coordinator_id: c for c in found}
    for co in (a, b):
        seen = by_id[co.name]
        assert seen.address == co.address and seen.openai_address == co.openai_address
        assert seen.fleet == fleet and seen.tls
    # The one told not to announce is not found (browse the whole window, not just until two).
    assert quiet.name not in {
        c.coordinator_id for c in browse_coordinators(fleet, interface="127.0.0.1", timeout_s=2)
    }

    # Static addresses first, discovered ones after, none twice: what FleetClient takes.
    targets = discover_coordinators(
        fleet, static=[b.address, "127.0.0.1:1"], interface="127.0.0.1", timeout_s=10, want=2
    )
    assert targets == [b.address, "127.0.0.1:1", a.address]

    a.wait_routable(1)
    seen = by_id["disc-a"]
    with FleetClient(
        [seen.address],
        tls=a.credentials(HARNESS_APP, Role.APP),
        server_name=dns_name(Role.COORDINATOR, seen.coordinator_id),
    ) as client:
        result = client.generate(
            prompt="Synthetic visit note through a discovered coordinator.",
            max_tokens=8,
            temperature=0.0,
            timeout_s=60,
        )
    assert result.text and result.completion_tokens > 0


def test_another_fleet_is_not_found():
    with pytest.raises(UnavailableError) as none:
        discover_coordinators(
            f"nobody-{uuid.uuid4().hex[:8]}", interface="127.0.0.1", timeout_s=0.5
        )
    assert "no coordinator of fleet" in str(none.value) and "pass addresses" in str(none.value)
    with pytest.raises(ValueError):
        browse_coordinators("default", timeout_s=0)
