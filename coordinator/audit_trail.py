"""What the coordinator writes to the audit chain: per request an `accepted` record, durable
before its first token leaves, and the record that ends it (linked by request_id; a request
refused before it reached a node has only the latter); per admin call its record, durable
before the call acts or answers. Keyed digests of content, never the content itself.

Record fields (docs/security.md): type, action, time (added by the log), request_id, caller,
role, peer, coordinator, outcome, code, nodes (every hop, in order, with model@version
and weights digest), failovers, retries, restarts, prompt/completion token counts, latency,
finish_reason, prompt_digest and completion_digest (HMAC-SHA256 under the audit key), and
after a restart on other weights `voided` (what the caller was sent and told to discard),
and for a stream a client resumed here after its coordinator failed, `resumed_from` (that
coordinator's id) and `resumed_after_tokens`.
The records are typed (coordinator/records.py); they become the log's dicts here, as written.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Callable, NoReturn, Optional

import grpc

from cluster.api import inference_pb2
from cluster.security.identity import Identity
from coordinator.call_context import CallContext
from coordinator.records import (
    AuditRecord,
    Caller,
    CallRecord,
    Completion,
    Hop,
    RequestRecord,
    Resumed,
    RunFacts,
)
from coordinator.request_summary import Outcome

log = logging.getLogger(__name__)


def canonical_input(request: inference_pb2.GenerateRequest) -> bytes:
    """The bytes a prompt digest is taken over, so an auditor holding the key and the
    alleged content can recompute it: JSON, sorted keys, no spaces, UTF-8."""
    kind = request.WhichOneof("input")
    if kind == "chat":
        body = {"messages": [[m.role, m.content] for m in request.chat.messages]}
    elif kind == "template":  # the caller's content is the variables (the template is public)
        t = request.template
        body = {"template": t.name, "version": t.version, "variables": dict(t.variables)}
    else:
        body = {"prompt": request.prompt}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class AuditTrail:
    """The coordinator's side of the audit log; `log=None` is audit off (plaintext only)."""

    def __init__(self, log_, *, coordinator_id: str):
        self.log = log_
        self._source = coordinator_id

    @property
    def on(self) -> bool:
        return self.log is not None

    @property
    def failing(self) -> str:
        """Why the audit log cannot be written now ("" when it can, or audit is off)."""
        return self.log.failing if self.log is not None else ""

    def prompt_digest(self, request: inference_pb2.GenerateRequest) -> str:
        return self.log.keys.digest(canonical_input(request)) if self.log else ""

    def completion_digest(self):
        return self.log.keys.digest_stream() if self.log else None

    def _who(self, ident: Optional[Identity], peer: str) -> Caller:
        return Caller.of(ident, peer, self._source)

    def request_record(
        self,
        ident: Optional[Identity],
        peer: str,
        *,
        request_id: str,
        prompt_digest: Optional[str] = None,
    ) -> RequestRecord:
        return RequestRecord(self._who(ident, peer), request_id, prompt_digest)

    async def write(self, record: AuditRecord) -> None:
        """Durable when it returns; raises the log's AuditWriteError."""
        if self.log is not None:
            await self.log.write(record.to_dict())

    async def write_or_log(self, record: AuditRecord) -> bool:
        """As write, for records of refusals and failures: the caller's answer does not
        wait on a broken disk; the failure is logged (and counted by the log)."""
        try:
            await self.write(record)
            return True
        except Exception as exc:  # noqa: BLE001 - AuditWriteError, or the disk
            log.error("audit record could not be written: %s", exc)
            return False

    def submit(self, record: AuditRecord) -> None:
        """Queued for the next group commit; for outcomes nobody is waiting on."""
        if self.log is not None:
            future = self.log.submit(record.to_dict())
            future.add_done_callback(_report_failure)

    def admin_record(
        self,
        ident: Optional[Identity],
        peer: str,
        action: str,
        *,
        outcome: str = Outcome.OK,
        code: str = "OK",
        **details,
    ) -> CallRecord:
        """`code=""` leaves the code out (an `accepted` record has none yet)."""
        return CallRecord("admin", action, self._who(ident, peer), outcome, code or None, details)

    async def admin(self, ident: Optional[Identity], peer: str, action: str, **fields) -> None:
        """An admin call's record, durable when it returns; raises the log's AuditWriteError."""
        await self.write(self.admin_record(ident, peer, action, **fields))

    async def admin_or_abort(
        self, context, ident: Optional[Identity], peer: str, action: str, *, done=False, **fields
    ) -> None:
        """An admin call's record, durable before the call goes on; else the call ends
        UNAVAILABLE naming the cause (`done`: the call has already acted, and it says so)."""
        try:
            await self.admin(ident, peer, action, **fields)
        except Exception as exc:  # noqa: BLE001 - AuditWriteError, or the log closed
            log.error("%s: its audit record could not be written: %s", action, exc)
            what = "was carried out, but its outcome" if done else "was refused: its"
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{action} {what} audit record could not be written "
                f"({self.failing or 'audit log closed'}); retry later (operators: check the "
                "coordinator's audit directory and disk)",
            )

    async def denied(
        self,
        ident: Optional[Identity],
        method: str,
        code: str,
        reason: str,
        *,
        peer: str = "",
        **details,
    ) -> None:
        """A refused call (with its peer when the port knows it; `count` and `window_s` for
        refusals an HTTP port recorded together); durable before the refusal goes out, as
        every other record a caller can look up."""
        await self.write_or_log(
            CallRecord(
                "request" if method.endswith("/Generate") else "admin",
                method,
                self._who(ident, peer),
                Outcome.DENIED,
                code,
                {"reason": reason, **details},
            )
        )


def _report_failure(future) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("audit record could not be written: %s", exc)


class RequestAudit:
    """One request's records: `accepted` once it is routed (durable before its first token)
    and exactly one record that ends it, both carrying its request_id."""

    def __init__(self, trail: AuditTrail, record: RequestRecord):
        self.trail = trail
        self.record = record
        self.written = False  # the end record
        self._accepted: Optional[asyncio.Future] = None
        self._durable = not trail.on

    def named(self, request_id: str) -> None:
        """The request's id, once it has one (a caller may leave it to the coordinator)."""
        self.record = replace(self.record, request_id=request_id)

    def resumed(self, coordinator: str, prefix_tokens: int) -> None:
        """The request continues a stream coordinator `coordinator` started (client failover)."""
        self.record = replace(self.record, resumed=Resumed(coordinator, prefix_tokens))

    def end(
        self,
        outcome: Outcome,
        code: str,
        *,
        reason: Optional[str] = None,
        run: Optional[RunFacts] = None,
        completion: Optional[Completion] = None,
    ) -> RequestRecord:
        self.written = True
        self.record = self.record.ended(
            outcome, code, reason=reason, run=run, completion=completion
        )
        return self.record

    def accept(self, hop: Hop) -> None:
        """Start writing the accepted record (who, what, where routed, prompt digest) as the
        request is first routed, so its fsync overlaps the node's prefill."""
        if self._accepted is not None or self._durable:
            return
        self._accepted = asyncio.ensure_future(self.trail.write(self.record.accepted(hop)))
        self._accepted.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def accepted(self) -> None:
        """Returns once the accepted record is durable (at once after the first time);
        raises AuditWriteError (or AuditError) when it cannot be written."""
        if self._durable:
            return
        if self._accepted is None:
            raise RuntimeError("a request's accepted record is awaited before it was routed")
        await asyncio.shield(self._accepted)
        self._durable = True


class AuditedCall:
    """The caller's context (a CallContext) as a request's run uses it. grpc.aio's abort()
    sends the status at once, so this abort() first ends the request's record and makes it
    durable (or logs why it could not): no failure status leaves before its audit record."""

    def __init__(self, context: CallContext, audit: RequestAudit, facts: Callable[[], RunFacts]):
        self._context = context
        self._audit = audit
        self._facts = facts  # what the end record keeps of the run so far

    def peer(self) -> str:
        return self._context.peer()

    def code(self):
        return self._context.code()

    def time_remaining(self) -> Optional[float]:
        return self._context.time_remaining()

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata=()
    ) -> NoReturn:
        if not self._audit.written:
            await self._audit.trail.write_or_log(
                self._audit.end(Outcome.FAILED, code.name, run=self._facts())
            )
        await self._context.abort(code, details, trailing_metadata=trailing_metadata)
