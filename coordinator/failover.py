"""The failover loop: one accepted request's run across nodes (DESIGN invariant 4).

Before the first token reaches the caller a failed node call is retried on another node.
After it, the request is resumed on a node with the same weights: the original request
plus the token ids already streamed, the remaining max_tokens, the same sampling and seed
(coordinator/splice.py). With no such node left it fails with ABORTED, unless the caller
set allow_restart: then it starts over on other weights. The first chunk sent carries
what a client needs to do the same one level up, on another coordinator (ResumeInfo).

Each node call ends in exactly one of three ways: the final chunk (the run is done), a
`NodeFailure` (the loop moves on to the next node), or an abort of the caller's call: its
own mistake, its deadline, no node left, the failover budget spent. The helpers that end
the call are typed `NoReturn`: they raise, they never return a value to test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, NoReturn

import grpc

from cluster.api import fleet_pb2, inference_pb2
from cluster.config import AdmissionSection
from cluster.digest import is_remote
from cluster.logs import fields
from cluster.routing import Want
from cluster.validation import serves
from coordinator.admission import BATCH, INTERACTIVE, RESUME, Admission, QueueFull, WaitExpired
from coordinator.attempt import Attempt
from coordinator.audit_trail import AuditTrail, RequestAudit
from coordinator.call_context import CallContext, busy
from coordinator.events import EventLog
from coordinator.fleet import Fleet, NodeEntry
from coordinator.records import Completion, Hop, RunFacts
from coordinator.request_summary import Outcome
from coordinator.splice import Splice

log = logging.getLogger(__name__)

NODE_ENDED = (inference_pb2.FINISH_REASON_CANCELLED, inference_pb2.FINISH_REASON_ERROR)
# The caller's own mistakes: no other node would answer differently.
PASS_THROUGH = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)
# Not the node's fault (its state moved on since our last read): retry elsewhere, no penalty.
STALE_VIEW = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass(frozen=True)
class NodeFailure:
    """Why one node call of a request ended without its final chunk."""

    reason: str
    hard: bool = (
        False  # the transport failed (refused, reset, died): the health policy ejects at once
    )
    penalise: bool = True  # the node's fault; False: its state moved on, or it left the fleet


NO_FINAL = NodeFailure("the stream ended without a final chunk")


class Failover:
    """Runs accepted requests to their end: admit, stream from a node, move on when it fails."""

    def __init__(
        self,
        *,
        settings: AdmissionSection,
        coordinator_id: str,
        fleet: Fleet,
        admission: Admission,
        events: EventLog,
        audit: AuditTrail,
    ):
        self._s = settings
        self._me = coordinator_id
        self._fleet = fleet
        self._admission = admission
        self._events = events
        self._audit = audit

    async def run(
        self, run: Splice, context: CallContext, audit: RequestAudit
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """The chunks the caller gets, each token once, ending with the final chunk; or an abort."""
        req = run.request
        base = BATCH if req.priority == inference_pb2.PRIORITY_BATCH else INTERACTIVE
        failed: list[str] = []  # "node: reason", for the final error message
        while True:
            t_wait = time.monotonic()
            try:
                entry = await self._admit(run, context, base, failed)
            finally:
                run.queue_s = (run.queue_s or 0.0) + time.monotonic() - t_wait
            reserved = run.remaining
            run.routed(entry.node_id, entry.digest, model_label(entry))
            audit.accept(Hop(entry.node_id, model_label(entry), entry.digest))
            if run.announce_restart:
                run.announce_restart = False
                v = run.voided[-1]
                self._events.emit(
                    fleet_pb2.EVENT_KIND_RESTART,
                    node_id=v.node,
                    reason=v.why,
                    request_id=req.request_id,
                    to_node_id=entry.node_id,
                    tokens_delivered=v.tokens,
                )
            t_routed = time.monotonic()
            attempt = Attempt(
                entry, first_token_s=self._s.first_token_timeout_s, stall_s=self._s.stall_timeout_s
            )
            self._admission.call_started(entry, attempt)
            got = 0
            failure = NO_FINAL
            try:
                attempt.call = entry.link.generate(
                    run.request_for_node(entry.digest), context.time_remaining()
                )
                async for chunk in attempt.chunks():  # its watchdog pauses while the caller reads
                    n = len(chunk.token_ids)
                    last = chunk.HasField("final")
                    if (
                        last and chunk.final.finish_reason in NODE_ENDED
                    ):  # carries no tokens: resume
                        failure = NodeFailure(f"node ended the stream: {chunk.final.message}")
                        break
                    await self._accepted(run, audit, context)
                    run.absorb(chunk)
                    run.mark_restarted(chunk, entry.node_id, entry.digest)
                    run.stamp_resume(chunk, self._me)
                    got += n
                    self._admission.delivered(entry, n)
                    if last:
                        self._fleet.report_success(entry)
                        final = run.final(chunk)
                        await self._record_final(run, final, audit, context)
                        yield final
                        return
                    yield chunk
            except asyncio.CancelledError:
                if attempt.evicted is None or asyncio.current_task().cancelling():
                    raise
                failure = NodeFailure(attempt.evicted, penalise=attempt.penalise)
            except grpc.aio.AioRpcError as err:
                failure = await self._classify(err, run, context)
            except grpc.aio.UsageError as exc:  # the node's channel closed as it left the fleet
                failure = NodeFailure(
                    f"node {entry.node_id} left the fleet ({exc})", penalise=False
                )
            finally:
                self._admission.call_ended(entry, attempt)
                attempt.close()
                self._admission.release(entry, max(0, reserved - got))
            await self._failed(run, context, entry, failure, failed, t_routed)

    async def _failed(
        self,
        run: Splice,
        context: CallContext,
        entry: NodeEntry,
        failure: NodeFailure,
        failed: list[str],
        t_routed: float,
    ) -> None:
        """One node call failed: tell the health policy, record it, and stop if the budget is spent."""
        req, reason = run.request, failure.reason
        if failure.penalise:
            self._fleet.report_failure(
                entry, f"request {req.request_id}: {reason}", hard=failure.hard
            )
        failed.append(f"{entry.node_id} ({reason})")
        run.failed(entry.node_id)
        self._admission.failed_over(entry)
        self._events.emit(
            fleet_pb2.EVENT_KIND_FAILOVER,
            node_id=entry.node_id,
            address=entry.address,
            reason=reason,
            request_id=req.request_id,
            tokens_delivered=len(run.delivered),
        )
        log.warning(
            "request=%s node=%s failed after %.0f ms with %d tokens delivered: %s",
            req.request_id,
            entry.node_id,
            (time.monotonic() - t_routed) * 1000,
            len(run.delivered),
            reason,
            extra=fields(
                event="request.node_failed",
                request_id=req.request_id,
                node_id=entry.node_id,
                reason=reason,
                tokens=len(run.delivered),
            ),
        )
        if run.failovers + run.retries > self._s.max_failovers:
            await self._give_up(
                run, context, failed, f"its failover budget ({self._s.max_failovers}) is spent"
            )

    async def _accepted(self, run: Splice, audit: RequestAudit, context: CallContext) -> None:
        """The accepted record is durable before anything of the request leaves (fail closed)."""
        try:
            await audit.accepted()
        except Exception as exc:  # noqa: BLE001 - AuditWriteError or the disk: send nothing
            log.error(
                "request=%s audit write failed; nothing sent: %s", run.request.request_id, exc
            )
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"request {run.request.request_id}: coordinator {self._me} could not "
                f"write its audit record ({self._audit.failing or 'audit log closed'}), so nothing "
                "was sent; retry later (operators: check the coordinator's audit directory and disk)",
            )

    async def _record_final(
        self,
        run: Splice,
        final: inference_pb2.GenerateChunk,
        audit: RequestAudit,
        context: CallContext,
    ) -> None:
        """The audit record is durable before the final chunk leaves (fail closed)."""
        f = final.final
        record = audit.end(
            Outcome.COMPLETED,
            "OK",
            run=RunFacts.of(run),
            completion=Completion(
                _finish_name(f.finish_reason),
                f.usage.prompt_tokens,
                round(f.timings.time_to_first_token_ms, 1),
            ),
        )
        try:
            await self._audit.write(record)
        except Exception as exc:  # noqa: BLE001 - AuditWriteError or the disk: withhold the result
            log.error(
                "request=%s audit write failed; result withheld: %s", run.request.request_id, exc
            )
            audit.written = False
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"request {run.request.request_id}: the audit record could not be written "
                f"({self._audit.failing or 'audit log closed'}), so the result is withheld; retry "
                "later (operators: check the coordinator's audit directory and disk)",
            )

    async def _admit(
        self, run: Splice, context: CallContext, base: int, failed: list[str]
    ) -> NodeEntry:
        """A node with a place reserved for the request's next call; or the call ends."""
        routable = self._fleet.routable()
        model = run.request.model
        # A continuation (tokens delivered, or the caller's own prefix) of a stream pinned to a
        # remote: digest has no node to go to: a hosted API cannot continue token ids exactly.
        stuck = bool(run.delivered or run.base_prefix) and is_remote(run.digest)
        if stuck or not any(
            e.node_id not in run.excluded
            and (not run.digest or e.digest == run.digest)
            and serves(e.model_id, e.status.model.version, model)
            for e in routable
        ):
            # Nothing could take it now. Wait only if nothing has been tried yet (a fleet
            # starting up): a retry or resume with no candidate left ends here, with why,
            # or (allow_restart) starts over on other weights.
            if run.delivered:
                await self._restart(run, context, failed, routable)
            elif failed:
                await self._give_up(run, context, failed, "no other READY node is left to try")
            elif run.digest and routable:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"request {run.request.request_id}: no READY node serves the required "
                    "weights; check `fleetctl nodes` for the digests served",
                )
            elif model and routable:
                served = ", ".join(sorted({e.model_id for e in routable})) or "none"
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"request {run.request.request_id}: no READY node serves the model asked for "
                    f"(GenerateRequest.model) now (READY nodes serve: {served}); retry later and "
                    "check `fleetctl nodes`",
                )
        want = Want(
            digest=run.digest,
            exclude=frozenset(run.excluded),
            session_key=run.request.session_key,
            model=model,
        )
        try:
            return await self._admission.acquire(
                want,
                priority=RESUME if run.delivered or run.restarts else base,
                tokens=run.remaining,
                timeout_s=context.time_remaining(),
            )
        except QueueFull:
            await self._busy(
                context,
                f"request {run.request.request_id}: the coordinator's queue is full "
                f"({self._s.queue_max_depth} waiting)",
            )
        except WaitExpired as exc:
            await self._waited(run, context, failed, exc)

    async def _waited(
        self, run: Splice, context: CallContext, failed: list[str], exc: WaitExpired
    ) -> NoReturn:
        """No node had room within the queue's wait (or the caller's deadline)."""
        rid = run.request.request_id
        if run.delivered or run.restarts:
            await self._give_up(
                run,
                context,
                failed,
                f"no node {'with its weights ' if run.delivered else ''}"
                f"had room for {exc.waited_s:.1f}s",
            )
        if exc.routable == 0:
            tried = f"; tried {', '.join(failed)}" if failed else ""
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"request {rid}: no READY node in the fleet after waiting "
                f"{exc.waited_s:.1f}s{tried}; check `fleetctl nodes`",
            )
        await self._busy(
            context,
            f"request {rid}: every node is busy; waited {exc.waited_s:.1f}s in the "
            "coordinator's queue",
        )

    async def _restart(
        self, run: Splice, context: CallContext, failed: list[str], routable: list[NodeEntry]
    ) -> None:
        """No READY node serves the weights a started stream is pinned to: start it over on
        other weights if the caller allowed it and a node is left; else end it (ABORTED)."""
        digest = run.digest[:19]
        refusal = run.restart_refusal()
        others = any(e.node_id not in run.excluded for e in routable)
        if refusal or not others:
            why = (
                f"its tokens came from a hosted API ({run.digest}), which cannot continue a stream"
                if is_remote(run.digest)
                else f"no other READY node serves weights {digest}"
            )
            if others:
                why += f"; {refusal}"
            elif not refusal:
                why += "; no node with other weights is left to restart on either"
            await self._give_up(run, context, failed, why)
        voided = run.restart(
            f"no node serving {digest} was left", completion_digest=self._audit.completion_digest()
        )
        log.warning(
            "request=%s restarts from the beginning on other weights: node=%s failed and no node serving "
            "%s is left; %d tokens sent are void",
            run.request.request_id,
            voided.node,
            digest,
            voided.tokens,
        )

    async def _busy(self, context: CallContext, message: str) -> NoReturn:
        await busy(context, self._s.retry_after_ms, message)

    async def _give_up(
        self, run: Splice, context: CallContext, failed: list[str], why: str
    ) -> NoReturn:
        """End a request no node can finish, with the status that tells the caller what to do."""
        rid = run.request.request_id
        tried = ", ".join(failed) or "none"
        if run.delivered:
            since = " since its restart on other weights" if run.restarts else ""
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"request {rid} was interrupted after {len(run.delivered)} tokens{since} and cannot "
                f"be resumed: {why} (nodes tried: {tried}); retry the whole request",
            )
        if run.restarts:  # it started over and failed again before a new first token
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"request {rid} was restarted on other weights and could not be finished: {why} "
                f"(nodes tried: {tried}); retry the whole request",
            )
        if run.last_failure == grpc.StatusCode.RESOURCE_EXHAUSTED:  # full, not broken
            await self._busy(
                context,
                f"request {rid}: every node that could serve it is at capacity "
                f"(nodes tried: {tried})",
            )
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"request {rid} could not be served: {why} (nodes tried: {tried}); "
            "retry later and check `fleetctl nodes`",
        )

    async def _classify(
        self, err: grpc.aio.AioRpcError, run: Splice, context: CallContext
    ) -> NodeFailure:
        """What a failed node call means for the node; ends the caller's call if it must."""
        code, details = err.code(), _repeatable(err.code(), err.details() or "")
        run.last_failure = code
        if code in PASS_THROUGH:
            if not details.startswith(("request ", "node ")):  # not one of our nodes' own messages
                details = f"request {run.request.request_id}: the node refused it ({code.name})"
            await context.abort(code, details)
        left = context.time_remaining()
        if (
            code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
            and left is not None
            and left <= 0.05
        ):
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request {run.request.request_id}: deadline passed after "
                f"{len(run.delivered)} tokens",
            )
        reason = f"{code.name}: {details}"
        if code in STALE_VIEW:
            return NodeFailure(reason, penalise=False)
        if code == grpc.StatusCode.UNAVAILABLE:
            # The node's own refusal (draining, not READY) is state, not failure; anything
            # else is the transport: refused, reset, or the process died mid-stream.
            own = details.startswith("node ")
            return NodeFailure(reason, hard=not own, penalise=not own)
        return NodeFailure(reason)


def _finish_name(value: int) -> str:
    """'length', 'stop', ...; a value from a newer node is kept as its number."""
    try:
        return inference_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
    except ValueError:
        return str(value)


def _repeatable(code: grpc.StatusCode, details: str) -> str:
    """A node's error text, as far as it is safe to log and repeat to callers: our node
    agents' own messages and gRPC's transport words, but never the text of an exception
    that escaped a handler (gRPC sends it as UNKNOWN "Unexpected ...": it may quote content)."""
    if code == grpc.StatusCode.UNKNOWN or details.startswith("Unexpected"):
        return "(details withheld: an unexpected error's text may quote the request)"
    return details


def model_label(entry: NodeEntry) -> str:
    model = entry.status.model if entry.status is not None else None
    if model is None:
        return ""
    return f"{model.model_id}@{model.version}" if model.version else model.model_id
