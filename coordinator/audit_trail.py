"""What the coordinator writes to the audit chain: one record per request (or refusal)
and per admin call, with keyed digests of content and never the content itself.

Record fields (README "Audit"): type, action, time (added by the log), request_id, caller,
role, peer, coordinator, outcome, code, nodes (every hop, in order, with model@version
and weights digest), failovers, retries, restarts, prompt/completion token counts, latency,
finish_reason, prompt_digest and completion_digest (HMAC-SHA256 under the audit key), and
after a restart on other weights `voided` (what the caller was sent and told to discard).
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from cluster.api import inference_pb2
from cluster.security.identity import Identity

log = logging.getLogger(__name__)


def canonical_input(request: inference_pb2.GenerateRequest) -> bytes:
    """The bytes a prompt digest is taken over, so an auditor holding the key and the
    alleged content can recompute it: JSON, sorted keys, no spaces, UTF-8."""
    kind = request.WhichOneof("input")
    if kind == "chat":
        body = {"messages": [[m.role, m.content] for m in request.chat.messages]}
    elif kind == "template":   # the caller's content is the variables (the template is public)
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

    def prompt_digest(self, request: inference_pb2.GenerateRequest) -> str:
        return self.log.keys.digest(canonical_input(request)) if self.log else ""

    def completion_digest(self):
        return self.log.keys.digest_stream() if self.log else None

    def _base(self, ident: Optional[Identity], peer: str, action: str, type_: str) -> dict:
        return {"type": type_, "action": action, "caller": ident.name if ident else "",
                "role": ident.role.value if ident else "", "peer": peer, "coordinator": self._source}

    def request_record(self, ident: Optional[Identity], peer: str, **fields) -> dict:
        return {**self._base(ident, peer, "inference.generate", "request"), **fields}

    async def write(self, record: dict) -> None:
        """Durable when it returns; raises the log's AuditWriteError."""
        if self.log is not None:
            await self.log.write(record)

    async def write_or_log(self, record: dict) -> bool:
        """As write, for records of refusals and failures: the caller's answer does not
        wait on a broken disk; the failure is logged (and counted by the log)."""
        try:
            await self.write(record)
            return True
        except Exception as exc:  # noqa: BLE001 - AuditWriteError, or the disk
            log.error("audit record could not be written: %s", exc)
            return False

    def submit(self, record: dict) -> None:
        """Queued for the next group commit; for outcomes nobody is waiting on."""
        if self.log is not None:
            future = self.log.submit(record)
            future.add_done_callback(_report_failure)

    def admin(self, ident: Optional[Identity], peer: str, action: str, *, outcome: str = "ok",
              code: str = "OK", **details) -> None:
        self.submit({**self._base(ident, peer, action, "admin"), "outcome": outcome, "code": code, **details})

    async def denied(self, ident: Optional[Identity], method: str, code: str, reason: str, *, peer: str = "",
                     **details) -> None:
        """A refused call (with its peer when the port knows it; `count` and `window_s` for
        refusals an HTTP port recorded together); durable before the refusal goes out, as
        every other record a caller can look up."""
        await self.write_or_log({**self._base(ident, peer, method, "request" if method.endswith("/Generate") else "admin"),
                                 "outcome": "denied", "code": code, "reason": reason, **details})


def _report_failure(future) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("audit record could not be written: %s", exc)
