"""Nodes as witnesses of this coordinator's audit chain (docs/security.md).

Every status poll carries the chain's signed HEAD; each node keeps the newest one per
signing key (node_agent/audit_witness.py). A chain cut back and given an older HEAD looks
whole on this host, but not next to what the nodes hold. So the first status read from
each node (after this coordinator starts, or when a node is first found) is checked
before it is shown any HEAD: every record a node's HEAD (signed by this log's key) names
must be in the chain, unchanged. If not, the alarm goes off (a CRITICAL log line, an
AUDIT fleet event, `alarm` set for the coordinator to refuse to serve), and no node is
shown a HEAD again, so the evidence they hold is kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cluster.api import common_pb2, fleet_pb2, node_pb2
from cluster.audit.chain import (
    HEAD_NAME,
    AuditError,
    fingerprint,
    head_message,
    list_files,
    parse_line,
    read_head,
    signature_ok,
)
from cluster.logs import fields

log = logging.getLogger(__name__)


def record_hash_at(directory: Path, seq: int) -> Optional[str]:
    """The hash of record `seq` in the chain in `directory`, None if the chain lacks it. Reads
    the first line of each file to find the one that holds it, then that file only."""
    holder = None
    for _, path in list_files(directory):
        with open(path, "rb") as f:
            first, _ = parse_line(f.readline())
        if first is not None and isinstance(first.get("seq"), int) and first["seq"] <= seq:
            holder = path
    if holder is None:
        return None
    with open(holder, "rb") as f:
        for raw in f:
            record, _ = parse_line(raw)
            if record is not None and record.get("seq") == seq:
                return record.get("hash")
    return None


class AuditWitness:
    """Shows nodes the chain's HEAD and checks what they hold. Event loop only."""

    def __init__(
        self,
        directory: Path,
        public_key: Ed25519PublicKey,
        *,
        events=None,
        on_alarm: Optional[Callable[[str], None]] = None,
    ):
        self._dir = Path(directory)
        self._key = public_key
        self.fingerprint = fingerprint(public_key)
        self._events = events
        self._on_alarm = on_alarm
        self.alarm: Optional[str] = None
        self._checked: set[tuple[int, str]] = set()  # (link, node id) whose witness was read
        self._good: set[tuple[int, str]] = set()  # (seq, hash) found in the chain
        self._cache: tuple[Optional[tuple[int, int]], Optional[common_pb2.AuditHead]] = (None, None)

    def head_for(self, link) -> Optional[common_pb2.AuditHead]:
        """The HEAD to show this node now: none before its own is checked, none after an alarm."""
        if self.alarm is not None or (id(link), link.node_id) not in self._checked:
            return None
        return self._current()

    def _current(self) -> Optional[common_pb2.AuditHead]:
        try:
            st = os.stat(self._dir / HEAD_NAME)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if self._cache[0] != stamp:
            try:
                doc = read_head(self._dir)
            except AuditError:
                return None
            head = None
            if (
                doc is not None
                and doc.get("key") == self.fingerprint
                and isinstance(doc.get("sig"), str)
            ):
                head = common_pb2.AuditHead(
                    seq=doc["seq"], hash=doc["hash"], sig=doc["sig"], key=doc["key"]
                )
            self._cache = (stamp, head)
        return self._cache[1]

    async def observe(self, link, st: node_pb2.NodeStatus) -> None:
        """A status read from `link`: the first from this node is checked against the chain."""
        key = (id(link), st.node_id)
        if key in self._checked or self.alarm is not None:
            return
        for head in st.audit_heads:
            if head.key != self.fingerprint:
                continue  # another coordinator's chain
            problem = await self._check(head, st.node_id)
            if problem:
                self._raise(problem, st.node_id)
                return
        self._checked.add(key)

    async def _check(self, head: common_pb2.AuditHead, node_id: str) -> Optional[str]:
        if (head.seq, head.hash) in self._good:
            return None
        if not signature_ok(self._key, head.sig, head_message(head.seq, head.hash)):
            log.warning(
                "node=%s holds an audit HEAD (record %d) whose signature does not verify; ignored",
                node_id,
                head.seq,
                extra=fields(event="audit.witness_bad_signature", node_id=node_id),
            )
            return None
        found = await asyncio.to_thread(record_hash_at, self._dir, head.seq)
        if found == head.hash:
            self._good.add((head.seq, head.hash))
            return None
        if found is None:
            return (
                f"the audit chain in {self._dir} has no record {head.seq}, but node {node_id} holds a HEAD "
                f"for it signed by this log's key {self.fingerprint}: the chain's tail was cut (and an older "
                "HEAD put back)"
            )
        return (
            f"record {head.seq} of the audit chain in {self._dir} differs from the one node {node_id}'s "
            f"signed HEAD names: the chain was cut back and rewritten from there"
        )

    def _raise(self, problem: str, node_id: str) -> None:
        self.alarm = problem + (
            ". Keep the chain and the nodes' state files as evidence; restore the missing "
            "records from backup, or archive this chain and start a new audit directory "
            "and signing key"
        )
        log.critical(
            "AUDIT CHAIN BEHIND A WITNESS: %s",
            self.alarm,
            extra=fields(event="audit.witness_ahead", node_id=node_id),
        )
        if self._events is not None:
            self._events.emit(fleet_pb2.EVENT_KIND_AUDIT, node_id=node_id, reason=self.alarm)
        if self._on_alarm is not None:
            self._on_alarm(self.alarm)
