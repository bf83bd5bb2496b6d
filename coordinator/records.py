"""The coordinator's audit records, typed (docs/security.md lists their fields).

A record becomes the audit log's dict of fields only at the boundary, `to_dict` (called
by coordinator/audit_trail.py as it writes), with exactly the keys the chain has always
held: a field left None is not written. The log hashes the canonical JSON of that dict
(cluster/audit/chain.py), so the on-disk format and every hash are what they were.
Keyed digests of content, never the content itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from cluster.security.identity import Identity
from coordinator.request_summary import Outcome
from coordinator.splice import Splice


@dataclass(frozen=True)
class Caller:
    """Who made a call and where it was taken, as every record of it names them."""

    caller: str = ""  # the certificate's (or token's) name
    role: str = ""
    peer: str = ""
    coordinator: str = ""  # the coordinator that took the call

    @classmethod
    def of(cls, ident: Optional[Identity], peer: str, coordinator: str) -> Caller:
        return cls(
            ident.name if ident else "", ident.role.value if ident else "", peer, coordinator
        )

    def to_dict(self) -> dict:
        return {
            "caller": self.caller,
            "role": self.role,
            "peer": self.peer,
            "coordinator": self.coordinator,
        }


@dataclass(frozen=True)
class Hop:
    """One node a request ran on."""

    node: str
    model: str  # model_id@version
    digest: str  # the weights

    def to_dict(self) -> dict:
        return {"node": self.node, "model": self.model, "digest": self.digest}


@dataclass(frozen=True)
class VoidedText:
    """What a restart on other weights made void (the caller was sent it and told to discard it)."""

    node: str
    digest: str
    tokens: int
    completion_digest: str

    def to_dict(self) -> dict:
        return {
            "node": self.node,
            "digest": self.digest,
            "tokens": self.tokens,
            "completion_digest": self.completion_digest,
        }


@dataclass(frozen=True)
class RunFacts:
    """What the audit keeps of a request's run: hops, counts and timing, no content. The
    completion fields describe the text the caller keeps; what a restart made void is kept
    per restart under `voided`."""

    nodes: tuple[Hop, ...]
    failovers: int
    retries: int
    restarts: int
    completion_tokens: int
    latency_ms: float
    completion_digest: str
    voided: tuple[VoidedText, ...] = ()

    @classmethod
    def of(cls, run: Splice) -> RunFacts:
        return cls(
            tuple(Hop(n, m, d) for n, m, d in run.hops),
            run.failovers,
            run.retries,
            run.restarts,
            len(run.delivered),
            round(run.elapsed_ms(), 1),
            run.completion_digest.hexdigest_str() if run.completion_digest else "",
            tuple(VoidedText(v.node, v.digest, v.tokens, v.completion_digest) for v in run.voided),
        )

    def to_dict(self) -> dict:
        out = {
            "nodes": [h.to_dict() for h in self.nodes],
            "failovers": self.failovers,
            "retries": self.retries,
            "restarts": self.restarts,
            "completion_tokens": self.completion_tokens,
            "latency_ms": self.latency_ms,
            "completion_digest": self.completion_digest,
        }
        if self.voided:
            out["voided"] = [v.to_dict() for v in self.voided]
        return out


@dataclass(frozen=True)
class Completion:
    """How a completed request's generation ended, from its final chunk."""

    finish_reason: str
    prompt_tokens: int
    ttft_ms: float

    def to_dict(self) -> dict:
        return {
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "ttft_ms": self.ttft_ms,
        }


@dataclass(frozen=True)
class RequestRecord:
    """A Generate's record: `accepted` once routed (with its first hop), then the one that ends
    it. Ending it keeps what an earlier end set and was not given again, as the record always has."""

    who: Caller
    request_id: str
    prompt_digest: Optional[str] = None  # None: refused before a request was read (the front door)
    outcome: Optional[Outcome] = None
    code: Optional[str] = None
    reason: Optional[str] = None  # why it was refused (never the caller's text)
    hop: Optional[Hop] = None  # the accepted record's first hop
    run: Optional[RunFacts] = None
    completion: Optional[Completion] = None
    resumed: Optional["Resumed"] = None  # a stream another coordinator started (client failover)

    TYPE = "request"
    ACTION = "inference.generate"

    def accepted(self, hop: Hop) -> RequestRecord:
        return replace(self, outcome=Outcome.ACCEPTED, hop=hop)

    def ended(
        self,
        outcome: Outcome,
        code: str,
        *,
        reason: Optional[str] = None,
        run: Optional[RunFacts] = None,
        completion: Optional[Completion] = None,
    ) -> RequestRecord:
        changes: dict[str, Any] = {"outcome": outcome, "code": code}
        for name, value in (("reason", reason), ("run", run), ("completion", completion)):
            if value is not None:
                changes[name] = value
        return replace(self, **changes)

    def to_dict(self) -> dict:
        out = {
            "type": self.TYPE,
            "action": self.ACTION,
            **self.who.to_dict(),
            "request_id": self.request_id,
        }
        for name in ("prompt_digest", "outcome", "code", "reason"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        if self.hop is not None:
            out["nodes"] = [self.hop.to_dict()]
        if self.run is not None:
            out.update(self.run.to_dict())
        if self.completion is not None:
            out.update(self.completion.to_dict())
        if self.resumed is not None:
            out.update(self.resumed.to_dict())
        return out


@dataclass(frozen=True)
class Resumed:
    """A request a client resumed here after the coordinator streaming it failed mid-stream."""

    coordinator: str  # the previous coordinator's id (GenerateRequest.resumed_from_coordinator)
    prefix_tokens: int  # the tokens the caller had received from it (prefix_token_ids)

    def to_dict(self) -> dict:
        return {"resumed_from": self.coordinator, "resumed_after_tokens": self.prefix_tokens}


@dataclass(frozen=True)
class CallRecord:
    """An admin call's record (and a refused call's, `denied`): its own fields in `details`
    (node_id, operation_id, rollout_id, reason, ...), never a caller's content."""

    type: str  # "admin"; "request" for a refused Generate
    action: str  # e.g. node.drain, rollout.start, /studiofleet.v1.Inference/Generate
    who: Caller
    outcome: str = Outcome.OK  # an Outcome, or for rollout.node the step it ended in
    code: Optional[str] = "OK"  # None: not yet known (an `accepted` record)
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "type": self.type,
            "action": self.action,
            **self.who.to_dict(),
            "outcome": str(self.outcome),
        }
        if self.code is not None:
            out["code"] = self.code
        out.update(self.details)
        return out


AuditRecord = RequestRecord | CallRecord
