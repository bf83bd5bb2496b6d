"""The coordinator's Inference service: admit, stream from a node, and fail over.

Before the first token reaches the caller a failed request is retried on another node.
After it, the request is resumed on a node with the same weights: the original request
plus the token ids already streamed (prefix_token_ids), the remaining max_tokens, the
same sampling settings and seed, and how much of the prefix's text the caller already
has (prefix_text_chars). The caller sees one stream in which each token appears once,
and a final record of the failovers and the nodes involved (DESIGN invariant 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import AsyncIterator, Optional

import grpc

from cluster.api import fleet_pb2, inference_pb2, inference_pb2_grpc
from cluster.validation import (InvalidRequest, check_counts, check_input, check_request_id,
                                check_sampling, display_id, new_request_id)
from coordinator.attempt import Attempt
from coordinator.admission import BATCH, INTERACTIVE, RESUME, Admission, QueueFull, WaitExpired
from coordinator.events import EventLog
from coordinator.fleet import Fleet, NodeEntry
from coordinator.router import Want
from coordinator.splice import Splice

log = logging.getLogger(__name__)

PUSHBACK_KEY = "grpc-retry-pushback-ms"
NODE_ENDED = (inference_pb2.FINISH_REASON_CANCELLED, inference_pb2.FINISH_REASON_ERROR)
# The caller's own mistakes: no other node would answer differently.
PASS_THROUGH = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED)
# Not the node's fault (its state moved on since our last read): retry elsewhere, no penalty.
STALE_VIEW = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)


class Relay(inference_pb2_grpc.InferenceServicer):
    def __init__(self, *, settings, fleet: Fleet, admission: Admission, events: EventLog):
        self._s = settings
        self._fleet = fleet
        self._admission = admission
        self._events = events
        self.in_flight = 0

    def _validate(self, request: inference_pb2.GenerateRequest) -> None:
        check_request_id(request.request_id)
        check_input(request)
        check_counts(request, max_tokens=self._s.max_tokens_limit,
                     max_stop_sequences=self._s.max_stop_sequences, where="this coordinator")
        check_sampling(request.sampling)

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        rid = display_id(request.request_id)
        try:
            self._validate(request)
        except InvalidRequest as exc:
            log.info("request=%s rejected code=INVALID_ARGUMENT reason=%r", rid, str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: {exc}")
        req = inference_pb2.GenerateRequest()
        req.CopyFrom(request)
        req.request_id = req.request_id or new_request_id()
        if not req.sampling.HasField("seed"):  # drawn here, so a resumed stream keeps it
            req.sampling.seed = secrets.randbits(63)
        run = Splice(req, clock=time.monotonic)
        self.in_flight += 1
        outcome = "cancelled"
        try:
            async with contextlib.aclosing(self._run(run, context)) as chunks:
                async for chunk in chunks:
                    yield chunk
            outcome = "completed"
        except grpc.aio.AbortError:
            code = context.code()
            outcome = f"failed code={getattr(code, 'name', code)}"
            raise
        finally:
            self.in_flight -= 1
            left = context.time_remaining()
            if outcome == "cancelled" and left is not None and left <= 0.05:
                outcome = "deadline"
            log.info("request=%s outcome=%s tokens=%d nodes=%s failovers=%d total_ms=%.1f", req.request_id,
                     outcome, len(run.delivered), ",".join(run.nodes) or "-", run.failovers, run.elapsed_ms())

    async def _run(self, run: Splice, context) -> AsyncIterator[inference_pb2.GenerateChunk]:
        req = run.request
        base = BATCH if req.priority == inference_pb2.PRIORITY_BATCH else INTERACTIVE
        failed: list[str] = []   # "node: reason", for the final error message
        while True:
            entry = await self._admit(run, context, base, failed)
            reserved = run.remaining
            run.routed(entry.node_id, entry.digest)
            t_routed = time.monotonic()
            attempt = Attempt(entry, first_token_s=self._s.first_token_timeout_s, stall_s=self._s.stall_timeout_s)
            entry.attempts.add(attempt)
            got = 0
            failure: Optional[tuple[str, bool, bool]] = None  # (reason, hard, penalise)
            try:
                attempt.call = call = entry.link.generate(run.request_for_node(entry.digest),
                                                          context.time_remaining())
                async for chunk in call:
                    n = len(chunk.token_ids)
                    attempt.progress(n)
                    last = chunk.HasField("final")
                    if last and chunk.final.finish_reason in NODE_ENDED:  # carries no tokens: resume
                        failure = (f"node ended the stream: {chunk.final.message}", False, True)
                        break
                    run.absorb(chunk)
                    got += n
                    entry.outstanding_tokens -= n
                    if last:
                        self._fleet.report_success(entry)
                        yield run.final(chunk)
                        return
                    yield chunk
            except asyncio.CancelledError:
                if attempt.evicted is None or asyncio.current_task().cancelling():
                    raise
                failure = (attempt.evicted, False, attempt.penalise)
            except grpc.aio.AioRpcError as err:
                failure = await self._classify(err, run, context)
            except grpc.aio.UsageError as exc:  # the node's channel closed as it left the fleet
                failure = (f"node {entry.node_id} left the fleet ({exc})", False, False)
            finally:
                entry.attempts.discard(attempt)
                attempt.close()
                self._admission.release(entry, max(0, reserved - got))
            reason, hard, penalise = failure or ("the stream ended without a final chunk", False, True)
            if penalise:
                self._fleet.report_failure(entry, f"request {req.request_id}: {reason}", hard=hard)
            failed.append(f"{entry.node_id} ({reason})")
            run.failed(entry.node_id)
            entry.failovers_total += 1
            self._events.emit(fleet_pb2.EVENT_KIND_FAILOVER, node_id=entry.node_id, address=entry.address,
                              reason=reason, request_id=req.request_id, tokens_delivered=len(run.delivered))
            log.warning("request=%s node=%s failed after %.0f ms with %d tokens delivered: %s",
                        req.request_id, entry.node_id, (time.monotonic() - t_routed) * 1000,
                        len(run.delivered), reason)
            if run.failovers + run.retries > self._s.max_failovers:
                await self._give_up(run, context, failed, "its failover budget "
                                    f"({self._s.max_failovers}) is spent")

    async def _admit(self, run: Splice, context, base: int, failed: list[str]) -> NodeEntry:
        want = Want(digest=run.digest, exclude=frozenset(run.excluded), session_key=run.request.session_key)
        routable = self._fleet.routable()
        if not any(e.node_id not in run.excluded and (not run.digest or e.digest == run.digest) for e in routable):
            # Nothing could take it now. Wait only if nothing has been tried yet (a fleet
            # starting up): a retry or resume with no candidate left ends here, with why.
            if run.delivered:
                await self._give_up(run, context, failed, f"no other READY node serves weights {run.digest[:19]}")
            if failed:
                await self._give_up(run, context, failed, "no other READY node is left to try")
            if run.digest and routable:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"request {run.request.request_id}: no READY node serves the required "
                                    "weights; check `fleetctl nodes` for the digests served")
        try:
            return await self._admission.acquire(want, priority=RESUME if run.delivered else base,
                                                 tokens=run.remaining, timeout_s=context.time_remaining())
        except QueueFull:
            await self._busy(context, f"request {run.request.request_id}: the coordinator's queue is full "
                                      f"({self._s.queue_max_depth} waiting)")
        except WaitExpired as exc:
            rid = run.request.request_id
            if run.delivered:
                await self._give_up(run, context, failed, f"no node with its weights had room for {exc.waited_s:.1f}s")
            if exc.routable == 0:
                tried = f"; tried {', '.join(failed)}" if failed else ""
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"request {rid}: no READY node in the fleet after waiting "
                                    f"{exc.waited_s:.1f}s{tried}; check `fleetctl nodes`")
            await self._busy(context, f"request {rid}: every node is busy; waited {exc.waited_s:.1f}s in the "
                                      "coordinator's queue")

    async def _busy(self, context, message: str) -> None:
        """RESOURCE_EXHAUSTED with the retry hint in the trailer and the message."""
        ms = self._s.retry_after_ms
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{message}; retry after {ms} ms",
                            trailing_metadata=((PUSHBACK_KEY, str(ms)),))

    async def _give_up(self, run: Splice, context, failed: list[str], why: str) -> None:
        rid = run.request.request_id
        tried = ", ".join(failed) or "none"
        if run.delivered:
            await context.abort(grpc.StatusCode.ABORTED,
                                f"request {rid} was interrupted after {len(run.delivered)} tokens and cannot "
                                f"be resumed: {why} (nodes tried: {tried}); retry the whole request")
        if run.last_failure == grpc.StatusCode.RESOURCE_EXHAUSTED:  # full, not broken
            await self._busy(context, f"request {rid}: every node that could serve it is at capacity "
                                      f"(nodes tried: {tried})")
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"request {rid} could not be served: {why} (nodes tried: {tried}); "
                            "retry later and check `fleetctl nodes`")

    async def _classify(self, err: grpc.aio.AioRpcError, run: Splice, context) -> tuple[str, bool, bool]:
        """(reason, hard, penalise) for a failed node call; ends the caller's call if it must."""
        code, details = err.code(), err.details() or ""
        run.last_failure = code
        if code in PASS_THROUGH:
            await context.abort(code, details)
        left = context.time_remaining()
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED) and left is not None and left <= 0.05:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {run.request.request_id}: deadline passed after "
                                f"{len(run.delivered)} tokens")
        reason = f"{code.name}: {details}"
        if code in STALE_VIEW:
            return reason, False, False
        if code == grpc.StatusCode.UNAVAILABLE:
            # The node's own refusal (draining, not READY) is state, not failure; anything
            # else is the transport: refused, reset, or the process died mid-stream.
            own = details.startswith("node ")
            return reason, not own, not own
        return reason, False, True
