"""The coordinator's Inference service: admit, stream from a node, and fail over.

Before the first token reaches the caller a failed request is retried on another node.
After it, the request is resumed on a node with the same weights: the original request
plus the token ids already streamed (prefix_token_ids), the remaining max_tokens, the
same sampling settings and seed, and how much of the prefix's text the caller already
has (prefix_text_chars). The caller sees one stream in which each token appears once,
and a final record of the failovers and the nodes involved (DESIGN invariant 4).

If no node with those weights is left, the request fails with ABORTED, unless the caller
set allow_restart: then it starts over on other weights, the whole original request, and
the first chunk after that carries `restarted` (what came before it is void).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import AsyncIterator, Callable, Optional

import grpc

from cluster.api import fleet_pb2, inference_pb2, inference_pb2_grpc
from cluster.quality import prompts
from cluster.validation import (InvalidRequest, check_output_format_async, check_request, display_id, new_request_id,
                                serves, template_budget)
from cluster.logs import fields, without_text
from cluster.security.identity import Identity
from cluster.wording import plural
from coordinator.attempt import Attempt
from coordinator.audit_trail import AuditedCall, AuditTrail, RequestAudit
from coordinator.admission import BATCH, INTERACTIVE, RESUME, Admission, QueueFull, WaitExpired
from coordinator.events import EventLog
from coordinator.fleet import Fleet, NodeEntry
from coordinator.request_summary import Monitor, Outcome, RequestSummary
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
    def __init__(self, *, settings, fleet: Fleet, admission: Admission, events: EventLog,
                 identify: Callable[[object], Identity], audit: AuditTrail, monitor: Optional[Monitor] = None):
        self._s = settings
        self._fleet = fleet
        self._admission = admission
        self._events = events
        self._identify = identify     # the caller's verified identity (the authorizer's)
        self._audit = audit
        self._monitor = monitor or Monitor()
        self._per_caller: dict[str, int] = {}
        self.in_flight = 0

    def load(self) -> tuple[int, int]:
        """(running, queued) now: this coordinator's requests on nodes, and those waiting
        in its admission queue (in_flight counts both)."""
        queued = self._admission.depth
        return max(0, self.in_flight - queued), queued

    async def _validate(self, request: inference_pb2.GenerateRequest) -> None:
        """Every field check; any failure to check is InvalidRequest (cluster.validation)."""
        check_request(request, max_tokens=self._s.max_tokens_limit,
                      max_stop_sequences=self._s.max_stop_sequences, where="this coordinator")
        await check_output_format_async(request)   # a schema compiles off the event loop

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        rid = display_id(request.request_id)
        started = time.time()
        ident = self._identify(context)
        caller = str(ident)
        audit = RequestAudit(self._audit, self._audit.request_record(
            ident, context.peer(), request_id=rid, prompt_digest=self._audit.prompt_digest(request)))
        try:
            await self._validate(request)
        except InvalidRequest as exc:
            log.info("request=%s caller=%s rejected code=INVALID_ARGUMENT reason=%r", rid, caller, str(exc),
                     extra=fields(event="request.rejected", request_id=rid, caller=caller, code="INVALID_ARGUMENT",
                                  reason=str(exc)))
            await self.refused(audit.end(Outcome.REJECTED, "INVALID_ARGUMENT"), request, caller, started)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: {exc}")
        cause = self._audit.failing
        if cause:   # no request is taken that could not be audited
            await self.refused(audit.end(Outcome.REFUSED, "UNAVAILABLE", reason="audit log failing"), request, caller,
                               started)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"request {rid}: coordinator {self._s.coordinator_id} cannot write its audit log "
                                f"({cause}), so it takes no requests until it can; retry later or on another "
                                "coordinator (operators: check its audit directory's disk)")
        running = self._per_caller.get(caller, 0)
        if running >= self._s.max_concurrent_per_caller:
            await self.refused(audit.end(Outcome.REFUSED, "RESOURCE_EXHAUSTED", reason="caller quota"), request, caller,
                               started)
            await self._busy(context, f"request {rid}: {caller} already has {plural(running, 'request')} in flight, "
                                      f"its quota (max_concurrent_per_caller {self._s.max_concurrent_per_caller})")
        req = inference_pb2.GenerateRequest()
        req.CopyFrom(request)
        req.request_id = req.request_id or new_request_id()
        audit.record["request_id"] = req.request_id
        if req.max_tokens == 0:  # a template request: its budget, fixed here so a resume counts down from it
            req.max_tokens = template_budget(req, self._s.max_tokens_limit)
        if not req.sampling.HasField("seed"):  # drawn here, so a resumed stream keeps it
            req.sampling.seed = secrets.randbits(63)
        run = Splice(req, clock=time.monotonic, completion_digest=self._audit.completion_digest())
        context = AuditedCall(context, audit, lambda: _facts(run))   # every abort from here is audited first
        self.in_flight += 1
        self._per_caller[caller] = running + 1
        outcome = Outcome.CANCELLED
        failed_code = ""   # the status a failed request ended with
        try:
            async with contextlib.aclosing(self._run(run, context, audit)) as chunks:
                async for chunk in chunks:
                    yield chunk
            outcome = Outcome.COMPLETED
        except grpc.aio.AbortError:
            outcome, failed_code = Outcome.FAILED, _code_name(context.code())
            raise
        except Exception as exc:  # noqa: BLE001 - never UNKNOWN with an exception's text (it may quote content)
            log.error("request=%s internal error: %s", req.request_id, without_text(exc))
            outcome, failed_code = Outcome.FAILED, "INTERNAL"
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"coordinator {self._s.coordinator_id} hit an internal error on request "
                                f"{req.request_id}; retry, and report it with the coordinator's log")
        finally:
            self.in_flight -= 1
            left = self._per_caller.pop(caller) - 1
            if left:
                self._per_caller[caller] = left
            ctx_left = context.time_remaining()
            if outcome is Outcome.CANCELLED and ctx_left is not None and ctx_left <= 0.05:
                outcome = Outcome.DEADLINE
            if not audit.written:  # every accepted request ends in exactly one record
                code = _code_name(context.code())
                record = audit.end(outcome, code or ("DEADLINE_EXCEEDED" if outcome is Outcome.DEADLINE
                                                     else "CANCELLED"), **_facts(run))
                if outcome is Outcome.FAILED:
                    await self._audit.write_or_log(record)   # the status goes out after the record is down
                else:
                    self._audit.submit(record)        # the caller left: nobody waits for it
            self._ended(audit.record, run, req, caller, started)
            log.info("request=%s caller=%s outcome=%s tokens=%d nodes=%s failovers=%d restarts=%d total_ms=%.1f",
                     req.request_id, caller, f"{outcome} code={failed_code}" if failed_code else outcome,
                     len(run.delivered), ",".join(run.nodes) or "-",
                     run.failovers, run.restarts, run.elapsed_ms(),
                     extra=fields(event="request.end", request_id=req.request_id, caller=caller,
                                  outcome=audit.record.get("outcome"), code=audit.record.get("code"),
                                  node_id=run.nodes[-1] if run.nodes else "", nodes=list(run.nodes),
                                  tokens=len(run.delivered), failovers=run.failovers, retries=run.retries,
                                  restarts=run.restarts, total_ms=round(run.elapsed_ms(), 1)))

    async def refused(self, record: dict, request: Optional[inference_pb2.GenerateRequest], caller: str,
                      started: float) -> None:
        """A request that ended before it ran (bad input, the caller's quota; or a body the
        front door could not read, with no request): its one audit record, then its summary."""
        await self._audit.write_or_log(record)
        self._ended(record, None, request or inference_pb2.GenerateRequest(), caller, started)

    def _ended(self, record: dict, run: Optional[Splice], req: inference_pb2.GenerateRequest, caller: str,
               started: float) -> None:
        """The one summary of a request for metrics and the request log (no content)."""
        now = time.time()
        s = RequestSummary(
            request_id=record.get("request_id", "") or "-", caller=caller,
            priority="batch" if req.priority == inference_pb2.PRIORITY_BATCH else "interactive",
            started_at=started, ended_at=now, outcome=record.get("outcome", ""),
            code=record.get("code", ""), duration_s=now - started,
            finish_reason=record.get("finish_reason", ""), prompt_tokens=record.get("prompt_tokens", 0))
        if run is not None:
            s.duration_s = run.elapsed_ms() / 1000.0
            s.queue_s = run.queue_s
            s.ttft_s = run.t_first - run.t_accept if run.t_first else None
            s.decode_s = run.t_last - run.t_first if run.t_first else 0.0
            s.completion_tokens = len(run.delivered)
            s.nodes = list(run.nodes)
            s.failovers, s.retries, s.restarts = run.failovers, run.retries, run.restarts
            s.token_gaps = run.token_gaps
            _note_facts(s, run.ended)
        if not s.template and req.WhichOneof("input") == "template":   # never reached a node
            s.template = prompts.recorded(req.template.name, req.template.version)   # registry names only
        self._monitor.request_ended(s)

    async def _run(self, run: Splice, context, audit: RequestAudit) -> AsyncIterator[inference_pb2.GenerateChunk]:
        req = run.request
        base = BATCH if req.priority == inference_pb2.PRIORITY_BATCH else INTERACTIVE
        failed: list[str] = []   # "node: reason", for the final error message
        while True:
            t_wait = time.monotonic()
            try:
                entry = await self._admit(run, context, base, failed)
            finally:
                run.queue_s = (run.queue_s or 0.0) + time.monotonic() - t_wait
            reserved = run.remaining
            run.routed(entry.node_id, entry.digest, _model_label(entry))
            audit.accept({"node": entry.node_id, "model": _model_label(entry), "digest": entry.digest})
            if run.announce_restart:
                run.announce_restart = False
                v = run.voided[-1]
                self._events.emit(fleet_pb2.EVENT_KIND_RESTART, node_id=v.node, reason=v.why,
                                  request_id=req.request_id, to_node_id=entry.node_id, tokens_delivered=v.tokens)
            t_routed = time.monotonic()
            attempt = Attempt(entry, first_token_s=self._s.first_token_timeout_s, stall_s=self._s.stall_timeout_s)
            entry.attempts.add(attempt)
            got = 0
            failure: Optional[tuple[str, bool, bool]] = None  # (reason, hard, penalise)
            try:
                attempt.call = entry.link.generate(run.request_for_node(entry.digest), context.time_remaining())
                async for chunk in attempt.chunks():   # its watchdog pauses while the caller reads
                    n = len(chunk.token_ids)
                    last = chunk.HasField("final")
                    if last and chunk.final.finish_reason in NODE_ENDED:  # carries no tokens: resume
                        failure = (f"node ended the stream: {chunk.final.message}", False, True)
                        break
                    await self._accepted(run, audit, context)
                    run.absorb(chunk)
                    run.mark_restarted(chunk, entry.node_id, entry.digest)
                    got += n
                    entry.outstanding_tokens -= n
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
                        len(run.delivered), reason,
                        extra=fields(event="request.node_failed", request_id=req.request_id, node_id=entry.node_id,
                                     reason=reason, tokens=len(run.delivered)))
            if run.failovers + run.retries > self._s.max_failovers:
                await self._give_up(run, context, failed, "its failover budget "
                                    f"({self._s.max_failovers}) is spent")

    async def _accepted(self, run: Splice, audit: RequestAudit, context) -> None:
        """The accepted record is durable before anything of the request leaves (fail closed)."""
        try:
            await audit.accepted()
        except Exception as exc:  # noqa: BLE001 - AuditWriteError or the disk: send nothing
            log.error("request=%s audit write failed; nothing sent: %s", run.request.request_id, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"request {run.request.request_id}: coordinator {self._s.coordinator_id} could not "
                                f"write its audit record ({self._audit.failing or 'audit log closed'}), so nothing "
                                "was sent; retry later (operators: check the coordinator's audit directory and disk)")

    async def _record_final(self, run: Splice, final: inference_pb2.GenerateChunk, audit: RequestAudit,
                            context) -> None:
        """The audit record is durable before the final chunk leaves (fail closed)."""
        f = final.final
        record = audit.end(Outcome.COMPLETED, "OK", **_facts(run), finish_reason=_finish_name(f.finish_reason),
                           prompt_tokens=f.usage.prompt_tokens, ttft_ms=round(f.timings.time_to_first_token_ms, 1))
        try:
            await self._audit.write(record)
        except Exception as exc:  # noqa: BLE001 - AuditWriteError or the disk: withhold the result
            log.error("request=%s audit write failed; result withheld: %s", run.request.request_id, exc)
            audit.written = False
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"request {run.request.request_id}: the audit record could not be written "
                                f"({self._audit.failing or 'audit log closed'}), so the result is withheld; retry "
                                "later (operators: check the coordinator's audit directory and disk)")

    async def _admit(self, run: Splice, context, base: int, failed: list[str]) -> NodeEntry:
        routable = self._fleet.routable()
        model = run.request.model
        if not any(e.node_id not in run.excluded and (not run.digest or e.digest == run.digest)
                   and serves(e.model_id, e.status.model.version, model) for e in routable):
            # Nothing could take it now. Wait only if nothing has been tried yet (a fleet
            # starting up): a retry or resume with no candidate left ends here, with why,
            # or (allow_restart) starts over on other weights.
            if run.delivered:
                await self._restart(run, context, failed, routable)
            elif failed:
                await self._give_up(run, context, failed, "no other READY node is left to try")
            elif run.digest and routable:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"request {run.request.request_id}: no READY node serves the required "
                                    "weights; check `fleetctl nodes` for the digests served")
            elif model and routable:
                served = ", ".join(sorted({e.model_id for e in routable})) or "none"
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"request {run.request.request_id}: no READY node serves the model asked for "
                                    f"(GenerateRequest.model) now (READY nodes serve: {served}); retry later and "
                                    "check `fleetctl nodes`")
        want = Want(digest=run.digest, exclude=frozenset(run.excluded), session_key=run.request.session_key,
                    model=model)
        try:
            return await self._admission.acquire(want, priority=RESUME if run.delivered or run.restarts else base,
                                                 tokens=run.remaining, timeout_s=context.time_remaining())
        except QueueFull:
            await self._busy(context, f"request {run.request.request_id}: the coordinator's queue is full "
                                      f"({self._s.queue_max_depth} waiting)")
        except WaitExpired as exc:
            rid = run.request.request_id
            if run.delivered or run.restarts:
                await self._give_up(run, context, failed, f"no node {'with its weights ' if run.delivered else ''}"
                                                          f"had room for {exc.waited_s:.1f}s")
            if exc.routable == 0:
                tried = f"; tried {', '.join(failed)}" if failed else ""
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"request {rid}: no READY node in the fleet after waiting "
                                    f"{exc.waited_s:.1f}s{tried}; check `fleetctl nodes`")
            await self._busy(context, f"request {rid}: every node is busy; waited {exc.waited_s:.1f}s in the "
                                      "coordinator's queue")

    async def _restart(self, run: Splice, context, failed: list[str], routable: list[NodeEntry]) -> None:
        """No READY node serves the weights a started stream is pinned to: start it over on
        other weights if the caller allowed it and a node is left; else end it (ABORTED)."""
        digest = run.digest[:19]
        refusal = run.restart_refusal()
        others = any(e.node_id not in run.excluded for e in routable)
        if refusal or not others:
            why = f"no other READY node serves weights {digest}"
            if others:
                why += f"; {refusal}"
            elif not refusal:
                why += "; no node with other weights is left to restart on either"
            await self._give_up(run, context, failed, why)
        voided = run.restart(f"no node serving {digest} was left", completion_digest=self._audit.completion_digest())
        log.warning("request=%s restarts from the beginning on other weights: node=%s failed and no node serving "
                    "%s is left; %d tokens sent are void", run.request.request_id, voided.node, digest, voided.tokens)

    async def _busy(self, context, message: str) -> None:
        """RESOURCE_EXHAUSTED with the retry hint in the trailer and the message."""
        ms = self._s.retry_after_ms
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{message}; retry after {ms} ms",
                            trailing_metadata=((PUSHBACK_KEY, str(ms)),))

    async def _give_up(self, run: Splice, context, failed: list[str], why: str) -> None:
        rid = run.request.request_id
        tried = ", ".join(failed) or "none"
        if run.delivered:
            since = " since its restart on other weights" if run.restarts else ""
            await context.abort(grpc.StatusCode.ABORTED,
                                f"request {rid} was interrupted after {len(run.delivered)} tokens{since} and cannot "
                                f"be resumed: {why} (nodes tried: {tried}); retry the whole request")
        if run.restarts:   # it started over and failed again before a new first token
            await context.abort(grpc.StatusCode.ABORTED,
                                f"request {rid} was restarted on other weights and could not be finished: {why} "
                                f"(nodes tried: {tried}); retry the whole request")
        if run.last_failure == grpc.StatusCode.RESOURCE_EXHAUSTED:  # full, not broken
            await self._busy(context, f"request {rid}: every node that could serve it is at capacity "
                                      f"(nodes tried: {tried})")
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"request {rid} could not be served: {why} (nodes tried: {tried}); "
                            "retry later and check `fleetctl nodes`")

    async def _classify(self, err: grpc.aio.AioRpcError, run: Splice, context) -> tuple[str, bool, bool]:
        """(reason, hard, penalise) for a failed node call; ends the caller's call if it must."""
        code, details = err.code(), _repeatable(err.code(), err.details() or "")
        run.last_failure = code
        if code in PASS_THROUGH:
            if not details.startswith(("request ", "node ")):  # not one of our nodes' own messages
                details = f"request {run.request.request_id}: the node refused it ({code.name})"
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


def _code_name(code: Optional[grpc.StatusCode]) -> str:
    """The status a call ended with, by name ("" while it has none)."""
    return code.name if code is not None else ""


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


def _model_label(entry: NodeEntry) -> str:
    model = entry.status.model if entry.status is not None else None
    if model is None:
        return ""
    return f"{model.model_id}@{model.version}" if model.version else model.model_id


def _facts(run: Splice) -> dict:
    """What the audit keeps of a request's run: hops, counts and timing, no content. The
    completion fields describe the text the caller keeps; what a restart made void (the
    caller did receive it) is kept per restart under `voided`."""
    return {"nodes": [{"node": n, "model": m, "digest": d} for n, m, d in run.hops],
            "failovers": run.failovers, "retries": run.retries, "restarts": run.restarts,
            "completion_tokens": len(run.delivered), "latency_ms": round(run.elapsed_ms(), 1),
            "completion_digest": run.completion_digest.hexdigest_str() if run.completion_digest else "",
            **({"voided": [{"node": v.node, "digest": v.digest, "tokens": v.tokens,
                            "completion_digest": v.completion_digest} for v in run.voided]} if run.voided else {})}


def _note_facts(s: RequestSummary, f: Optional[inference_pb2.FinalInfo]) -> None:
    """The note's template version, schema check and quality score from the final record."""
    if f is None:
        return
    s.template = prompts.known_id(f.template)   # registry names only, whatever a node sent
    if f.HasField("structured"):
        s.schema_valid = f.structured.valid
        s.output_format = f.structured.format
    if f.HasField("quality"):
        s.quality_score = f.quality.total
        s.quality_parts = {p.name: p.score for p in f.quality.parts}
