"""A node address in the coordinator's fleet, as three things with one writer each: the
`NodeView` of what the fleet knows of the node (identity, status, the health Watch's
word, the health verdict), frozen and replaced by the Fleet (coordinator/fleet.py) when
that changes; the `NodeLoad` ledger of this coordinator's requests on it, written by
Admission only (coordinator/ledger.py); and its link. Everyone else reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cluster.api import common_pb2, node_pb2
from cluster.routing import Candidate
from cluster.traffic import class_of
from coordinator import health_policy as hp
from coordinator.ledger import NodeLoad
from coordinator.node_link import NodeLink

READY = common_pb2.LIFECYCLE_READY


@dataclass(frozen=True)
class NodeView:
    """What the fleet knows of the node at an address; replaced, never changed, when that changes."""

    node_id: str = ""  # set once verified over gRPC
    mdns_name: str = ""  # the instance name it announced (mDNS)
    status: Optional[node_pb2.NodeStatus] = None  # its last status read (never modified)
    status_at: float = 0.0
    serving: bool = False  # the health Watch's latest word
    health: hp.Health = field(default_factory=hp.Health)


@dataclass(eq=False)
class NodeEntry:
    """A node address in the fleet: its link, the fleet's view of it, and the load on it."""

    address: str
    source: str  # "static" or "mdns"
    link: NodeLink
    view: NodeView = field(default_factory=NodeView)  # the fleet's (Fleet replaces it)
    load: NodeLoad = field(default_factory=NodeLoad)  # admission's (only Admission writes it)

    # -- the view, read-only ----------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self.view.node_id

    @property
    def mdns_name(self) -> str:
        return self.view.mdns_name

    @property
    def status(self) -> Optional[node_pb2.NodeStatus]:
        return self.view.status

    @property
    def status_at(self) -> float:
        return self.view.status_at

    @property
    def serving(self) -> bool:
        return self.view.serving

    @property
    def health(self) -> hp.Health:
        return self.view.health

    # -- the load, read-only ----------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self.load.in_flight

    @property
    def outstanding_tokens(self) -> int:
        return self.load.outstanding_tokens

    @property
    def routed_total(self) -> int:
        return self.load.routed_total

    @property
    def failovers_total(self) -> int:
        return self.load.failovers_total

    @property
    def label(self) -> str:
        return self.node_id or self.address

    @property
    def digest(self) -> str:
        return self.status.model.weights_digest if self.status else ""

    @property
    def model_id(self) -> str:
        return self.status.model.model_id if self.status else ""

    @property
    def node_class(self) -> str:
        """Its traffic class (docs/traffic.md); "" before its status is read."""
        st = self.status
        return class_of(st.node_class, st.model.engine) if st is not None else ""

    @property
    def ready(self) -> bool:
        v = self.view
        st = v.status
        return st is not None and st.lifecycle == READY and not st.cordoned and v.serving

    @property
    def routable(self) -> bool:
        return self.view.health.verdict in hp.ACCEPTING and self.ready

    def candidate(self) -> Candidate:
        st, load = self.view.status, self.load
        cap = st.capacity
        return Candidate(
            self.view.node_id,
            st.model.weights_digest,
            load.in_flight,
            load.outstanding_tokens,
            st.load.queued,
            cap.max_running,
            cap.max_running + cap.max_queued,
            load.routed_total,
            st.model.model_id,
            st.model.version,
            class_of(st.node_class, st.model.engine),
        )
