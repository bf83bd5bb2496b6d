"""This coordinator's load on one node: the requests it placed there and what they may
still cost. Admission (coordinator/admission.py) is its only writer; the relay changes it
through Admission's methods, and everyone else reads it through the node's entry."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class NodeLoad:
    in_flight: int = 0  # this coordinator's requests on the node (a place each)
    outstanding_tokens: int = 0  # tokens they may still generate
    routed_total: int = 0  # requests ever placed on it
    failovers_total: int = 0  # node calls that failed there and moved on
    attempts: set = field(
        default_factory=set
    )  # live node calls (coordinator/attempt.py), evicted on ejection

    @classmethod
    def moved(cls, previous: NodeLoad) -> NodeLoad:
        """A node that moved to a new address (before any request is placed there) keeps its totals."""
        return cls(routed_total=previous.routed_total, failovers_total=previous.failovers_total)
