"""The node as a witness of its coordinators' audit chains (docs/security.md).

Each status poll from a coordinator carries that coordinator's newest signed audit HEAD.
The node keeps the newest one per signing key, saved with its state, and reports them in
NodeStatus. The node cannot check the signature (it has no audit key); it keeps what a
verified coordinator certificate showed it, and whoever checks (the coordinator at start,
`fleetctl audit verify --witness`) verifies the signature with the key it trusts. A HEAD
older than, or at the same record as, the one kept never replaces it: the evidence of a
chain that was cut back and restarted survives.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

from cluster.api import common_pb2
from cluster.logs import fields
from node_agent.node_state import KEEP_AUDIT_HEADS, NodeState

log = logging.getLogger(__name__)

_HEX_DIGITS = {"hash": 64, "sig": 128, "key": 16}
MAX_SEQ = 1 << 62


def invalid(head: common_pb2.AuditHead) -> Optional[str]:
    """Why `head` is not a well-formed HEAD (the message names fields, never values), or None."""
    if not 0 < head.seq < MAX_SEQ:
        return "audit_head.seq must be a record number above 0"
    for name, digits in _HEX_DIGITS.items():
        if not re.fullmatch(f"[0-9a-f]{{{digits}}}", getattr(head, name)):
            return f"audit_head.{name} must be {digits} lowercase hex digits"
    return None


def keep(state: NodeState, head: common_pb2.AuditHead, node_id: str) -> bool:
    """Keep `head` if it is newer than the one held for its key; True when the state changed
    (the caller saves it before answering)."""
    held = state.audit_heads.get(head.key)
    if held is not None and head.seq <= held["seq"]:
        if head.seq == held["seq"] and head.hash != held["hash"]:
            log.warning(
                "node=%s audit HEAD of key %s: record %d shown with another hash; keeping the first",
                node_id,
                head.key,
                head.seq,
                extra=fields(
                    event="node.audit_head.conflict", node_id=node_id, key=head.key, seq=head.seq
                ),
            )
        return False
    if held is None and len(state.audit_heads) >= KEEP_AUDIT_HEADS:
        oldest = min(state.audit_heads, key=lambda k: state.audit_heads[k].get("kept", 0))
        del state.audit_heads[oldest]
    state.audit_heads[head.key] = {
        "seq": head.seq,
        "hash": head.hash,
        "sig": head.sig,
        "key": head.key,
        "kept": _counter(state),
    }
    return True


def _counter(state: NodeState) -> int:
    return 1 + max((h.get("kept", 0) for h in state.audit_heads.values()), default=0)


def to_proto(state: NodeState) -> list[common_pb2.AuditHead]:
    return [
        common_pb2.AuditHead(seq=h["seq"], hash=h["hash"], sig=h["sig"], key=h["key"])
        for h in state.audit_heads.values()
    ]
