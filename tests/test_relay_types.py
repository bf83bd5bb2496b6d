"""The relay's typed seams (issue 22): one CallContext for both doors, outcomes that are
the words the audit chain and request log carry, and a NodeFailure per failed node call."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from coordinator.audit_trail import AuditedCall
from coordinator.call_context import CallContext
from coordinator.failover import NodeFailure
from coordinator.openai_http import HttpCall
from coordinator.request_summary import FAILED_OUTCOMES, REJECTED_OUTCOMES, Outcome


def test_both_doors_and_the_audited_wrapper_are_call_contexts():
    assert issubclass(grpc.aio.ServicerContext, CallContext)
    assert isinstance(HttpCall("http:127.0.0.1:1"), CallContext)
    assert issubclass(AuditedCall, CallContext)
    assert not hasattr(
        HttpCall("http:-"), "identity"
    )  # the caller is handed over, never probed for


def test_an_http_call_ends_like_a_grpc_one():
    call = HttpCall("http:-")
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(
            call.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "busy",
                trailing_metadata=(("grpc-retry-pushback-ms", "200"),),
            )
        )
    assert call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    err = call.error()
    assert err.status == 429 and err.relayed


def test_outcomes_are_the_recorded_words():
    assert [o.value for o in Outcome] == [
        "completed",
        "failed",
        "cancelled",
        "deadline",
        "rejected",
        "refused",
        "accepted",
        "denied",
        "ok",
    ]
    assert (
        Outcome.FAILED == "failed"
        and str(Outcome.DEADLINE) == "deadline"
        and f"{Outcome.REFUSED}" == "refused"
    )
    assert (
        "deadline" in FAILED_OUTCOMES
        and "refused" in REJECTED_OUTCOMES
        and "completed" not in FAILED_OUTCOMES
    )


def test_a_node_failure_is_frozen_and_penalises_by_default():
    f = NodeFailure("UNAVAILABLE: connection reset", hard=True)
    assert (f.hard, f.penalise) == (True, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.hard = False
