"""The coordinator's Inference service: the door every request goes through, from gRPC
or the OpenAI-compatible front door: validate, enforce the caller's quota, keep the audit
record and the summary of each request; its run across nodes is the failover loop's
(coordinator/failover.py).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import AsyncIterator, Callable, Optional

import grpc

from cluster.api import inference_pb2, inference_pb2_grpc
from cluster.config import AdmissionSection
from cluster.logs import fields, without_text
from cluster.quality import prompts
from cluster.security.identity import Identity
from cluster.validation import (
    InvalidRequest,
    check_output_format_async,
    check_request,
    display_id,
    new_request_id,
    template_budget,
    valid_id,
)
from cluster.wording import plural
from coordinator.admission import Admission
from coordinator.audit_trail import AuditedCall, AuditTrail, RequestAudit
from coordinator.call_context import CallContext, busy
from coordinator.events import EventLog
from coordinator.failover import Failover
from coordinator.fleet import Fleet
from coordinator.records import RequestRecord, RunFacts
from coordinator.request_summary import Monitor, Outcome, RequestSummary
from coordinator.splice import Splice

log = logging.getLogger(__name__)


class Relay(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        *,
        settings: AdmissionSection,
        coordinator_id: str,
        fleet: Fleet,
        admission: Admission,
        events: EventLog,
        identify: Callable[[object], Identity],
        audit: AuditTrail,
        monitor: Optional[Monitor] = None,
        shadow=None,
    ):
        self._s = settings
        self._me = coordinator_id
        self._admission = admission
        self._identify = identify  # a gRPC caller's verified identity (the authorizer's)
        self._audit = audit
        self._failover = Failover(
            settings=settings,
            coordinator_id=coordinator_id,
            fleet=fleet,
            admission=admission,
            events=events,
            audit=audit,
        )
        self._monitor = monitor or Monitor()
        self._shadow = shadow  # coordinator/shadow.py: copies a sample to a candidate model
        self._per_caller: dict[str, int] = {}
        self.in_flight = 0

    def load(self) -> tuple[int, int]:
        """(running, queued) now: this coordinator's requests on nodes, and those waiting
        in its admission queue (in_flight counts both)."""
        queued = self._admission.depth
        return max(0, self.in_flight - queued), queued

    async def _validate(self, request: inference_pb2.GenerateRequest) -> None:
        """Every field check; any failure to check is InvalidRequest (cluster.validation)."""
        check_request(
            request,
            max_tokens=self._s.max_tokens_limit,
            max_stop_sequences=self._s.max_stop_sequences,
            where="this coordinator",
        )
        check_resumed_from(request)
        await check_output_format_async(request)  # a schema compiles off the event loop

    async def Generate(
        self,
        request: inference_pb2.GenerateRequest,
        context: CallContext,
        identity: Optional[Identity] = None,
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """One request to its end. gRPC calls it with its servicer context; the front door
        with its own call and the caller (`identity`) it authenticated."""
        rid = display_id(request.request_id)
        started = time.time()
        ident = identity if identity is not None else self._identify(context)
        caller = str(ident)
        audit = RequestAudit(
            self._audit,
            self._audit.request_record(
                ident,
                context.peer(),
                request_id=rid,
                prompt_digest=self._audit.prompt_digest(request),
            ),
        )
        try:
            await self._validate(request)
        except InvalidRequest as exc:
            log.info(
                "request=%s caller=%s rejected code=INVALID_ARGUMENT reason=%r",
                rid,
                caller,
                str(exc),
                extra=fields(
                    event="request.rejected",
                    request_id=rid,
                    caller=caller,
                    code="INVALID_ARGUMENT",
                    reason=str(exc),
                ),
            )
            await self.refused(
                audit.end(Outcome.REJECTED, "INVALID_ARGUMENT"), request, caller, started
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: {exc}")
        cause = self._audit.failing
        if cause:  # no request is taken that could not be audited
            await self.refused(
                audit.end(Outcome.REFUSED, "UNAVAILABLE", reason="audit log failing"),
                request,
                caller,
                started,
            )
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"request {rid}: coordinator {self._me} cannot write its audit log "
                f"({cause}), so it takes no requests until it can; retry later or on another "
                "coordinator (operators: check its audit directory's disk)",
            )
        running = self._per_caller.get(caller, 0)
        if running >= self._s.max_concurrent_per_caller:
            await self.refused(
                audit.end(Outcome.REFUSED, "RESOURCE_EXHAUSTED", reason="caller quota"),
                request,
                caller,
                started,
            )
            await busy(
                context,
                self._s.retry_after_ms,
                f"request {rid}: {caller} already has {plural(running, 'request')} in flight, "
                f"its quota (max_concurrent_per_caller {self._s.max_concurrent_per_caller})",
            )
        req = inference_pb2.GenerateRequest()
        req.CopyFrom(request)
        req.request_id = req.request_id or new_request_id()
        audit.named(req.request_id)
        if (
            req.max_tokens == 0
        ):  # a template request: its budget, fixed here so a resume counts down from it
            req.max_tokens = template_budget(req, self._s.max_tokens_limit)
        if not req.sampling.HasField("seed"):  # drawn here, so a resumed stream keeps it
            req.sampling.seed = secrets.randbits(63)
        if req.resumed_from_coordinator:  # a client's failover from another coordinator
            audit.resumed(req.resumed_from_coordinator, len(req.prefix_token_ids))
        if self._shadow is not None:
            self._shadow.offer(req)  # best effort; the caller never sees the copy (docs/shadow.md)
        run = Splice(req, clock=time.monotonic, completion_digest=self._audit.completion_digest())
        context = AuditedCall(
            context, audit, lambda: RunFacts.of(run)
        )  # every abort from here is audited first
        self.in_flight += 1
        self._per_caller[caller] = running + 1
        outcome = Outcome.CANCELLED
        failed_code = ""  # the status a failed request ended with
        try:
            async with contextlib.aclosing(self._failover.run(run, context, audit)) as chunks:
                async for chunk in chunks:
                    yield chunk
            outcome = Outcome.COMPLETED
        except grpc.aio.AbortError:
            outcome, failed_code = Outcome.FAILED, _code_name(context.code())
            raise
        except Exception as exc:  # noqa: BLE001 - never UNKNOWN with an exception's text (it may quote content)
            log.error("request=%s internal error: %s", req.request_id, without_text(exc))
            outcome, failed_code = Outcome.FAILED, "INTERNAL"
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"coordinator {self._me} hit an internal error on request "
                f"{req.request_id}; retry, and report it with the coordinator's log",
            )
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
                record = audit.end(
                    outcome,
                    code or ("DEADLINE_EXCEEDED" if outcome is Outcome.DEADLINE else "CANCELLED"),
                    run=RunFacts.of(run),
                )
                if outcome is Outcome.FAILED:
                    await self._audit.write_or_log(
                        record
                    )  # the status goes out after the record is down
                else:
                    self._audit.submit(record)  # the caller left: nobody waits for it
            self._ended(audit.record, run, req, caller, started)
            log.info(
                "request=%s caller=%s outcome=%s tokens=%d nodes=%s failovers=%d restarts=%d total_ms=%.1f",
                req.request_id,
                caller,
                f"{outcome} code={failed_code}" if failed_code else outcome,
                len(run.delivered),
                ",".join(run.nodes) or "-",
                run.failovers,
                run.restarts,
                run.elapsed_ms(),
                extra=fields(
                    event="request.end",
                    request_id=req.request_id,
                    caller=caller,
                    outcome=audit.record.outcome,
                    code=audit.record.code,
                    node_id=run.nodes[-1] if run.nodes else "",
                    nodes=list(run.nodes),
                    tokens=len(run.delivered),
                    failovers=run.failovers,
                    retries=run.retries,
                    restarts=run.restarts,
                    total_ms=round(run.elapsed_ms(), 1),
                ),
            )

    async def refused(
        self,
        record: RequestRecord,
        request: Optional[inference_pb2.GenerateRequest],
        caller: str,
        started: float,
    ) -> None:
        """A request that ended before it ran (bad input, the caller's quota; or a body the
        front door could not read, with no request): its one audit record, then its summary."""
        await self._audit.write_or_log(record)
        self._ended(record, None, request or inference_pb2.GenerateRequest(), caller, started)

    def _ended(
        self,
        record: RequestRecord,
        run: Optional[Splice],
        req: inference_pb2.GenerateRequest,
        caller: str,
        started: float,
    ) -> None:
        """The one summary of a request for metrics and the request log (no content)."""
        now = time.time()
        done = record.completion
        s = RequestSummary(
            request_id=record.request_id or "-",
            caller=caller,
            priority="batch" if req.priority == inference_pb2.PRIORITY_BATCH else "interactive",
            started_at=started,
            ended_at=now,
            outcome=record.outcome or "",
            code=record.code or "",
            duration_s=now - started,
            finish_reason=done.finish_reason if done else "",
            prompt_tokens=done.prompt_tokens if done else 0,
        )
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
        if not s.template and req.WhichOneof("input") == "template":  # never reached a node
            s.template = prompts.recorded(
                req.template.name, req.template.version
            )  # registry names only
        self._monitor.request_ended(s)


def check_resumed_from(request: inference_pb2.GenerateRequest) -> None:
    """resumed_from_coordinator: an id, and only on a request that continues token ids."""
    origin = request.resumed_from_coordinator
    if not origin:
        return
    if not valid_id(origin):
        raise InvalidRequest(
            "resumed_from_coordinator must be a coordinator id: 1-128 characters from A-Z a-z 0-9 "
            ". _ : @ / + - (the coordinator_id of the chunks' ResumeInfo)"
        )
    if not request.prefix_token_ids:
        raise InvalidRequest(
            "resumed_from_coordinator is set without prefix_token_ids; a resumed stream sends "
            "the token ids it received as prefix_token_ids"
        )


def _code_name(code: Optional[grpc.StatusCode]) -> str:
    """The status a call ended with, by name ("" while it has none)."""
    return code.name if code is not None else ""


def _note_facts(s: RequestSummary, f: Optional[inference_pb2.FinalInfo]) -> None:
    """The note's template version, schema check and quality score from the final record."""
    if f is None:
        return
    s.template = prompts.known_id(f.template)  # registry names only, whatever a node sent
    if f.HasField("structured"):
        s.schema_valid = f.structured.valid
        s.output_format = f.structured.format
    if f.HasField("quality"):
        s.quality_score = f.quality.total
        s.quality_parts = {p.name: p.score for p in f.quality.parts}
