"""The coordinator's typed audit records (coordinator/records.py) become exactly the dicts
the chain has always held: same keys, same values, so the same bytes and hashes; and a
chain written from them verifies."""

from __future__ import annotations

import asyncio

import grpc

from cluster.audit import verify
from cluster.audit.chain import canonical
from cluster.security.identity import Identity, Role
from coordinator.audit_trail import AuditedCall, AuditTrail, RequestAudit
from coordinator.records import Caller, CallRecord, Completion, Hop, RunFacts, VoidedText
from coordinator.request_summary import Outcome
from tests.audit_helpers import open_log

ALICE = Identity(Role.APP, "alice")
FACTS = RunFacts(
    (Hop("n1", "tiny@v1", "sha256:aa"), Hop("n2", "tiny@v1", "sha256:aa")),
    1,
    0,
    0,
    12,
    40.5,
    "hmac:cd",
    (VoidedText("n0", "sha256:bb", 3, "hmac:ef"),),
)
BASE = {
    "type": "request",
    "action": "inference.generate",
    "caller": "alice",
    "role": "app",
    "peer": "ipv4:127.0.0.1:5",
    "coordinator": "co-1",
    "request_id": "r-1",
    "prompt_digest": "hmac:ab",
}


def test_a_request_record_at_each_stage_is_the_dict_it_always_was():
    trail = AuditTrail(None, coordinator_id="co-1")
    audit = RequestAudit(
        trail,
        trail.request_record(ALICE, "ipv4:127.0.0.1:5", request_id="-", prompt_digest="hmac:ab"),
    )
    audit.named("r-1")
    hop = Hop("n1", "tiny@v1", "sha256:aa")
    assert audit.record.accepted(hop).to_dict() == {
        **BASE,
        "outcome": "accepted",
        "nodes": [hop.to_dict()],
    }
    done = audit.end(Outcome.COMPLETED, "OK", run=FACTS, completion=Completion("length", 9, 11.2))
    facts = {
        "nodes": [
            {"node": "n1", "model": "tiny@v1", "digest": "sha256:aa"},
            {"node": "n2", "model": "tiny@v1", "digest": "sha256:aa"},
        ],
        "failovers": 1,
        "retries": 0,
        "restarts": 0,
        "completion_tokens": 12,
        "latency_ms": 40.5,
        "completion_digest": "hmac:cd",
        "voided": [
            {"node": "n0", "digest": "sha256:bb", "tokens": 3, "completion_digest": "hmac:ef"}
        ],
    }
    expected = {
        **BASE,
        "outcome": "completed",
        "code": "OK",
        **facts,
        "finish_reason": "length",
        "prompt_tokens": 9,
        "ttft_ms": 11.2,
    }
    assert done.to_dict() == expected and audit.written
    # An end after a withheld result keeps what the first end set, as the dict's update() did.
    again = audit.end(Outcome.FAILED, "UNAVAILABLE", run=FACTS)
    assert again.to_dict() == {**expected, "outcome": "failed", "code": "UNAVAILABLE"}
    assert canonical(again.to_dict()) == canonical(
        {**expected, "outcome": "failed", "code": "UNAVAILABLE"}
    )


def test_refusals_carry_no_run_and_the_front_door_no_prompt_digest():
    trail = AuditTrail(None, coordinator_id="co-1")
    quota = trail.request_record(
        ALICE, "ipv4:127.0.0.1:5", request_id="r-1", prompt_digest="hmac:ab"
    ).ended(Outcome.REFUSED, "RESOURCE_EXHAUSTED", reason="caller quota")
    assert quota.to_dict() == {
        **BASE,
        "outcome": "refused",
        "code": "RESOURCE_EXHAUSTED",
        "reason": "caller quota",
    }
    http = trail.request_record(ALICE, "http:127.0.0.1:9", request_id="r-2").ended(
        Outcome.REJECTED, "NOT_FOUND", reason="no such model"
    )
    assert "prompt_digest" not in http.to_dict() and http.to_dict()["outcome"] == "rejected"


def test_admin_denied_and_rollout_records_are_the_dicts_they_always_were():
    trail = AuditTrail(None, coordinator_id="co-1")
    who = {"caller": "alice", "role": "app", "peer": "p", "coordinator": "co-1"}
    assert trail.admin_record(
        ALICE, "p", "node.drain", outcome="accepted", code="", node_id="n1", operation_id="op"
    ).to_dict() == {
        "type": "admin",
        "action": "node.drain",
        **who,
        "outcome": "accepted",
        "node_id": "n1",
        "operation_id": "op",
    }
    assert trail.admin_record(None, "", "fleet.list_nodes").to_dict() == {
        "type": "admin",
        "action": "fleet.list_nodes",
        "caller": "",
        "role": "",
        "peer": "",
        "coordinator": "co-1",
        "outcome": "ok",
        "code": "OK",
    }
    rollout = CallRecord(
        "admin",
        "rollout.node",
        Caller("op@host", "operator", "", "co-1"),
        "done",
        "OK",
        {
            "rollout_id": "ro-1",
            "node_id": "n1",
            "from_digest": "a",
            "to_digest": "b",
            "reason": "ok",
        },
    )
    assert rollout.to_dict() == {
        "type": "admin",
        "action": "rollout.node",
        "caller": "op@host",
        "role": "operator",
        "peer": "",
        "coordinator": "co-1",
        "outcome": "done",
        "code": "OK",
        "rollout_id": "ro-1",
        "node_id": "n1",
        "from_digest": "a",
        "to_digest": "b",
        "reason": "ok",
    }


def test_records_written_through_the_trail_verify(tmp_path):
    log = open_log(tmp_path / "audit")
    trail = AuditTrail(log, coordinator_id="co-1")
    denied: list = []

    class Ctx:  # a CallContext whose abort raises as grpc's does
        def peer(self):
            return "p"

        def code(self):
            return None

        def time_remaining(self):
            return None

        async def abort(self, code, details="", trailing_metadata=()):
            denied.append(code)
            raise RuntimeError("aborted")

    async def main() -> None:
        await trail.denied(
            ALICE, "/studiofleet.v1.Inference/Generate", "PERMISSION_DENIED", "role", peer="p"
        )
        await trail.admin(ALICE, "p", "fleet.list_nodes")
        audit = RequestAudit(
            trail, trail.request_record(ALICE, "p", request_id="r-9", prompt_digest="hmac:1")
        )
        audit.accept(Hop("n1", "tiny", "sha256:aa"))
        await audit.accepted()
        call = AuditedCall(Ctx(), audit, lambda: FACTS)
        try:
            await call.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        except RuntimeError:
            pass

    asyncio.run(main())
    log.close()
    report = verify(tmp_path / "audit")
    assert report.ok and report.records >= 5, report.first_bad
    text = "".join(p.read_text() for p in sorted((tmp_path / "audit").glob("audit-*.jsonl")))
    assert (
        '"outcome":"denied"' in text
        and '"outcome":"accepted"' in text
        and '"outcome":"failed"' in text
    )
