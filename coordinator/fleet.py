"""The coordinator's fleet view: one entry per node address, kept current by a monitor.

Each entry has a monitor task (status poll with jitter; verification on first contact)
and, once verified, a health Watch task (pushed readiness). Routing reads entries;
failures seen while routing come back through `report_failure`. The node stays the
source of truth for its own state (DESIGN invariant 1): this is a cache with verdicts.

An entry (coordinator/node_entry.py) holds its `NodeView`, which the fleet replaces
whenever what it knows of the node changes, and its `NodeLoad`, which admission writes;
the monitor's own tasks and probe bookkeeping (`_Monitor`) are kept here, by the monitor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import grpc

from cluster.api import API_VERSION, common_pb2, fleet_pb2, node_pb2
from cluster.config import HealthSection
from coordinator import health_policy as hp
from coordinator.events import EventLog
from coordinator.ledger import NodeLoad
from coordinator.node_entry import READY, NodeEntry, NodeView
from coordinator.node_link import SERVING, NodeLink, tls_refusal

log = logging.getLogger(__name__)

K = fleet_pb2
# An announced node unreachable this long (and no longer announced) is forgotten.
FORGET_UNREACHABLE_S = 300.0
WATCH_BACKOFF_S = (0.2, 2.0)
CLAIM_RECHECK_S = 30.0  # a refused claim (address, id) is verified again at most this often
MAX_CLAIMS_IN_FLIGHT = 8


@dataclass(eq=False)
class _Monitor:
    """The monitor's own state for one entry: its tasks and its probe bookkeeping."""

    tasks: list = field(default_factory=list)  # [the status poll, then the health Watch]
    poke: asyncio.Event = field(default_factory=asyncio.Event)  # probe now
    goodbye: bool = False  # mDNS said it left
    moved_from: tuple = ()  # (address, node id) this announcement says it moved from
    unreachable_since: Optional[float] = None
    crl_generation: int = -1  # the revocation list this node's certificate was last checked against


class Fleet:
    """Entries by address; verified ones also by node id. Runs on the event loop only."""

    def __init__(
        self,
        *,
        settings: HealthSection,
        events: EventLog,
        on_change: Callable[[], None],
        tls=None,
        revocations=None,
        clock: Callable[[], float] = time.monotonic,
        witness=None,
    ):
        self._s = settings
        self._tls = tls  # the coordinator's client credentials; None = plaintext
        self._revocations = revocations  # the fleet's crl.pem, for the certificates nodes serve
        self._events = events
        self._on_change = on_change
        self._clock = clock
        self.witness = witness  # coordinator.audit_witness.AuditWitness: nodes keep the audit HEAD
        self._policy = hp.Policy.from_settings(settings)
        self.entries: dict[str, NodeEntry] = {}
        self._monitors: dict[NodeEntry, _Monitor] = {}  # per entry in `entries`
        self._claims: dict[
            tuple[str, str], asyncio.Task
        ] = {}  # (address, claimed id) being verified
        self._refused_claims: dict[
            tuple[str, str], float
        ] = {}  # ... that failed: not re-checked until
        self._closed = False

    # -- membership -------------------------------------------------------------------
    def add(
        self,
        address: str,
        *,
        source: str,
        mdns_name: str = "",
        moved_from: str = "",
        claimed_id: str = "",
    ) -> NodeEntry:
        """A node is (claimed to be) at `address`; connect and verify before routing to it.
        `moved_from`: the address the same announcement used before (mDNS); `claimed_id`:
        the node id it announced, which its certificate must name."""
        # A move is only a claim: the old entry stays until the new address proves the id
        # and the old one stops answering as that node (`_verify`).
        previous = self.entries.get(moved_from) if moved_from else None
        entry = self.entries.get(address)
        if entry is not None:
            if claimed_id and entry.link.node_id and claimed_id != entry.link.node_id:
                # Another id announced for a known address: proved on a connection of its own,
                # never by re-binding the entry that serves here (a forged announcement).
                self._check_claim(entry, claimed_id, mdns_name)
                return entry
            self._monitors[entry].goodbye = False
            self._see(entry, mdns_name=mdns_name or entry.mdns_name)
            self.poke(entry)
            return entry
        entry = NodeEntry(
            address=address,
            source=source,
            link=NodeLink(address, self._tls, claimed_id, self.witness),
            view=NodeView(mdns_name=mdns_name),
        )
        mon = _Monitor(moved_from=(moved_from, previous.node_id) if previous is not None else ())
        self.entries[address] = entry
        self._monitors[entry] = mon
        self._events.emit(
            K.EVENT_KIND_DISCOVERED,
            address=address,
            reason=f"{source}{' ' + mdns_name if mdns_name else ''}",
        )
        mon.tasks.append(asyncio.get_running_loop().create_task(self._monitor(entry)))
        return entry

    def poke(self, entry: NodeEntry) -> None:
        """Probe the entry now rather than at its next poll (a no-op once it left)."""
        mon = self._monitors.get(entry)
        if mon is not None:
            mon.poke.set()

    def _see(self, entry: NodeEntry, **changes) -> None:
        """What the fleet knows of the entry changed: its view is replaced."""
        entry.view = replace(entry.view, **changes)

    def _check_claim(self, entry: NodeEntry, claimed_id: str, mdns_name: str) -> None:
        """Verify, in the background, that `claimed_id` now answers at the entry's address."""
        key = (entry.address, claimed_id)
        if key in self._claims or self._clock() < self._refused_claims.get(key, 0.0):
            return
        if (
            len(self._claims) >= MAX_CLAIMS_IN_FLIGHT
        ):  # a flood of claims costs a few connections, no more
            log.warning(
                "address=%s claim not verified now: %d claims are being verified",
                entry.address,
                len(self._claims),
            )
            return
        task = asyncio.get_running_loop().create_task(
            self._prove_claim(entry, claimed_id, mdns_name)
        )
        self._claims[key] = task
        task.add_done_callback(lambda _t: self._claims.pop(key, None))

    async def _prove_claim(self, entry: NodeEntry, claimed_id: str, mdns_name: str) -> None:
        link = NodeLink(
            entry.address, self._tls, claimed_id
        )  # its own channel: the entry's is untouched
        try:
            st = await link.status(self._s.probe_timeout_s)
            why = (
                ""
                if st.node_id == claimed_id
                else f"the node there reports {st.node_id or 'no id'}"
            )
        except grpc.aio.AioRpcError as err:
            why = tls_refusal(err.details()) or f"{err.code().name}: {err.details()}"
        finally:
            await link.close()
        if self.entries.get(entry.address) is not entry:
            return
        if why:
            now = self._clock()
            self._refused_claims = {k: t for k, t in self._refused_claims.items() if t > now}
            self._refused_claims[(entry.address, claimed_id)] = now + CLAIM_RECHECK_S
            self._events.emit(
                K.EVENT_KIND_REJECTED,
                node_id=claimed_id,
                address=entry.address,
                reason=f"an mDNS announcement{' (' + mdns_name + ')' if mdns_name else ''} claims "
                f"node {claimed_id} at this address, but it could not prove it ({why}); "
                f"the entry serving here ({entry.label}) is unchanged",
            )
            return
        log.info(
            "node=%s address=%s proved it now serves here; re-verifying the entry",
            claimed_id,
            entry.address,
        )
        entry.link.bind(claimed_id)  # proved: the next probe re-verifies the entry as the new node
        self._see(entry, mdns_name=mdns_name or entry.mdns_name)
        self.poke(entry)

    async def _answers_as(self, entry: NodeEntry, node_id: str) -> bool:
        """Whether `entry`'s address still answers as `node_id` (on its own, proving channel)."""
        if self.entries.get(entry.address) is not entry:
            return False
        try:
            st = await entry.link.status(self._s.probe_timeout_s)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError):
            return False
        return st.node_id == node_id and entry.link.node_id in ("", node_id)

    def goodbye(self, address: str, reason: str, mdns_name: str = "") -> None:
        """mDNS says the node left: confirm with a probe; remove it if it stopped answering.
        A goodbye for another instance name than the entry's is ignored."""
        entry = self.entries.get(address)
        if (
            entry is not None
            and entry.source == "mdns"
            and (not mdns_name or mdns_name == entry.mdns_name)
        ):
            self._monitors[entry].goodbye = True
            log.info("node=%s address=%s mDNS goodbye (%s); probing", entry.label, address, reason)
            self.poke(entry)

    async def remove(self, entry: NodeEntry, reason: str) -> None:
        if self.entries.get(entry.address) is not entry:
            return
        del self.entries[entry.address]
        mon = self._monitors.pop(entry)
        self._evict(entry, f"node {entry.label} left the fleet: {reason}")
        for task in mon.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await entry.link.close()
        self._events.emit(
            K.EVENT_KIND_LEFT, node_id=entry.node_id, address=entry.address, reason=reason
        )
        self._on_change()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._claims.values()):
            task.cancel()
        for entry in list(self.entries.values()):
            for task in self._monitors[entry].tasks:
                task.cancel()
            await entry.link.close()
        self.entries.clear()
        self._monitors.clear()

    # -- reads ------------------------------------------------------------------------
    def by_id(self, node_id: str) -> Optional[NodeEntry]:
        """The verified entry with this id that is not REJECTED."""
        return next(
            (
                e
                for e in self.entries.values()
                if e.node_id == node_id and e.health.verdict is not hp.Verdict.REJECTED
            ),
            None,
        )

    def routable(self) -> list[NodeEntry]:
        return [e for e in self.entries.values() if e.routable]

    def observe_reply(self, entry: NodeEntry, st: node_pb2.NodeStatus) -> None:
        """A node's status that came back with an operation: routing follows it at once
        (a cordon stops new requests now, not at the next poll)."""
        if self.entries.get(entry.address) is entry and st.node_id == entry.node_id:
            asyncio.get_running_loop().create_task(self._observe(entry, st))

    # -- signals ----------------------------------------------------------------------
    def report_failure(
        self, entry: NodeEntry, reason: str, *, hard: bool, source: hp.Source = hp.Source.REQUEST
    ) -> None:
        """A failure seen while routing (passive health), or by the monitor (`source`)."""
        if self.entries.get(entry.address) is entry:
            last = not any(e is not entry and e.routable for e in self.entries.values())
            self._set_health(
                entry,
                hp.on_failure(
                    entry.health,
                    source=source,
                    reason=reason,
                    hard=hard,
                    now=self._clock(),
                    last_healthy=last,
                    policy=self._policy,
                ),
            )
            self.poke(entry)

    def report_success(self, entry: NodeEntry, source: hp.Source = hp.Source.REQUEST) -> None:
        self._set_health(
            entry,
            hp.on_success(entry.health, source=source, now=self._clock(), policy=self._policy),
        )

    def _set_health(self, entry: NodeEntry, new: hp.Health) -> None:
        old = entry.health
        self._see(entry, health=new)
        if new.verdict is old.verdict:
            return
        kind = {
            hp.Verdict.EJECTED: K.EVENT_KIND_EJECTED,
            hp.Verdict.REJECTED: K.EVENT_KIND_REJECTED,
        }.get(new.verdict, K.EVENT_KIND_STATE_CHANGED)
        if new.verdict is hp.Verdict.HEALTHY and old.verdict is hp.Verdict.PROBING:
            kind = K.EVENT_KIND_READMITTED
        if kind != K.EVENT_KIND_STATE_CHANGED or old.verdict is not hp.Verdict.PENDING:
            self._events.emit(
                kind,
                node_id=entry.node_id,
                address=entry.address,
                reason=f"{old.verdict.value} -> {new.verdict.value}: {new.reason}",
            )
        if new.verdict is hp.Verdict.EJECTED:
            self._evict(entry, f"node {entry.label} was ejected: {new.reason}")
        self._on_change()

    def _evict(self, entry: NodeEntry, reason: str) -> None:
        """Move the requests running on a node that is ejected or gone to other nodes."""
        for attempt in list(entry.load.attempts):
            attempt.evict(reason)

    # -- the monitor ------------------------------------------------------------------
    async def _monitor(self, entry: NodeEntry) -> None:
        """Probe until the entry is removed; survives any single error."""
        while not self._closed:
            try:
                if await self._probe(entry):
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive a bug in one probe
                log.exception("node=%s address=%s monitor error", entry.label, entry.address)
            await self._wait(entry)

    async def _wait(self, entry: NodeEntry) -> None:
        interval = self._s.poll_interval_s * (1 + random.uniform(-1, 1) * self._s.poll_jitter)
        h = entry.health
        if h.verdict is hp.Verdict.EJECTED:
            interval = max(0.0, h.ejected_until - self._clock())
        mon = self._monitors.get(entry)
        if mon is None:  # removed: `_probe` ends the loop
            return
        poke = mon.poke
        poke.clear()
        try:
            await asyncio.wait_for(poke.wait(), timeout=interval)
        except TimeoutError:
            pass

    async def _probe(self, entry: NodeEntry) -> bool:
        """One status read and its verdict; True when the entry was removed."""
        mon = self._monitors.get(entry)
        if mon is None:
            return True
        self._set_health(entry, hp.on_tick(entry.health, now=self._clock()))
        if entry.health.verdict is hp.Verdict.EJECTED and not mon.goodbye:
            return False
        entry.link.refresh_credentials()
        try:
            st = await entry.link.status(self._s.probe_timeout_s)
        except grpc.aio.AioRpcError as err:
            refusal = tls_refusal(err.details())
            if refusal:  # a stranger, or a node that cannot prove who it is: never routed to
                self._set_health(entry, hp.rejected(f"TLS: {refusal}"))
                if entry.source == "static" and entry.link.node_id and "does not name" in refusal:
                    entry.link.bind(
                        ""
                    )  # another node may now serve here: learn its id on the next probe
                return False
            now = self._clock()
            mon.unreachable_since = mon.unreachable_since or now
            gone_for = now - mon.unreachable_since
            if entry.source == "mdns" and (mon.goodbye or gone_for > FORGET_UNREACHABLE_S):
                await self.remove(
                    entry,
                    "said goodbye and stopped answering"
                    if mon.goodbye
                    else f"unreachable for {gone_for:.0f}s",
                )
                return True
            # Soft: a probe can fail on a reconnect blip. A crash breaks the Watch stream
            # (hard) and running streams (hard) before the next probe would notice.
            self.report_failure(
                entry,
                f"status probe failed: {err.code().name}: {err.details()}",
                hard=False,
                source=hp.Source.PROBE,
            )
            return False
        mon.unreachable_since = None
        if (
            entry.node_id and mon.crl_generation != self._crl_generation()
        ):  # the CRL changed since we looked
            revoked = await self._revoked(entry)
            if revoked:
                self._set_health(entry, hp.rejected(revoked))
                return False
        await self._observe(entry, st)
        return False

    def _crl_generation(self) -> int:
        if self._revocations is None:
            return 0
        self._revocations.refresh()
        return self._revocations.generation

    async def _revoked(self, entry: NodeEntry) -> Optional[str]:
        """Why the node's own certificate may not be trusted (revoked), or None. gRPC does
        not check revocation lists in the handshake, so the coordinator reads the certificate
        the node serves and checks it against the fleet's crl.pem."""
        if self._revocations is None or self._tls is None:
            return None
        generation = self._crl_generation()
        try:
            serial = await entry.link.served_serial()
        except (OSError, ValueError) as exc:
            return (
                f"its certificate could not be read for the revocation check ({type(exc).__name__})"
            )
        if self._revocations.revoked(serial):
            return f"its certificate (serial {serial:x}) is revoked; issue the node a new one"
        mon = self._monitors.get(entry)
        if mon is not None:
            mon.crl_generation = generation
        return None

    async def _observe(self, entry: NodeEntry, st: node_pb2.NodeStatus) -> None:
        if (
            entry.node_id != st.node_id
            or st.api_version != API_VERSION
            or entry.health.verdict is hp.Verdict.REJECTED
        ):  # a refusal is re-examined each probe
            if not await self._verify(entry, st):
                return
        old = entry.status
        self._see(entry, status=st, status_at=self._clock())
        if old is None or (old.lifecycle, old.cordoned) != (st.lifecycle, st.cordoned):
            mon = self._monitors.get(entry)
            if (
                mon is not None and not mon.tasks[1:]
            ):  # no Watch yet: trust the status until it pushes
                self._see(entry, serving=st.lifecycle == READY)
            if old is not None:
                self._events.emit(
                    K.EVENT_KIND_STATE_CHANGED,
                    node_id=entry.node_id,
                    address=entry.address,
                    reason=f"{_state(old)} -> {_state(st)}: {st.lifecycle_reason}",
                )
            self._on_change()
        if entry.health.verdict is not hp.Verdict.REJECTED:
            self.report_success(entry, hp.Source.PROBE)

    async def _verify(self, entry: NodeEntry, st: node_pb2.NodeStatus) -> bool:
        """First contact (or a new node id at a known address): may it join?"""
        if st.api_version != API_VERSION:
            self._set_health(
                entry,
                hp.rejected(
                    f"speaks {st.api_version or 'an unknown API'}, "
                    f"this coordinator {API_VERSION}; upgrade one of them"
                ),
            )
            return False
        if self._tls is not None and not st.node_id:
            self._set_health(
                entry, hp.rejected("reports no node id; a node's id is its certificate's name")
            )
            return False
        claimed = st.node_id
        if entry.link.bind(claimed):  # TLS: from now on the handshake must prove this id
            try:
                st = await entry.link.status(self._s.probe_timeout_s)
            except grpc.aio.AioRpcError as err:
                why = tls_refusal(err.details()) or f"{err.code().name}: {err.details()}"
                self._set_health(
                    entry, hp.rejected(f"says it is node {claimed} but could not prove it: {why}")
                )
                return False
        if (
            self._tls is not None and st.node_id != entry.link.node_id
        ):  # answers as one id, proves another
            self._set_health(
                entry,
                hp.rejected(
                    f"its certificate names node {entry.link.node_id} but it reports "
                    f"{st.node_id or 'no id'}; refusing both"
                ),
            )
            return False
        revoked = await self._revoked(entry)
        if revoked:
            self._set_health(entry, hp.rejected(revoked))
            return False
        mon = self._monitors.get(entry)
        if mon is None:  # it left the fleet meanwhile
            return False
        other = self.by_id(st.node_id)
        if other is None and mon.moved_from[1:] == (st.node_id,):  # the old entry is already gone
            self._events.emit(
                K.EVENT_KIND_ADDRESS_CHANGED,
                node_id=st.node_id,
                address=entry.address,
                reason=f"moved from {mon.moved_from[0]}",
            )
        if other is not None and other is not entry:
            # A move only when the old address no longer answers as this node; else a duplicate.
            if await self._answers_as(other, st.node_id):
                self._set_health(
                    entry,
                    hp.rejected(
                        f"duplicate node id {st.node_id}: already serving at {other.address}; "
                        "give each node agent a unique --node-id"
                    ),
                )
                return False
            self._events.emit(
                K.EVENT_KIND_ADDRESS_CHANGED,
                node_id=st.node_id,
                address=entry.address,
                reason=f"moved from {other.address}",
            )
            entry.load = NodeLoad.moved(other.load)  # not yet routed to: its totals follow the node
            if (
                other.source == "mdns"
            ):  # a configured address stays, probing, until the config changes
                await self.remove(other, f"moved to {entry.address}")
        if entry.node_id and entry.node_id != st.node_id:  # a different node now answers here
            self._events.emit(
                K.EVENT_KIND_LEFT,
                node_id=entry.node_id,
                address=entry.address,
                reason=f"replaced at this address by {st.node_id}",
            )
        self._see(entry, node_id=st.node_id, health=hp.Health())
        self._events.emit(
            K.EVENT_KIND_JOINED,
            node_id=st.node_id,
            address=entry.address,
            reason=f"{_state(st)} {st.model.model_id} {st.model.weights_digest[:19]} "
            f"({entry.source})",
        )
        if len(mon.tasks) == 1:
            mon.tasks.append(asyncio.get_running_loop().create_task(self._watch(entry)))
        return True

    async def _watch(self, entry: NodeEntry) -> None:
        """Pushed readiness: NOT_SERVING stops routing at once; a broken stream is a signal."""
        backoff = WATCH_BACKOFF_S[0]
        while not self._closed:
            generation = entry.link.generation
            call = entry.link.watch()
            try:
                async for resp in call:
                    backoff = WATCH_BACKOFF_S[0]
                    self._serving(entry, resp.status == SERVING, "health watch")
            except grpc.aio.AioRpcError as err:
                if (
                    entry.link.generation != generation
                ):  # its channel was replaced (rotation): follow it
                    continue
                self._serving(entry, False, f"health watch broke ({err.code().name})")
                if (
                    err.code() == grpc.StatusCode.UNAVAILABLE
                    and entry.health.verdict in hp.ACCEPTING
                ):
                    self.report_failure(
                        entry, f"health watch stream broke: {err.details()}", hard=True
                    )
            finally:
                call.cancel()
            await asyncio.sleep(backoff)  # reconnect pacing, not synchronisation
            backoff = min(backoff * 2, WATCH_BACKOFF_S[1])

    def _serving(self, entry: NodeEntry, serving: bool, source: str) -> None:
        if serving == entry.serving:
            return
        self._see(entry, serving=serving)
        self._events.emit(
            K.EVENT_KIND_STATE_CHANGED,
            node_id=entry.node_id,
            address=entry.address,
            reason=f"{source}: {'SERVING' if serving else 'NOT_SERVING'}",
        )
        self.poke(entry)  # read the details
        self._on_change()


def _state(st: node_pb2.NodeStatus) -> str:
    name = common_pb2.Lifecycle.Name(st.lifecycle).removeprefix("LIFECYCLE_")
    return f"{name}{' (cordoned)' if st.cordoned else ''}"
