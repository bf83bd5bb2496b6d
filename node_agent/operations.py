"""Node operations: cordon, drain, stage, activate and restart, each under an operation id.

Repeating an operation id returns that operation's record and never runs it twice (a
coordinator retrying after a timeout, or after the node restarted, is safe). Long steps
(drain, stage, activate, restart) run in the background; GetStatus shows their progress
and the record's final state. Every change of cordon, drain or model is saved before it
is reported (node_state.py).

Fencing: a coordinator running a rollout sends its lease's fencing token with each
operation. The node keeps the newest token it accepted (saved before the operation
starts) and refuses an older one, so a coordinator that lost the lease while stalled
cannot act on the node after the new holder has. Token 0 is an operator's own command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Awaitable, Callable, Optional

import grpc

from cluster.api import common_pb2, node_pb2
from cluster.logs import fields
from cluster.wording import plural
from node_agent.lifecycle import Lifecycle, State
from node_agent.node_state import ModelRef, NodeState, OperationRecord
from node_agent.requests import NodeStopping, RequestRegistry
from node_agent.staging import StagingArea, StagingError

log = logging.getLogger(__name__)

RESTART_EXIT_CODE = (
    75  # EX_TEMPFAIL: the service manager (launchd KeepAlive, systemd) starts it again
)
_STATES = {
    "running": node_pb2.OPERATION_STATE_RUNNING,
    "done": node_pb2.OPERATION_STATE_DONE,
    "failed": node_pb2.OPERATION_STATE_FAILED,
}


class OperationError(Exception):
    """Refused before it started: answered with `code` and nothing changes."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Operations:
    """The node's operations over its parts; what only the agent can do (enter a state,
    load a model, restart) it asks for through the callbacks it was given."""

    def __init__(
        self,
        *,
        node_id: str,
        state: NodeState,
        state_dir: Path,
        lifecycle: Lifecycle,
        registry: RequestRegistry,
        staging: StagingArea,
        drain_timeout_s: float,
        configured_model: ModelRef,
        model_info: Callable[[], common_pb2.ModelInfo],
        enter: Callable[[State, str], Awaitable[None]],
        load_and_warm: Callable[[ModelRef], Awaitable[bool]],
        request_restart: Callable[[], None],
    ):
        self.node_id = node_id
        self.state = state
        self.state_dir = state_dir
        self._lifecycle = lifecycle
        self._registry = registry
        self._staging = staging
        self._drain_timeout_s = drain_timeout_s
        self._configured_model = configured_model
        self._model_info = model_info  # -> what the node serves now
        self._enter = enter  # (state, reason): the lifecycle and health together
        self._load_and_warm = load_and_warm  # (model) -> loaded and warmed up; never raises
        self._request_restart = request_restart
        self.drain_deadline: Optional[float] = None  # monotonic, while DRAINING
        self._drain_task: Optional[asyncio.Task] = None
        self._busy: Optional[str] = None  # the model operation under way (stage runs beside)
        self._tasks: set[asyncio.Task] = set()
        self._saving = asyncio.Lock()  # one state-file write at a time, in order
        # A node group (node_agent/group_ops.py): the model's own digest it serves (what is
        # staged and activated; its ModelInfo's adds the layout), and on rank 0 the other
        # ranks' staging, awaited with its own: (op_id, source, model_id, version, expected)
        # -> what to add to the done message, or OperationError naming the rank.
        self.serving_digest: Callable[[], str] = lambda: self._model_info().weights_digest
        self.stage_on_other_ranks: Optional[Callable[..., Awaitable[str]]] = None

    # -- fencing ----------------------------------------------------------------------
    async def fence(self, token: int) -> None:
        """Accept `token` (0: unfenced) or refuse it as older than the newest seen; a newer
        one is saved before the operation it comes with starts (fences run one at a time)."""
        if token == 0:
            return
        async with self._saving:
            newest = self.state.fencing_token
            if token < newest:
                raise OperationError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {self.node_id}: fencing token {token} is older than {newest}, the "
                    "newest this node has accepted: the coordinator sending it no longer holds "
                    "the rollout lease (another coordinator took it over); nothing was done",
                )
            if token > newest:
                log.info(
                    "node=%s fencing token %d -> %d (a new rollout lease holder)",
                    self.node_id,
                    newest,
                    token,
                    extra=fields(event="node.fencing_token", node_id=self.node_id),
                )
                self.state.fencing_token = token
                try:
                    await self._write()
                except BaseException:
                    self.state.fencing_token = newest  # not durable: not accepted
                    raise

    # -- records ----------------------------------------------------------------------
    def find(self, op_id: str) -> Optional[OperationRecord]:
        return next((r for r in reversed(self.state.operations) if r.operation_id == op_id), None)

    def _begin(self, op_id: str, kind: str) -> tuple[OperationRecord, bool]:
        """The record for `op_id` and whether it is new; the same id for another kind is refused."""
        rec = self.find(op_id)
        if rec is not None:
            if rec.kind != kind:
                raise OperationError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"node {self.node_id}: operation id {op_id} was a {rec.kind}, "
                    f"not a {kind}; use a new operation id",
                )
            return rec, False
        rec = OperationRecord(op_id, kind, started=time.time())
        self.state.operations.append(rec)
        return rec, True

    async def _end(self, rec: OperationRecord, ok: bool, message: str) -> OperationRecord:
        rec.state, rec.message, rec.finished = "done" if ok else "failed", message, time.time()
        (log.info if ok else log.warning)(
            "node=%s operation=%s kind=%s %s: %s",
            self.node_id,
            rec.operation_id,
            rec.kind,
            rec.state,
            message,
            extra=fields(
                event=f"node.operation.{rec.state}",
                node_id=self.node_id,
                operation_id=rec.operation_id,
                kind=rec.kind,
                reason=message,
            ),
        )
        await self.save()
        return rec

    async def save(self) -> None:
        """Write the state file, fsynced, off the event loop; saves land one at a time, in order."""
        async with self._saving:
            await self._write()

    async def _write(self) -> None:
        await asyncio.to_thread(NodeState.write, self.state_dir, self.state.dump())

    def recent(self, n: int = 10) -> list[node_pb2.Operation]:
        return [to_proto(r) for r in self.state.operations[-n:]]

    def _background(self, rec: OperationRecord, work: Callable[[], Awaitable[str]]) -> asyncio.Task:
        """Run `work` (which returns the done message or raises OperationError) and end the
        record, unless `work` ended it itself (a restart must, before the agent exits)."""

        async def run() -> None:
            try:
                message = await work()
                if rec.state == "running":
                    await self._end(rec, True, message)
            except OperationError as exc:
                await self._end(rec, False, str(exc))
            except asyncio.CancelledError:  # the record is saved even if cancelled again
                if rec.state == "running":
                    await asyncio.shield(
                        self._end(rec, False, "interrupted: the agent is stopping")
                    )
                raise
            except Exception as exc:  # noqa: BLE001 - recorded, never lost
                log.exception("node=%s operation=%s failed", self.node_id, rec.operation_id)
                await self._end(
                    rec, False, f"internal error ({type(exc).__name__}: {exc}); see the node log"
                )

        return self._spawn(run())

    def _spawn(self, work: Awaitable) -> asyncio.Task:
        """A task held until it ends, so the loop cannot drop it half done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _to_the_end(self, work: Awaitable[OperationRecord]) -> OperationRecord:
        """Run an operation's first part, once its record exists, as a task of its own: a
        caller that goes away mid-call (a coordinator killed) cancels its wait, not the
        operation, so the record never stays running with nothing left to end it (a retry
        of the same id would find it running for ever)."""
        task = self._spawn(work)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved if orphaned
        return await asyncio.shield(task)

    # -- cordon and drain -------------------------------------------------------------
    async def cordon(self, op_id: str, cordoned: bool, reason: str) -> OperationRecord:
        rec, new = self._begin(op_id, "cordon" if cordoned else "uncordon")
        if not new:
            return rec
        return await self._to_the_end(self._cordon(rec, cordoned, reason))

    async def _cordon(self, rec: OperationRecord, cordoned: bool, reason: str) -> OperationRecord:
        self.state.cordoned, self.state.cordon_reason = cordoned, reason if cordoned else ""
        if not cordoned:
            self.state.drained = False
            if self._drain_task is not None:
                self._drain_task.cancel()
                self._drain_task = None
            if self._lifecycle.state in (State.DRAINING, State.DRAINED):
                await self._enter(State.READY, f"uncordoned ({reason or 'operator'})")
        return await self._end(
            rec,
            True,
            ("cordoned: no new requests" if cordoned else "uncordoned: taking requests")
            + (f" ({reason})" if reason else ""),
        )

    async def drain(self, op_id: str, timeout_s: float, reason: str) -> OperationRecord:
        rec, new = self._begin(op_id, "drain")
        if not new:
            return rec
        return await self._to_the_end(self._drain_op(rec, timeout_s, reason))

    async def _drain_op(
        self, rec: OperationRecord, timeout_s: float, reason: str
    ) -> OperationRecord:
        state = self._lifecycle.state
        if state is State.DRAINED:
            return await self._end(rec, True, "already drained")
        if state not in (State.READY, State.DRAINING):
            self.state.operations.remove(rec)
            raise OperationError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self.node_id} is {state.value} ({self._lifecycle.snapshot.reason}); "
                "only a READY node can be drained",
            )
        task = await self._start_drain(timeout_s, reason)
        self._background(rec, lambda: asyncio.shield(task))
        return rec

    async def _start_drain(self, timeout_s: float, reason: str) -> asyncio.Task:
        """Cordon (saved), enter DRAINING and start the drain; the one under way if any."""
        self.state.cordoned, self.state.cordon_reason = True, reason or "draining"
        await self.save()
        if self._drain_task is None:
            timeout = timeout_s or self._drain_timeout_s
            self.drain_deadline = time.monotonic() + timeout
            await self._enter(
                State.DRAINING,
                f"draining {plural(len(self._registry), 'request')}, deadline "
                f"{timeout:g}s" + (f" ({reason})" if reason else ""),
            )
            task = self._drain_task = asyncio.get_running_loop().create_task(self._drain(timeout))
            task.add_done_callback(
                lambda t: setattr(self, "_drain_task", None) if self._drain_task is t else None
            )
        return self._drain_task

    async def _drain(self, timeout: float) -> str:
        try:
            try:
                await asyncio.wait_for(self._registry.wait_idle(), timeout=timeout)
                message = "drained: every request in flight finished"
            except TimeoutError:
                n = self._registry.abort_all(
                    lambda s: NodeStopping(f"drain deadline of {timeout:g}s passed")
                )
                await asyncio.wait_for(self._registry.wait_idle(), timeout=10)
                message = (
                    f"drained: the {timeout:g}s deadline passed and {plural(n, 'request')} {'was' if n == 1 else 'were'} ended "
                    "with a CANCELLED final chunk (a coordinator resumes them on another node)"
                )
        except asyncio.CancelledError:
            raise OperationError(
                grpc.StatusCode.ABORTED, "drain interrupted by an uncordon"
            ) from None
        finally:
            self.drain_deadline = None
        self.state.drained = True
        await self.save()
        await self._enter(State.DRAINED, message)
        return message

    def drain_left_s(self) -> float:
        return max(0.0, self.drain_deadline - time.monotonic()) if self.drain_deadline else 0.0

    # -- models -----------------------------------------------------------------------
    async def stage(
        self, op_id: str, source: Path, model_id: str, version: str, expected: str
    ) -> OperationRecord:
        """Copy `source` into the staging area while the node keeps serving; digest-checked."""
        rec, new = self._begin(op_id, "stage")
        if new:

            async def work() -> str:
                others = None
                if self.stage_on_other_ranks is not None:
                    others = asyncio.ensure_future(
                        self.stage_on_other_ranks(op_id, source, model_id, version, expected)
                    )
                    others.add_done_callback(lambda t: t.cancelled() or t.exception())
                try:
                    try:
                        info = await asyncio.to_thread(
                            self._staging.stage_from_path,
                            source,
                            model_id=model_id,
                            version=version,
                            expected_digest=expected,
                        )
                    except (StagingError, OSError) as exc:
                        raise OperationError(
                            grpc.StatusCode.FAILED_PRECONDITION, f"staging {source} failed: {exc}"
                        ) from None
                    elsewhere = await others if others is not None else ""
                finally:
                    if others is not None:
                        others.cancel()
                return f"staged {info.model_id} {info.version} {info.digest[:19]}{elsewhere}"

            self._background(rec, work)
        return rec

    async def finish_push(self, op_id: str, manifest: node_pb2.WeightsManifest) -> OperationRecord:
        """The last pushed chunk arrived: verify the digest; staged only if it matches."""
        rec, new = self._begin(op_id, "push")
        if new:

            async def work() -> str:
                try:
                    info = await asyncio.to_thread(
                        self._staging.finish_push, manifest.expected_digest
                    )
                except (StagingError, OSError) as exc:
                    raise OperationError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"pushed weights not staged: {exc}"
                    ) from None
                return f"staged {info.model_id} {info.version} {info.digest[:19]} (pushed)"

            # The record ends even if the pushing caller goes away during the digest check.
            await asyncio.shield(self._background(rec, work))
        return rec

    def serving(self) -> ModelRef:
        return self.state.active or self._configured_model

    async def activate(self, op_id: str, digest: str, previous: bool) -> OperationRecord:
        rec, new = self._begin(op_id, "activate")
        if not new:
            return rec
        try:
            if self._lifecycle.state is not State.DRAINED:
                raise OperationError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {self.node_id} is {self._lifecycle.state.value}; drain it first "
                    f"(fleetctl drain {self.node_id}), then activate",
                )
            if self._busy:
                raise OperationError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {self.node_id} is already running {self._busy}; wait for it",
                )
            target = self._target(digest, previous)
        except OperationError:
            self.state.operations.remove(rec)
            raise
        if target.digest and target.digest == self.serving_digest():
            return await self._end(
                rec, True, f"already serving {target.model_id} {target.digest[:19]}"
            )
        self._busy = f"activate {op_id}"
        self._background(rec, lambda: self._activate(target))
        return rec

    def _target(self, digest: str, previous: bool) -> ModelRef:
        node = self.node_id
        if previous:
            if self.state.previous is None:
                raise OperationError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {node} has no previous model to go back to",
                )
            return self.state.previous
        staged = self._staging.get(digest)
        if staged is None or staged.state != node_pb2.STAGE_STATE_STAGED:
            raise OperationError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {node} has no staged model {digest[:19] or '(no digest given)'}; "
                "stage it first (StageModel or a push)",
            )
        return ModelRef(
            str(self._staging.path_for(digest)), staged.model_id, staged.version, digest
        )

    async def _activate(self, target: ModelRef) -> str:
        now = self._model_info()
        old = replace(self.serving(), digest=self.serving_digest(), version=now.version)
        try:
            if await self._load_and_warm(target):
                self.state.previous, self.state.active, self.state.drained = old, target, False
                await self.save()
                self._staging.prune({d for d in (target.digest, old.digest) if d})
                return f"serving {target.model_id} {target.version} {self._model_info().weights_digest[:19]} (cordoned)"
            why = self._lifecycle.snapshot.reason
            back = await self._load_and_warm(old)
            raise OperationError(
                grpc.StatusCode.ABORTED,
                f"activation of {target.model_id} {target.digest[:19]} failed: {why}; "
                + (
                    f"back on {old.model_id} {old.digest[:19] or ''} (cordoned)"
                    if back
                    else "the previous model did not load either; see the node log"
                ),
            )
        finally:
            self._busy = None

    # -- restart ----------------------------------------------------------------------
    async def restart(self, op_id: str, drain_timeout_s: float) -> OperationRecord:
        rec, new = self._begin(op_id, "restart")
        if not new:
            return rec

        async def work() -> str:
            if self._lifecycle.state in (State.READY, State.DRAINING):
                await asyncio.shield(await self._start_drain(drain_timeout_s, "restart"))
            # The record is saved (done) before the exit: a retry of this id does not restart
            # again. Ended here, not by _background, whose save the stopping agent would cancel.
            message = f"restarting (exit {RESTART_EXIT_CODE}) for the service manager to start the installed release"
            await self._end(rec, True, message)
            self._request_restart()
            return message

        self._background(rec, work)
        return rec


def to_proto(rec: OperationRecord) -> node_pb2.Operation:
    return node_pb2.Operation(
        operation_id=rec.operation_id,
        kind=rec.kind,
        state=_STATES[rec.state],
        message=rec.message,
        started_unix_s=rec.started,
        finished_unix_s=rec.finished,
    )
