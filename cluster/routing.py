"""Pick a node for a request: pure functions over a snapshot of the routable nodes.

Least outstanding work: the tokens this coordinator's requests may still generate on a
node, plus what the node itself last reported queued, per decode slot it advertises.
With a session key, bounded-load consistent hashing (Mirrokni et al.): the key's place
on a hash ring picks the node, unless that node already carries more than
`load_factor` x the average, so one hot session cannot pile onto one node.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

from cluster.validation import serves

VNODES = 64


@dataclass(frozen=True)
class Candidate:
    node_id: str
    digest: str
    in_flight: int  # this coordinator's requests on it
    outstanding_tokens: int  # tokens they may still generate
    reported_queued: int  # requests queued on the node, as it last reported
    max_running: int
    slots: int  # max_running + max_queued: beyond this the node refuses
    routed_total: int = 0
    model: str = ""  # ModelInfo.model_id
    version: str = ""  # ModelInfo.version
    node_class: str = ""  # its traffic class (cluster/traffic.py class_of)


@dataclass(frozen=True)
class Want:
    """What a request needs from a node."""

    digest: str = ""  # required weights ("" = any)
    exclude: frozenset[str] = frozenset()  # nodes that already failed this request
    session_key: str = field(default="", repr=False)  # may derive from a patient's identity
    model: str = ""  # required model id, or ID@VERSION ("" = any; see serves)
    node_class: str = ""  # required traffic class ("" = any; the traffic policy's choice)


def eligible(c: Candidate, want: Want) -> bool:
    return serving(c, want) and c.in_flight < c.slots


def serving(c: Candidate, want: Want) -> bool:
    """The node could take the request if it had room: eligible but for its load."""
    return (
        c.node_id not in want.exclude
        and (not want.digest or c.digest == want.digest)
        and serves(c.model, c.version, want.model)
        and (not want.node_class or c.node_class == want.node_class)
    )


def work(c: Candidate) -> float:
    return (c.outstanding_tokens + c.reported_queued) / max(c.max_running, 1)


def pick(
    candidates: Sequence[Candidate], want: Want, *, load_factor: float = 1.25
) -> Optional[str]:
    """The node id to use, or None if no candidate can take the request now."""
    ok = [c for c in candidates if eligible(c, want)]
    if not ok:
        return None
    if want.session_key:
        return _affine(ok, want.session_key, load_factor)
    return min(ok, key=lambda c: (work(c), c.in_flight, c.routed_total, c.node_id)).node_id


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@lru_cache(maxsize=64)
def _ring(node_ids: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    points = sorted((_hash(f"{n}#{i}"), n) for n in node_ids for i in range(VNODES))
    return tuple(p for p, _ in points), tuple(n for _, n in points)


def _affine(ok: list[Candidate], key: str, load_factor: float) -> str:
    by_id = {c.node_id: c for c in ok}
    hashes, owners = _ring(tuple(sorted(by_id)))
    total = sum(c.in_flight for c in ok) + 1
    bound = math.ceil(load_factor * total / len(ok))
    start = bisect.bisect(hashes, _hash(key))
    for i in range(len(owners)):
        owner = by_id[owners[(start + i) % len(owners)]]
        if owner.in_flight + 1 <= bound:
            return owner.node_id
    return min(ok, key=lambda c: c.in_flight).node_id
