"""Bad input, capacity, cancellation and deadlines on a real fleet-node process."""

from __future__ import annotations

import grpc
import pytest

from cluster.api import inference_pb2
from cluster.client import build_request

PHI_MARKER = "ZZ-SYNTHETIC-PATIENT-7731"


def _drain(call):
    return list(call)


def _msg(**kw):
    return inference_pb2.GenerateRequest(**kw)


def _chat(*pairs, **kw):
    req = inference_pb2.GenerateRequest(**kw)
    req.chat.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in pairs)
    return req


BAD_INPUTS = {
    "no input": (_msg(max_tokens=5), "no input"),
    "empty prompt": (_msg(prompt="", max_tokens=5), "prompt is empty"),
    "blank prompt": (_msg(prompt="   \n", max_tokens=5), "prompt is empty"),
    "empty chat": (_chat(max_tokens=5), "chat.messages is empty"),
    "unknown role": (
        _chat(("doctor", f"note for {PHI_MARKER}"), max_tokens=5),
        "role is not one of system",
    ),
    "max_tokens zero": (_msg(prompt=PHI_MARKER, max_tokens=0), "max_tokens must be between 1 and"),
    "max_tokens too big": (
        _msg(prompt=PHI_MARKER, max_tokens=100_000),
        "max_tokens must be between 1 and",
    ),
    "negative temperature": (
        _msg(
            prompt=PHI_MARKER, max_tokens=5, sampling=inference_pb2.SamplingParams(temperature=-0.5)
        ),
        "temperature must be >= 0",
    ),
    "nan temperature": (
        _msg(
            prompt=PHI_MARKER,
            max_tokens=5,
            sampling=inference_pb2.SamplingParams(temperature=float("nan")),
        ),
        "temperature must be a finite number",
    ),
    "top_p zero": (
        _msg(prompt=PHI_MARKER, max_tokens=5, sampling=inference_pb2.SamplingParams(top_p=0.0)),
        "top_p must be in (0, 1]",
    ),
    "top_p above one": (
        _msg(prompt=PHI_MARKER, max_tokens=5, sampling=inference_pb2.SamplingParams(top_p=1.5)),
        "top_p must be in (0, 1]",
    ),
    "negative top_k": (
        _msg(prompt=PHI_MARKER, max_tokens=5, sampling=inference_pb2.SamplingParams(top_k=-1)),
        "top_k must be >= 0",
    ),
    "min_p above one": (
        _msg(prompt=PHI_MARKER, max_tokens=5, sampling=inference_pb2.SamplingParams(min_p=2.0)),
        "min_p must be in [0, 1]",
    ),
    "zero repetition penalty": (
        _msg(
            prompt=PHI_MARKER,
            max_tokens=5,
            sampling=inference_pb2.SamplingParams(repetition_penalty=0.0),
        ),
        "repetition_penalty must be > 0",
    ),
    "prompt longer than context": (
        _msg(prompt=(PHI_MARKER + " ") * 1000, max_tokens=5),
        "longer than this node's context",
    ),
    "prompt far beyond context": (
        _msg(prompt=(PHI_MARKER + " ") * 2000, max_tokens=5),
        "characters, far beyond this node's context",
    ),
    "prompt plus max_tokens over context": (
        _msg(prompt=(PHI_MARKER + " ") * 40, max_tokens=1500),
        "exceeds the context",
    ),
    "prefix outside vocabulary": (
        _msg(prompt=PHI_MARKER, max_tokens=5, prefix_token_ids=[10**6]),
        "outside this model's vocabulary",
    ),
    "bad request id": (
        _msg(request_id=f"bad\n{PHI_MARKER}", prompt=PHI_MARKER, max_tokens=5),
        "request_id must be 1-128 characters from",
    ),
    "empty stop": (_msg(prompt=PHI_MARKER, max_tokens=5, stop=[""]), "stop[0] must be"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_and_node_still_serves(node, name):
    req, expected = BAD_INPUTS[name]
    with pytest.raises(grpc.RpcError) as err:
        _drain(node.inference.Generate(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.value.details()
    assert "shared-node" in err.value.details()
    assert PHI_MARKER not in err.value.details()
    chunks = _drain(
        node.inference.Generate(build_request(prompt="Plan:", max_tokens=3), timeout=10)
    )
    assert chunks[-1].HasField("final")


def test_wrong_weights_digest_is_failed_precondition(node):
    req = build_request(prompt="Plan:", max_tokens=3)
    req.require_weights_digest = "sha256:" + "0" * 64
    with pytest.raises(grpc.RpcError) as err:
        _drain(node.inference.Generate(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    req.require_weights_digest = node.status().model.weights_digest
    assert _drain(node.inference.Generate(req, timeout=10))[-1].HasField("final")


def test_no_prompt_text_in_node_logs(node):
    _drain(
        node.inference.Generate(
            build_request(
                prompt=f"Patient {PHI_MARKER} reports", max_tokens=4, request_id="phi-check"
            ),
            timeout=10,
        )
    )
    with pytest.raises(grpc.RpcError):
        _drain(node.inference.Generate(_chat(("nurse", PHI_MARKER), max_tokens=4), timeout=10))
    logs = node.stderr()
    assert "phi-check" in logs
    assert PHI_MARKER not in logs


def test_cancelled_stream_frees_its_slot_at_once(node):
    before = node.status().load
    call = node.inference.Generate(
        build_request(prompt="Long note:", max_tokens=1800, request_id="to-cancel"), timeout=60
    )
    next(call)
    busy = node.status().load
    assert busy.running >= 1 and busy.engine_sequences >= 1
    call.cancel()
    st, waited = node.wait_until(
        lambda s: s.load.running == 0 and s.load.engine_sequences == 0,
        timeout_s=2.0,
        what="slot freed after cancel",
    )
    assert waited < 0.5
    assert st.load.requests_cancelled_total == before.requests_cancelled_total + 1
    # The engine stopped generating: far fewer than max_tokens were produced.
    assert st.load.tokens_generated_total - before.tokens_generated_total < 1800


def test_deadline_exceeded_stops_generation(node):
    before = node.status().load
    with pytest.raises(grpc.RpcError) as err:
        _drain(
            node.inference.Generate(
                build_request(prompt="Long note:", max_tokens=2000, request_id="too-slow"),
                timeout=0.3,
            )
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    st, _ = node.wait_until(
        lambda s: (
            s.load.requests_deadline_total == before.requests_deadline_total + 1
            and s.load.engine_sequences == 0
        ),
        timeout_s=3.0,
        what="deadline recorded",
    )
    assert st.load.tokens_generated_total - before.tokens_generated_total < 2000


def test_over_capacity_is_resource_exhausted_with_retry_hint(start_node):
    small = start_node("--max-running", "2", "--max-queued", "1", node_id="small-node")

    def fill(i):
        return small.inference.Generate(
            build_request(prompt=f"Note {i}:", max_tokens=1800, request_id=f"fill-{i}"), timeout=60
        )

    calls = [fill(0), fill(1)]
    next(calls[0]), next(calls[1])
    small.wait_until(lambda s: s.load.running == 2, what="2 running")
    calls.append(fill(2))  # only now: it must find both slots taken, however slow this machine is
    small.wait_until(
        lambda s: s.load.running == 2 and s.load.queued == 1, what="2 running + 1 queued"
    )
    with pytest.raises(grpc.RpcError) as err:
        _drain(
            small.inference.Generate(
                build_request(prompt="One more", max_tokens=4, request_id="overflow"), timeout=10
            )
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in err.value.details()
    trailers = dict(err.value.trailing_metadata())
    assert int(trailers["grpc-retry-pushback-ms"]) > 0
    for call in calls:
        call.cancel()
    small.wait_until(lambda s: s.load.running == 0 and s.load.queued == 0, what="all cancelled")
    chunks = _drain(
        small.inference.Generate(build_request(prompt="Plan:", max_tokens=3), timeout=10)
    )
    assert chunks[-1].HasField("final")
    st = small.status().load
    assert st.requests_rejected_total == 1
    assert (
        st.requests_accepted_total == st.requests_completed_total + st.requests_cancelled_total == 4
    )
