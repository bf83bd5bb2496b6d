"""Rolling updates: one node (or `max_unavailable`) at a time, every step recorded first.

Per node: stage (while it still serves) -> wait for spare capacity -> drain -> activate
-> gates (smoke, then the operator's) -> rejoin (uncordon). A failed stage leaves the node
untouched; a failed activation or gate puts the node back on its previous weights and
stops the rollout. A release restart replaces stage+activate with a restart of the agent.

Every node call carries an operation id derived from the rollout, node and step, so
re-running a step after a coordinator restart returns the node's record instead of
acting twice; nodes already done are not touched again. Every node call also carries the
rollout lease's fencing token and every recorded step checks it: once another coordinator
has taken the lease over, this runner's calls are refused by the nodes and it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Optional

from cluster.api import common_pb2, fleet_pb2, node_pb2
from cluster.digest import model_digest
from cluster.wording import plural
from coordinator.events import EventLog
from coordinator.fleet import Fleet, NodeEntry
from coordinator.gates import GateContext
from coordinator.node_ops import CALL_TIMEOUT_S, OpFailed, wait_op
from coordinator.records import Caller, CallRecord
from coordinator.rollout_store import (
    TERMINAL_STEPS,
    Lease,
    LeaseLost,
    NodeRow,
    RolloutRow,
    RolloutStore,
)
from coordinator.weights_push import manifest_for, push_weights

log = logging.getLogger(__name__)

K = fleet_pb2
READY, DRAINED = common_pb2.LIFECYCLE_READY, common_pb2.LIFECYCLE_DRAINED
STAGE_TIMEOUT_S = 6 * 3600.0
LOAD_TIMEOUT_S = 1800.0  # activate: unload, load, warm up a large model
RESTART_WAIT_S = 600.0


class Blocked(Exception):
    """A wait (for a node to be discovered, for capacity) ran past the rollout's wait
    timeout: the rollout pauses with this message, which names what blocks it and the
    command that unblocks it."""


class Runner:
    """Runs one rollout to its end; `Rollouts` owns starting, pausing and resuming it."""

    def __init__(
        self,
        row: RolloutRow,
        *,
        store: RolloutStore,
        fleet: Fleet,
        events: EventLog,
        gates,
        wake: asyncio.Event,
        fence: Lease,
        audit=None,
        poll_s: float = 5.0,
    ):
        self.r = row
        self._poll_s = poll_s  # paused: how often the state is read again
        self.fence = fence  # the lease this runner acts under
        self._token = fence.token
        self._audit = audit
        self._store = store
        self._fleet = fleet
        self._events = events
        self._gates = gates
        self._wake = wake
        self.progress: dict[str, tuple[int, int]] = {}  # node id -> staged bytes (done, total)

    async def run(self) -> None:
        r = self.r
        try:
            while True:
                fresh = await asyncio.to_thread(self._store.get, r.id)
                r.state, r.message = fresh.state, fresh.message
                if r.state == "PAUSED":
                    # Resumed here (wake), or through another coordinator on the database
                    # (read again at the lease's pace).
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_s)
                    continue
                if r.state != "RUNNING":
                    return
                pending = [n for n in r.nodes if n.step not in TERMINAL_STEPS]
                if not pending:
                    await self._finish("SUCCEEDED", f"{len(r.nodes)} nodes on {_target(r.target)}")
                    return
                batch = pending[: r.max_unavailable]
                results = await asyncio.gather(
                    *(self._node(n) for n in batch), return_exceptions=True
                )
                for out in results:
                    if isinstance(out, BaseException) and not isinstance(out, Blocked):
                        raise out
                failed = [n for n, ok in zip(batch, results) if ok is False]
                if failed:
                    await self._finish(
                        "FAILED",
                        "; ".join(f"node {n.node_id}: {n.message}" for n in failed)
                        + "; the nodes not yet updated were left as they were",
                    )
                    return
                blocked = [str(b) for b in results if isinstance(b, Blocked)]
                if blocked:
                    await self._pause(
                        "; ".join(blocked) + f"; then `fleetctl rollout resume {r.id}` "
                        f"(or `fleetctl rollout abort {r.id}`)"
                    )
        except asyncio.CancelledError:
            raise
        except LeaseLost as exc:  # another coordinator runs the rollout now: record nothing more
            log.error("rollout=%s stopped: %s", r.id, exc)
        except Exception as exc:  # noqa: BLE001 - recorded; a rollout never vanishes silently
            log.exception("rollout=%s internal error", r.id)
            await self._finish(
                "FAILED",
                f"internal error in the coordinator ({type(exc).__name__}: {exc}); "
                "see its log, then start a new rollout",
            )

    async def _finish(self, state: str, message: str) -> None:
        self.r.state, self.r.message = state, message
        await asyncio.to_thread(self._store.set_state, self.r.id, state, message, fence=self.fence)
        self._events.emit(
            K.EVENT_KIND_ROLLOUT,
            reason=f"{state.lower()}: {message}",
            rollout_id=self.r.id,
            step=state.lower(),
        )

    async def _pause(self, message: str) -> None:
        """Stop starting nodes until an operator resumes (a wait ran out: see Blocked)."""
        self.r.state, self.r.message = "PAUSED", f"paused: {message}"
        await asyncio.to_thread(
            self._store.set_state, self.r.id, "PAUSED", self.r.message, fence=self.fence
        )
        self._events.emit(
            K.EVENT_KIND_ROLLOUT, reason=self.r.message, rollout_id=self.r.id, step="pause"
        )
        log.warning("rollout=%s %s", self.r.id, self.r.message)

    async def _step(self, n: NodeRow, step: str, message: str) -> None:
        n.step, n.message = step, message
        n.started = n.started or time.time()
        if step in TERMINAL_STEPS:
            n.finished = time.time()
        await asyncio.to_thread(self._store.set_step, self.r.id, n, fence=self.fence)
        self._events.emit(
            K.EVENT_KIND_ROLLOUT, node_id=n.node_id, reason=message, rollout_id=self.r.id, step=step
        )
        if (
            step in TERMINAL_STEPS and self._audit is not None
        ):  # who changed which node's weights, and how it ended
            self._audit.submit(
                CallRecord(
                    "admin",
                    "rollout.node",
                    Caller(self.r.started_by, "operator", "", self.r.owner),
                    step,
                    "OK" if step == "done" else "FAILED",
                    {
                        "rollout_id": self.r.id,
                        "node_id": n.node_id,
                        "from_digest": n.from_digest,
                        "to_digest": self.r.target.weights_digest,
                        "reason": message[:300],
                    },
                )
            )

    def _op(self, n: NodeRow, step: str) -> str:
        return f"{self.r.id}/{n.node_id}/{step}"

    # -- one node ---------------------------------------------------------------------
    async def _node(self, n: NodeRow) -> bool:
        t = self.r.target
        entry: Optional[NodeEntry] = None
        try:
            entry = await self._entry(n.node_id)
            st = await entry.link.status(CALL_TIMEOUT_S)
            serving = model_digest(st)  # a node group's is the model's own, not its layout's
            if not n.from_digest:
                n.from_digest = serving
            if t.restart:
                await self._restart(n, entry)
            elif serving != t.weights_digest:
                await self._stage(n, entry)
                failure = await self._prepare_gates(n, entry)
                if failure:
                    await self._step(n, "failed", f"{failure}; the node was left as it was")
                    return False
                await self._drain(n, entry)
                await self._step(n, "activate", f"activating {_target(t)}")
                try:
                    await wait_op(
                        lambda: entry.link.ops.Activate(
                            node_pb2.ActivateRequest(
                                operation_id=self._op(n, "activate"),
                                weights_digest=t.weights_digest,
                                fencing_token=self._token,
                            ),
                            timeout=CALL_TIMEOUT_S,
                        ),
                        what=f"activate on node {n.node_id}",
                        timeout_s=LOAD_TIMEOUT_S,
                    )
                except OpFailed as exc:  # the node went back to its previous weights by itself
                    await self._uncordon(n, entry, "rollback")
                    await self._step(
                        n, "rolled_back", f"{exc}; the node serves its previous weights again"
                    )
                    return False
            elif n.kept_out or (not st.cordoned and st.lifecycle == READY):
                await self._step(n, "done", f"already on {t.weights_digest[:19]}")
                return True
            failure = await self._gate(n, entry)
            if failure:
                await self._roll_back(n, entry, failure)
                return False
            if n.kept_out:  # the operator took it out before the rollout: it stays out
                await self._step(
                    n,
                    "done",
                    f"updated to {_target(t)}; left out of service as it was found "
                    f"(`fleetctl uncordon {n.node_id}` brings it back)",
                )
                return True
            await self._uncordon(n, entry, "rejoin")
            await self._step(n, "done", f"serving {_target(t)}")
            return True
        except OpFailed as exc:
            message = str(exc)
            if (
                n.step == "drain" and entry is not None
            ):  # cordoned by this rollout, never swapped: release it
                try:
                    await self._uncordon(n, entry, "release")
                    message += "; the node was uncordoned and serves as before"
                except OpFailed as again:
                    message += f"; uncordoning it failed too ({again}): uncordon it by hand"
            await self._step(n, "failed", message)
            return False

    async def _entry(self, node_id: str) -> NodeEntry:
        deadline = time.monotonic() + self.r.wait_timeout_s
        while time.monotonic() < deadline:
            entry = self._fleet.by_id(node_id)
            if entry is not None and entry.status is not None:
                return entry
            await asyncio.sleep(0.2)  # waiting for discovery to (re)find it
        raise Blocked(
            f"node {node_id} was not in this coordinator's fleet view for {self.r.wait_timeout_s:g}s: "
            f"start it or check its discovery (`fleetctl nodes`; a static --node address), or leave it "
            "out of the rollout (--node)"
        )

    async def _stage(self, n: NodeRow, entry: NodeEntry) -> None:
        t = self.r.target
        await self._step(
            n, "stage", f"staging {_target(t)} ({'shared path' if t.shared_path else 'push'})"
        )
        op = self._op(n, "stage")

        def seen(st: node_pb2.NodeStatus) -> None:
            for m in st.staged:
                if m.weights_digest == t.weights_digest:
                    self.progress[n.node_id] = (m.bytes_done, m.bytes_total)

        if t.shared_path:
            await wait_op(
                lambda: entry.link.ops.StageModel(
                    node_pb2.StageModelRequest(
                        operation_id=op,
                        source_path=t.model_path,
                        model_id=t.model_id,
                        version=t.version,
                        expected_digest=t.weights_digest,
                        fencing_token=self._token,
                    ),
                    timeout=CALL_TIMEOUT_S,
                ),
                what=f"stage on node {n.node_id}",
                timeout_s=STAGE_TIMEOUT_S,
                on_status=seen,
            )
            return
        if entry.status is not None and entry.status.group.size:
            raise OpFailed(
                f"node {n.node_id} is a node group of {entry.status.group.size} ranks: pushed "
                "weights would reach rank 0 only; put the model at one path on every rank's "
                "host and start the rollout with --shared-path (docs/node-groups.md)"
            )
        manifest = await asyncio.to_thread(
            manifest_for,
            Path(t.model_path),
            operation_id=op,
            model_id=t.model_id,
            version=t.version,
            expected_digest=t.weights_digest,
            fencing_token=self._token,
        )
        try:
            reply = await push_weights(
                entry.link.ops,
                manifest,
                Path(t.model_path),
                progress=lambda done, total: self.progress.__setitem__(n.node_id, (done, total)),
            )
        except Exception as exc:  # noqa: BLE001 - a broken push leaves the node as it was
            raise OpFailed(f"pushing weights to node {n.node_id} failed: {exc}") from None
        if reply.operation.state != node_pb2.OPERATION_STATE_DONE:
            raise OpFailed(f"stage on node {n.node_id}: {reply.operation.message}")

    async def _drain(self, n: NodeRow, entry: NodeEntry) -> None:
        await self._wait_capacity(n)
        await self._step(n, "drain", f"draining (deadline {self.r.drain_timeout_s:g}s)")
        await wait_op(
            lambda: entry.link.ops.Drain(
                node_pb2.DrainRequest(
                    operation_id=self._op(n, "drain"),
                    timeout_s=self.r.drain_timeout_s,
                    reason=f"rollout {self.r.id}",
                    fencing_token=self._token,
                ),
                timeout=CALL_TIMEOUT_S,
            ),
            what=f"drain of node {n.node_id}",
            timeout_s=self.r.drain_timeout_s + 60,
        )

    async def _wait_capacity(self, n: NodeRow) -> None:
        """Make before break: drain only while enough other nodes serve. A node already out
        of service costs no capacity; a wait past the rollout's wait timeout pauses it."""
        if n.kept_out:
            return
        need = max(1, len(self.r.nodes) - self.r.max_unavailable) if len(self.r.nodes) > 1 else 0
        deadline = time.monotonic() + self.r.wait_timeout_s
        shown = ""
        while sum(e.node_id != n.node_id for e in self._fleet.routable()) < need:
            why = (
                f"node {n.node_id} waits for {plural(need, 'other node')} to serve before it drains; "
                + self._blocking(n.node_id)
            )
            if time.monotonic() > deadline:
                raise Blocked(f"{why} (waited {self.r.wait_timeout_s:g}s)")
            if why != shown:
                await self._step(n, "wait", why)
                shown = why
            await asyncio.sleep(0.2)

    def _blocking(self, node_id: str) -> str:
        """Which nodes of this rollout do not serve, why, and the command that brings each back."""
        parts = []
        for other in self.r.nodes:
            entry = self._fleet.by_id(other.node_id)
            if other.node_id == node_id or (entry is not None and entry.routable):
                continue
            st = entry.status if entry is not None else None
            if st is None:
                parts.append(
                    f"node {other.node_id} is not reachable (`fleetctl node show {other.node_id}`)"
                )
            elif st.cordoned or st.lifecycle == DRAINED:
                state = "drained" if st.lifecycle == DRAINED else "cordoned"
                parts.append(
                    f"node {other.node_id} is {state} (`fleetctl uncordon {other.node_id}`)"
                )
            else:
                state = common_pb2.Lifecycle.Name(st.lifecycle).removeprefix("LIFECYCLE_").lower()
                parts.append(
                    f"node {other.node_id} is {state}, {entry.health.reason or 'not routable'} "
                    f"(`fleetctl node show {other.node_id}`)"
                )
        return "; ".join(parts) or "no other node of this rollout serves"

    async def _prepare_gates(self, n: NodeRow, entry: NodeEntry) -> Optional[str]:
        """Gates that measure the current version first (the eval gate's baseline), on the
        node while it still serves it."""
        ctx = GateContext(
            self.r.id, n.node_id, entry.address, entry.link, n.from_digest, _group(entry)
        )
        for gate in self._gates:
            prepare = getattr(gate, "prepare", None)
            if prepare is None:
                continue
            await self._step(
                n, "gate", f"{gate.name}: scoring the current version {n.from_digest[:19]}"
            )
            why = await prepare(ctx)
            if why:
                return f"{gate.name} gate: {why}"
        return None

    async def _gate(self, n: NodeRow, entry: NodeEntry) -> Optional[str]:
        await self._step(n, "gate", ", ".join(g.name for g in self._gates))
        ctx = GateContext(
            self.r.id,
            n.node_id,
            entry.address,
            entry.link,
            self.r.target.weights_digest,
            _group(entry),
        )
        for gate in self._gates:
            why = await gate.check(ctx)
            if why:
                return f"{gate.name} gate: {why}"
        return None

    async def _uncordon(self, n: NodeRow, entry: NodeEntry, step: str) -> None:
        await wait_op(
            lambda: entry.link.ops.Cordon(
                node_pb2.CordonRequest(
                    operation_id=self._op(n, step),
                    cordoned=False,
                    reason=f"rollout {self.r.id}",
                    fencing_token=self._token,
                ),
                timeout=CALL_TIMEOUT_S,
            ),
            what=f"uncordon of node {n.node_id}",
            timeout_s=60,
        )
        deadline = time.monotonic() + 30
        while not entry.routable and time.monotonic() < deadline:
            self._fleet.poke(entry)  # read its status now rather than at the next poll
            await asyncio.sleep(0.05)

    async def _roll_back(self, n: NodeRow, entry: NodeEntry, failure: str) -> None:
        await self._step(n, "rollback", f"{failure}; going back to {n.from_digest[:19]}")
        try:
            await wait_op(
                lambda: entry.link.ops.Drain(
                    node_pb2.DrainRequest(
                        operation_id=self._op(n, "rollback-drain"),
                        timeout_s=self.r.drain_timeout_s,
                        reason=f"rollback {self.r.id}",
                        fencing_token=self._token,
                    ),
                    timeout=CALL_TIMEOUT_S,
                ),
                what=f"drain of node {n.node_id}",
                timeout_s=self.r.drain_timeout_s + 60,
            )
            if not self.r.target.restart:
                await wait_op(
                    lambda: entry.link.ops.Activate(
                        node_pb2.ActivateRequest(
                            operation_id=self._op(n, "rollback"),
                            previous=True,
                            fencing_token=self._token,
                        ),
                        timeout=CALL_TIMEOUT_S,
                    ),
                    what=f"rollback of node {n.node_id}",
                    timeout_s=LOAD_TIMEOUT_S,
                )
            await self._uncordon(n, entry, "rollback-uncordon")
        except OpFailed as exc:
            await self._step(
                n,
                "failed",
                f"{failure}; rollback failed too: {exc}; the node stays cordoned, "
                "fix it by hand (fleetctl node status)",
            )
            return
        await self._step(n, "rolled_back", f"{failure}; back on {n.from_digest[:19]} and serving")

    async def _restart(self, n: NodeRow, entry: NodeEntry) -> None:
        """A release restart: drain, ask the agent to exit for its service manager, wait for
        the new process to come back (drained: its drain is kept across the restart)."""
        await self._drain(n, entry)
        await self._step(n, "restart", "restarting the node agent")
        asked = time.monotonic()
        await wait_op(
            lambda: entry.link.ops.Restart(
                node_pb2.RestartRequest(
                    operation_id=self._op(n, "restart"), fencing_token=self._token
                ),
                timeout=CALL_TIMEOUT_S,
            ),
            what=f"restart of node {n.node_id}",
            timeout_s=60,
        )
        while True:
            if time.monotonic() - asked > RESTART_WAIT_S:
                raise OpFailed(
                    f"node {n.node_id} did not come back within {RESTART_WAIT_S:g}s of its restart; "
                    "check its service manager (launchctl print / systemctl status)"
                )
            try:
                st = await entry.link.status(CALL_TIMEOUT_S)
                if st.uptime_s < time.monotonic() - asked and st.lifecycle in (READY, DRAINED):
                    return
            except Exception:  # noqa: BLE001 - it is down while it restarts
                pass
            await asyncio.sleep(0.5)


def _target(t: fleet_pb2.RolloutTarget) -> str:
    if t.restart:
        return "a restarted release"
    return f"{t.model_id} {t.version} {t.weights_digest[:19]}".replace("  ", " ")


def _group(entry: NodeEntry) -> Optional[node_pb2.NodeGroup]:
    """A node group's shape (what its generations' digest adds to the model's); None if single."""
    return entry.status.group if entry.status is not None and entry.status.group.size else None
