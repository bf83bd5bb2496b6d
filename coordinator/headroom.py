"""The coordinator's live headroom (docs/capacity.md "Live headroom"): the closed form of
cluster.capacity.headroom over this coordinator's routable nodes, the profiles given with
--capacity-profile, and the requests that end here."""

from __future__ import annotations

from collections.abc import Iterator

from cluster.capacity.headroom import LiveHeadroom, RoutableNode
from cluster.capacity.profile import resolve_profile


def live_headroom(settings, fleet) -> LiveHeadroom:
    """A LiveHeadroom reading `fleet` (coordinator.fleet.Fleet) when asked; feed it ended
    requests with `observe` (a Monitor sink). The profiles were checked at start (main.check)."""
    profiles = [resolve_profile(spec) for spec in settings.capacity_profiles]

    def routable() -> Iterator[RoutableNode]:
        for entry in fleet.routable():
            st = entry.status
            yield RoutableNode(
                entry.node_id, entry.model_id, st.capacity.max_running if st is not None else 0
            )

    return LiveHeadroom(
        profiles, nodes=routable, sla_p95_s=settings.sla_p95_s, window_s=settings.capacity_window_s
    )
