"""Arbitrary GenerateRequests (Hypothesis) against validation and a live node.

Whatever the fields hold, the answer is a completed stream or a named client-error
status; never UNKNOWN or INTERNAL, never a dead daemon, never caller text in the error.
"""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.api import inference_pb2
from node_agent.validation import InvalidRequest, Limits, validate

MARK = "QQ-FUZZ-PHI"
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}

floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))
texts = st.text(max_size=40).map(lambda t: t + MARK)


@st.composite
def requests(draw) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(
        request_id=draw(st.one_of(st.just(""), st.text(max_size=140))),
        max_tokens=draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))),
        stop=draw(st.lists(st.text(max_size=70), max_size=10)),
        prefix_token_ids=draw(st.lists(st.integers(0, 2**32 - 1), max_size=5)),
        require_weights_digest=draw(st.one_of(st.just(""), st.text(max_size=80))),
        priority=draw(st.sampled_from([0, 1, 2])),
    )
    if draw(st.booleans()):
        req.prompt = draw(texts)
    elif draw(st.booleans()):
        for role, content in draw(
            st.lists(
                st.tuples(
                    st.one_of(
                        st.sampled_from(["system", "user", "assistant"]), st.text(max_size=20)
                    ),
                    texts,
                ),
                max_size=4,
            )
        ):
            req.chat.messages.add(role=role, content=content)
    s = req.sampling
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        value = draw(floats)
        if value is not None:
            setattr(s, name, value)
    if draw(st.booleans()):
        s.top_k = draw(st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    return req


@settings(max_examples=300, deadline=None)
@given(requests())
def test_validate_accepts_or_explains(req):
    limits = Limits(max_tokens=64, context_length=256, vocab_size=500, max_stop_sequences=4)
    try:
        valid = validate(req, limits)
    except InvalidRequest as exc:
        assert MARK not in str(exc)
        return
    assert 1 <= valid.max_tokens <= 64
    assert valid.sampling.temperature >= 0 and 0 < valid.sampling.top_p <= 1


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests())
def test_live_node_survives_arbitrary_requests(node, req):
    served_or_refused(node.inference, req)


def served_or_refused(stub, req):
    """A completed stream (its final chunk, returned) or a named client error without caller text."""
    try:
        chunks = list(stub.Generate(req, timeout=30))
    except grpc.RpcError as err:
        assert err.code() in CLIENT_ERRORS, (err.code(), err.details())
        assert MARK not in (err.details() or "")
        return None
    assert chunks and chunks[-1].HasField("final")
    assert chunks[-1].final.finish_reason in (
        inference_pb2.FINISH_REASON_STOP,
        inference_pb2.FINISH_REASON_LENGTH,
    )
    return chunks[-1].final


def test_fuzzed_text_never_reached_the_node_log(node):
    """Runs after the live fuzz test in this module: no prompt, role, id or stop text logged."""
    logs = node.stderr()
    assert "outcome=" in logs or "rejected" in logs
    assert MARK not in logs
