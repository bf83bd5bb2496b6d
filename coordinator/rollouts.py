"""Starting, controlling and resuming rollouts; the lease; the Rollout message.

One rollout runs at a time per state database. The coordinator holding the lease runs
it; the lease is renewed every third of its time-to-live, so a coordinator that died
frees it within `rollout_lease_s` and a restarted one, or a standby sharing the
database (it looks every third of the lease's time-to-live), resumes the rollout from its
recorded steps. The holder is unique per process
(certificate name, host, a random instance id), so two coordinators configured alike
never both hold it; its fencing token goes with every node operation (rollout_store.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

import grpc

from cluster.api import fleet_pb2
from cluster.config import RolloutSection
from cluster.digest import DIGEST_FORMAT, model_digest, weights_digest
from coordinator import health_policy as hp
from coordinator.events import EventLog
from coordinator.fleet import Fleet
from coordinator.rollout import Runner
from coordinator.rollout_store import (
    ACTIVE,
    DEFAULT_WAIT_TIMEOUT_S,
    TERMINAL_STEPS,
    Lease,
    NodeRow,
    RolloutRow,
    RolloutStore,
)

log = logging.getLogger(__name__)

ROLLOUT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
STATES = {
    s: fleet_pb2.RolloutState.Value(f"ROLLOUT_STATE_{s}")
    for s in ("RUNNING", "PAUSED", "SUCCEEDED", "FAILED", "ABORTED")
}


def lease_holder(settings) -> str:
    """This process's name on the rollout lease: certificate name @ host / random instance id."""
    name = settings.tls_name or settings.coordinator_id
    return f"{name}@{socket.gethostname()}/{secrets.token_hex(4)}"


class RolloutRefused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Rollouts:
    def __init__(
        self,
        *,
        settings: RolloutSection,
        holder: str,
        probe_timeout_s: float,
        fleet: Fleet,
        events: EventLog,
        gates,
        store: RolloutStore,
        audit=None,
    ):
        self._audit = audit
        self._s = settings
        self._probe_timeout_s = probe_timeout_s
        self._me = holder
        self._fleet = fleet
        self._events = events
        self._gates = gates
        self.store = store
        self._runner: Optional[Runner] = None
        self._task: Optional[asyncio.Task] = None
        self._lease_task: Optional[asyncio.Task] = None
        self._standby_task: Optional[asyncio.Task] = None
        self._wake = asyncio.Event()
        self._latest: Optional[RolloutRow] = None

    @property
    def holder(self) -> str:
        return self._me

    @property
    def latest(self) -> Optional[RolloutRow]:
        """The latest rollout as last read, for /metrics and the dashboard, which must not
        wait on the database: this coordinator's running one as it goes, else as read at
        start, on each command and every third of the lease's term (the standby's pace)."""
        runner = self._runner
        if runner is not None and (
            self._latest is None or runner.r.created >= self._latest.created
        ):
            return runner.r
        return self._latest

    def _saw(self, row: Optional[RolloutRow]) -> None:
        if row is not None and (self._latest is None or row.created >= self._latest.created):
            self._latest = row

    # -- lifecycle --------------------------------------------------------------------
    def resume_pending(self) -> None:
        """At start: pick up a rollout a previous coordinator left running or paused (read
        off the event loop, as every state database call here), then stand by."""
        self._standby_task = asyncio.get_running_loop().create_task(self._standby())

    async def _resume_pending(self) -> None:
        row = await asyncio.to_thread(self.store.active)
        self._saw(await asyncio.to_thread(self.store.get, ""))
        if row is not None:
            log.info(
                "rollout=%s %s: resuming (left by %s)", row.id, row.state, row.owner or "unknown"
            )
            self._lease_task = asyncio.get_running_loop().create_task(self._hold_lease(row))

    def _survey(self) -> tuple[Optional[RolloutRow], Optional[tuple], Optional[RolloutRow]]:
        """(the active rollout, the lease, the latest rollout): the standby's reads, in a thread."""
        return self.store.active(), self.store.lease(), self.store.get("")

    async def _standby(self) -> None:
        """While running: take over a running rollout whose holder died (another coordinator
        on this database, killed mid-rollout: its lease ran out and nobody renews it)."""
        try:
            await self._resume_pending()
        except Exception as exc:  # noqa: BLE001 - the database is down: the loop below looks again
            log.warning(
                "rollout resume at start: state database unreadable (%s); looking again",
                type(exc).__name__,
            )
        while True:
            await asyncio.sleep(self._s.rollout_lease_s / 3)  # the lease's own pace
            try:
                row, lease, latest = await asyncio.to_thread(self._survey)
            except Exception as exc:  # noqa: BLE001 - the state database is down: readiness says so; look again
                log.warning(
                    "rollout standby: state database unreadable (%s); looking again",
                    type(exc).__name__,
                )
                continue
            self._saw(latest)
            if self._lease_task is not None and not self._lease_task.done():
                continue  # this coordinator runs (or waits for) a rollout already
            if (
                row is None
                or row.state != "RUNNING"
                or (lease is not None and lease[1] > time.time())
            ):
                continue  # nothing running, or its holder is alive and renews the lease
            log.warning(
                "rollout=%s: its holder %s let the lease lapse; taking it over",
                row.id,
                row.owner or "unknown",
            )
            self._lease_task = asyncio.get_running_loop().create_task(self._hold_lease(row))

    async def close(self) -> None:
        for task in (self._task, self._lease_task, self._standby_task):
            if task is not None:
                task.cancel()
        await asyncio.to_thread(self.store.release, self._me)
        await asyncio.to_thread(self.store.close)

    async def _hold_lease(self, row: RolloutRow) -> None:
        """Take the lease (waiting while another live coordinator holds it), run, renew."""
        ttl = self._s.rollout_lease_s
        while not (lease := await asyncio.to_thread(self.store.acquire, self._me, ttl)).held:
            log.warning("rollout=%s waiting: %s", row.id, lease.refused)
            await asyncio.sleep(ttl / 3)  # the lease's own pace: a third of its time-to-live
        # Read the plan again now that it is ours: while this coordinator waited, the holder
        # may have recorded more steps, or ended the rollout (then there is nothing to run).
        row = await asyncio.to_thread(self.store.get, row.id)
        if row is None or row.state not in ACTIVE:
            await asyncio.to_thread(self.store.release, self._me)
            return
        log.info("rollout=%s lease held by %s (fencing token %d)", row.id, self._me, lease.token)
        await asyncio.to_thread(self.store.set_owner, row.id, self._me)
        row.owner = self._me
        self._launch(row, lease)
        while self._task is not None and not self._task.done():
            await asyncio.wait(
                {self._task}, timeout=ttl / 3
            )  # renew every third of the ttl; free it at the end
            if self._task.done():
                break
            renewed = await asyncio.to_thread(self.store.acquire, self._me, ttl)
            if renewed.token != lease.token:  # only after we stalled past the ttl
                log.error(
                    "rollout=%s lost the lease (fencing token %d); stopping here",
                    row.id,
                    lease.token,
                )
                self._task.cancel()
                return
        await asyncio.to_thread(self.store.release, self._me)

    def _launch(self, row: RolloutRow, lease: Lease) -> None:
        self._runner = Runner(
            row,
            store=self.store,
            fleet=self._fleet,
            events=self._events,
            gates=self._gates,
            wake=self._wake,
            audit=self._audit,
            fence=lease,
            poll_s=self._s.rollout_lease_s / 3,
        )
        self._task = asyncio.get_running_loop().create_task(self._runner.run())

    # -- operator commands ------------------------------------------------------------
    async def start(self, req: fleet_pb2.StartRolloutRequest, started_by: str) -> RolloutRow:
        t = fleet_pb2.RolloutTarget()
        t.CopyFrom(req.target)
        await self._check_target(t)
        rid = req.rollout_id or f"r-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        if not ROLLOUT_ID.fullmatch(rid):
            raise RolloutRefused(
                grpc.StatusCode.INVALID_ARGUMENT, "rollout_id must be 1-64 of [A-Za-z0-9._-]"
            )
        if await asyncio.to_thread(self.store.get, rid) is not None:
            raise RolloutRefused(
                grpc.StatusCode.ALREADY_EXISTS, f"rollout {rid} exists; choose another id"
            )
        active = await asyncio.to_thread(self.store.active)
        if active is not None:
            raise RolloutRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rollout {active.id} is {active.state.lower()}; resume or abort it first",
            )
        if req.engine and not ROLLOUT_ID.fullmatch(req.engine):
            raise RolloutRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "engine must be an engine name such as mlx or vllm",
            )
        nodes = self._pick_nodes(list(req.node_ids), req.engine)
        k = req.max_unavailable or 1
        if len(nodes) > 1 and k >= len(nodes):
            raise RolloutRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_unavailable {k} would take all {len(nodes)} nodes out at once; "
                f"use at most {len(nodes) - 1}",
            )
        drain_timeout = req.drain_timeout_s or 120.0
        if not 0 < drain_timeout <= 86_400:
            raise RolloutRefused(
                grpc.StatusCode.INVALID_ARGUMENT, "drain_timeout_s must be in (0, 86400]"
            )
        wait_timeout = req.wait_timeout_s or DEFAULT_WAIT_TIMEOUT_S
        if not 0 < wait_timeout <= 86_400:
            raise RolloutRefused(
                grpc.StatusCode.INVALID_ARGUMENT, "wait_timeout_s must be in (0, 86400]"
            )
        if not t.restart:
            self._check_model_id(t, nodes, req.rename_model)
        out = await self._cordoned(
            nodes
        )  # the operator's: updated first (no capacity lost), left out after
        nodes = sorted(
            nodes, key=lambda n: (n not in out, self._serving(n))
        )  # then any other not serving
        lease = await asyncio.to_thread(self.store.acquire, self._me, self._s.rollout_lease_s)
        if not lease.held:
            raise RolloutRefused(
                grpc.StatusCode.FAILED_PRECONDITION, f"{lease.refused}; try again later"
            )
        row = RolloutRow(
            id=rid,
            state="RUNNING",
            target=t,
            max_unavailable=k,
            drain_timeout_s=drain_timeout,
            owner=self._me,
            started_by=started_by,
            nodes=[NodeRow(n, kept_out=n in out) for n in nodes],
            wait_timeout_s=wait_timeout,
        )
        await asyncio.to_thread(self.store.create, row)
        self._events.emit(
            fleet_pb2.EVENT_KIND_ROLLOUT,
            reason=f"started by {started_by}: {len(nodes)} nodes, max unavailable {k}",
            rollout_id=rid,
            step="start",
        )
        row = await asyncio.to_thread(self.store.get, rid)
        self._saw(row)
        self._lease_task = asyncio.get_running_loop().create_task(self._hold_lease(row))
        return row

    async def _check_target(self, t: fleet_pb2.RolloutTarget) -> None:
        bad = lambda msg: RolloutRefused(grpc.StatusCode.INVALID_ARGUMENT, msg)  # noqa: E731
        if t.restart:
            if t.model_path or t.weights_digest:
                raise bad("a release restart takes no model; start a separate model rollout")
            return
        if not t.model_path or not Path(t.model_path).is_absolute():
            raise bad("target.model_path must be an absolute model directory path")
        path = Path(t.model_path)
        if t.weights_digest and not DIGEST_FORMAT.fullmatch(t.weights_digest):
            raise bad("target.weights_digest must be sha256: followed by 64 hex digits")
        if t.shared_path:  # the nodes read the path; this host may not see it
            if not t.weights_digest:
                raise bad(
                    "a shared-path rollout needs target.weights_digest (fleetctl model digest DIR)"
                )
            return
        if not path.is_dir():
            raise bad(
                f"{path} is not a directory on the coordinator's host; give the model's path here, "
                "or --shared-path if only the nodes see it"
            )
        try:
            actual = await asyncio.to_thread(weights_digest, path)
        except OSError as exc:
            raise bad(f"{path} cannot be read: {exc}") from None
        if t.weights_digest and t.weights_digest != actual:
            raise bad(
                f"{path} hashes to {actual[:19]}, not the expected {t.weights_digest[:19]}; "
                "check you point at the right version"
            )
        t.weights_digest = actual

    async def _cordoned(self, nodes: list[str]) -> set[str]:
        """The nodes cordoned (or drained) now, as each node says: read fresh, since this
        coordinator's view may lag a poll (a node another coordinator just uncordoned)."""

        async def cordoned(node_id: str) -> bool:
            entry = self._fleet.by_id(node_id)
            try:
                st = await entry.link.status(self._probe_timeout_s)
            except Exception:  # noqa: BLE001 - unreachable now: go by the last status seen
                st = entry.status
            return st is not None and st.cordoned

        flags = await asyncio.gather(*(cordoned(n) for n in nodes))
        return {n for n, flag in zip(nodes, flags) if flag}

    def _serving(self, node_id: str) -> bool:
        entry = self._fleet.by_id(node_id)
        return entry is not None and entry.routable

    def _check_model_id(self, t: fleet_pb2.RolloutTarget, nodes: list[str], rename: bool) -> None:
        """A rollout keeps the model id the nodes serve (the id clients ask for: OpenAI's
        `model`); a different one only with `rename` (fleetctl asks, or --yes)."""
        current = sorted(
            {e.model_id for n in nodes if (e := self._fleet.by_id(n)) is not None and e.model_id}
        )
        if not t.model_id:
            if len(current) > 1:
                raise RolloutRefused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the nodes serve several model ids ({', '.join(current)}); give --model-id "
                    "(or roll each id out with --node)",
                )
            t.model_id = current[0] if current else Path(t.model_path).name
            return
        renamed = [c for c in current if c != t.model_id]
        same = [
            n
            for n in nodes
            if renamed
            and (e := self._fleet.by_id(n)) is not None
            and e.status is not None
            and model_digest(e.status) == t.weights_digest
        ]
        if same:
            raise RolloutRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {same[0]} already serves these weights; a rollout renames a model only "
                "along with new weights (restart the node with --model-id to rename it alone)",
            )
        if renamed and not rename:
            raise RolloutRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this rollout would rename the served model {', '.join(renamed)} to {t.model_id}: "
                f"clients asking for {renamed[0]!r} would get 404 model_not_found. Drop --model-id "
                "to keep the id, or confirm the rename (fleetctl asks; --yes)",
            )

    def _pick_nodes(self, wanted: list[str], engine: str = "") -> list[str]:
        """The verified nodes to update (of one engine if given: weights are per engine)."""
        entries = [
            e
            for e in self._fleet.entries.values()
            if e.node_id and e.health.verdict is not hp.Verdict.REJECTED
        ]
        known = sorted(e.node_id for e in entries)
        if engine:
            known = sorted(
                e.node_id
                for e in entries
                if e.status is not None and e.status.model.engine == engine
            )
        if not wanted:
            if not known:
                raise RolloutRefused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the fleet has no verified {engine + ' ' if engine else ''}nodes",
                )
            return known
        missing = [n for n in wanted if n not in known]
        if missing or len(set(wanted)) != len(wanted):
            raise RolloutRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown or repeated {engine + ' ' if engine else ''}node ids {missing or wanted}; "
                f"known: {', '.join(known) or 'none'}",
            )
        return wanted

    async def control(self, rollout_id: str, action: str) -> RolloutRow:
        """Pause, resume or abort, through any coordinator on the database: the state is
        recorded there, and the runner (here or on another coordinator) reads it before each
        node it starts, and every third of the lease's term while paused."""
        if rollout_id:
            row = await asyncio.to_thread(self.store.get, rollout_id)
        else:
            row = await asyncio.to_thread(self.store.active)
        if row is None:
            raise RolloutRefused(
                grpc.StatusCode.NOT_FOUND, f"no rollout {rollout_id or 'is running'}"
            )
        allowed = {"pause": ("RUNNING",), "resume": ("PAUSED",), "abort": ("RUNNING", "PAUSED")}[
            action
        ]
        if row.state not in allowed:
            raise RolloutRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rollout {row.id} is {row.state.lower()}; cannot {action} it",
            )
        state = {"pause": "PAUSED", "resume": "RUNNING", "abort": "ABORTED"}[action]
        busy = [n.node_id for n in row.nodes if n.step not in ("pending", *TERMINAL_STEPS)]
        under_way = f"node {', '.join(busy)} finishes its step, " if busy else ""
        message = {
            "pause": f"paused: {under_way}no new node starts",
            "resume": "resumed",
            "abort": f"aborted: {under_way}no new node starts",
        }[action]
        await asyncio.to_thread(self.store.set_state, row.id, state, message)
        self._events.emit(
            fleet_pb2.EVENT_KIND_ROLLOUT, reason=message, rollout_id=row.id, step=action
        )
        self._wake.set()
        row = await asyncio.to_thread(self.store.get, row.id)
        self._saw(row)
        if action == "resume" and await self._runs_nowhere():
            # Its runner's coordinator is gone (or it never ran here): this one takes it on.
            self._lease_task = asyncio.get_running_loop().create_task(self._hold_lease(row))
        return row

    async def _runs_nowhere(self) -> bool:
        """No runner here, none waiting for the lease here, and no live lease elsewhere (a
        live holder's runner reads the resume from the database itself)."""
        if self._task is not None and not self._task.done():
            return False
        if self._lease_task is not None and not self._lease_task.done():
            return False
        lease = await asyncio.to_thread(self.store.lease)
        return lease is None or lease[0] == self._me or lease[1] <= time.time()

    async def get(self, rollout_id: str) -> RolloutRow:
        row = await asyncio.to_thread(self.store.get, rollout_id)
        if row is None:
            raise RolloutRefused(
                grpc.StatusCode.NOT_FOUND,
                f"no rollout {rollout_id}"
                if rollout_id
                else "no rollout has run on this coordinator's state database",
            )
        return row

    def to_proto(self, row: RolloutRow) -> fleet_pb2.Rollout:
        progress = self._runner.progress if self._runner and self._runner.r.id == row.id else {}
        return fleet_pb2.Rollout(
            rollout_id=row.id,
            state=STATES[row.state],
            target=row.target,
            max_unavailable=row.max_unavailable,
            message=row.message,
            created_unix_s=row.created,
            updated_unix_s=row.updated,
            owner=row.owner,
            started_by=row.started_by,
            nodes=[
                fleet_pb2.RolloutNode(
                    node_id=n.node_id,
                    step=n.step,
                    from_digest=n.from_digest,
                    message=n.message,
                    started_unix_s=n.started,
                    finished_unix_s=n.finished,
                    bytes_done=progress.get(n.node_id, (0, 0))[0],
                    bytes_total=progress.get(n.node_id, (0, 0))[1],
                )
                for n in row.nodes
            ],
        )
