"""Arbitrary GenerateRequests (Hypothesis) through a live coordinator.

Whatever the fields hold, the answer is a completed stream or a named client-error
status; never UNKNOWN, INTERNAL or UNAVAILABLE, never a dead coordinator, never caller
text in an error or a log line.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.api import inference_pb2
from tests.test_node_fuzz import MARK, requests, served_or_refused


@pytest.fixture(scope="module")
def coordinator(node, tmp_path_factory):
    from tests.procs import CoordinatorProcess

    with CoordinatorProcess(nodes=[node.address], name="fuzz-coordinator") as co:
        co.start(tmp_path_factory.mktemp("fuzz-logs"))
        co.wait_serving()
        co.wait_routable(1)
        yield co


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests())
def test_live_coordinator_survives_arbitrary_requests(coordinator, req):
    final = served_or_refused(coordinator.inference, req)
    assert final is None or final.failovers == 0


@st.composite
def nearly_valid(draw) -> inference_pb2.GenerateRequest:
    """Requests that pass the coordinator's checks, so routing, node-side limits, resume
    fields and pinning are exercised, not only validation."""
    req = inference_pb2.GenerateRequest(
        request_id=draw(
            st.one_of(st.just(""), st.text("abcdef-0123456789", min_size=1, max_size=20))
        ),
        max_tokens=draw(st.integers(1, 12)),
        stop=draw(
            st.lists(st.text(min_size=1, max_size=4).map(lambda t: t + MARK[:2]), max_size=2)
        ),
        prefix_token_ids=draw(st.lists(st.integers(0, 600), max_size=4)),
        require_weights_digest=draw(st.sampled_from(["", "", "", "sha256:" + "0" * 64])),
        priority=draw(st.sampled_from([0, 1, 2])),
        session_key=draw(st.sampled_from(["", "clinic-1"])),
    )
    req.prompt = draw(st.text(min_size=1, max_size=60).filter(lambda t: t.strip())) + MARK
    if req.prefix_token_ids and draw(st.booleans()):
        req.prefix_text_chars = draw(st.integers(0, 50))
    req.sampling.temperature = draw(st.floats(0, 2))
    req.sampling.top_p = draw(st.floats(0.05, 1))
    if draw(st.booleans()):
        req.sampling.seed = draw(st.integers(0, 2**64 - 1))
    return req


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(nearly_valid())
def test_live_coordinator_routes_arbitrary_valid_requests(coordinator, req):
    test_live_coordinator_survives_arbitrary_requests.hypothesis.inner_test(coordinator, req)


def test_fuzzed_text_never_reached_the_coordinator_log(coordinator):
    listing = coordinator.nodes()
    assert listing.nodes[0].routable, "the node was never penalised for the caller's mistakes"
    assert listing.nodes[0].failovers_total == 0
    logs = coordinator.stderr()
    assert "outcome=completed" in logs and "rejected" in logs
    assert MARK not in logs
