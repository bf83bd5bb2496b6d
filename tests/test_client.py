"""The client library: the retry decision on its own, then FleetClient and AsyncFleetClient
against real fleet-node processes (failover across addresses, overload pushback,
cancellation, errors that name where and what)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.api import inference_pb2
from cluster.client import (
    AsyncFleetClient,
    FleetClient,
    GenerationInterruptedError,
    InvalidRequestError,
    OverloadedError,
    ResultBuilder,
    RetryPolicy,
    UnavailableError,
    build_request,
    decide_retry,
)
from cluster.client.errors import FleetError, ResumeImpossibleError, from_rpc_error
from cluster.client.results import with_request_id
from cluster.localfleet import HARNESS_NODE_CALLER
from cluster.security.identity import Role
from tests.procs import NodeProcess

# These tests call node agents directly, as the coordinator does.
pytestmark = pytest.mark.usefixtures("as_node_caller")

PHI_MARKER = "ZZ-SYNTHETIC-PATIENT-4410"
NO_JITTER = RetryPolicy(jitter=False)


def dead_address() -> str:
    """An address nothing listens on: bind port 0, note the port, close it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# --- the retry decision, without sockets ---------------------------------------------


def test_unavailable_backs_off_exponentially_to_the_next_address():
    delays = [
        decide_retry(
            "UNAVAILABLE",
            received_chunk=False,
            attempt=n,
            time_left_s=None,
            policy=RetryPolicy(max_attempts=8),
        )
        for n in range(1, 8)
    ]
    assert all(d.retry and d.next_target for d in delays)
    assert [round(d.delay_s, 3) for d in delays] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    jittered = decide_retry(
        grpc.StatusCode.UNAVAILABLE, received_chunk=False, attempt=2, time_left_s=None, jitter=0.5
    )
    assert jittered.retry and jittered.delay_s == pytest.approx(0.1)


def test_no_retry_after_a_chunk_or_when_attempts_or_time_run_out():
    for code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        d = decide_retry(code, received_chunk=True, attempt=1, time_left_s=None, pushback_ms=10)
        assert not d.retry and "chunks" in d.reason
    assert not decide_retry("UNAVAILABLE", received_chunk=False, attempt=3, time_left_s=None).retry
    assert decide_retry(
        "UNAVAILABLE",
        received_chunk=False,
        attempt=2,
        time_left_s=None,
        policy=RetryPolicy(max_attempts=3),
    ).retry
    assert not decide_retry(
        "UNAVAILABLE", received_chunk=False, attempt=1, time_left_s=0.12, policy=NO_JITTER
    ).retry  # 0.1 s wait + an attempt > 0.12 s
    assert decide_retry("UNAVAILABLE", received_chunk=False, attempt=1, time_left_s=0.5).retry


def test_resource_exhausted_waits_for_the_server_hint_within_cap_and_deadline():
    d = decide_retry(
        "RESOURCE_EXHAUSTED", received_chunk=False, attempt=1, time_left_s=5.0, pushback_ms=250
    )
    assert d.retry and d.delay_s == pytest.approx(0.25) and not d.next_target
    assert decide_retry(
        "RESOURCE_EXHAUSTED", received_chunk=False, attempt=1, time_left_s=None, pushback_ms=0
    ).retry
    for pushback, left in ((None, 5.0), (2500, None), (250, 0.2)):
        d = decide_retry(
            "RESOURCE_EXHAUSTED",
            received_chunk=False,
            attempt=1,
            time_left_s=left,
            pushback_ms=pushback,
        )
        assert not d.retry, (pushback, left)
    assert not decide_retry(
        "RESOURCE_EXHAUSTED", received_chunk=False, attempt=3, time_left_s=5.0, pushback_ms=10
    ).retry


@pytest.mark.parametrize(
    "code",
    [
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "CANCELLED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "ALREADY_EXISTS",
        "INTERNAL",
        "UNKNOWN",
        "PERMISSION_DENIED",
    ],
)
def test_other_codes_are_never_retried(code):
    d = decide_retry(code, received_chunk=False, attempt=1, time_left_s=None, pushback_ms=10)
    assert not d.retry and code in d.reason


# --- requests, results and error mapping, without sockets --------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailers=()):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def test_build_request_priority_and_session_key():
    req = build_request(prompt="x", max_tokens=3, priority="batch", session_key="visit-9")
    assert req.priority == inference_pb2.PRIORITY_BATCH and req.session_key == "visit-9"
    interactive = build_request(prompt="x", max_tokens=3, priority="interactive")
    assert interactive.priority == inference_pb2.PRIORITY_INTERACTIVE
    assert build_request(prompt="x", max_tokens=3).priority == inference_pb2.PRIORITY_UNSPECIFIED
    with pytest.raises(ValueError, match="batch"):
        build_request(prompt="x", max_tokens=3, priority="urgent")
    named = build_request(prompt="x", max_tokens=3, request_id="mine")
    assert with_request_id(named) is named
    fresh = with_request_id(req)
    assert (
        fresh.request_id.startswith("req-")
        and not req.request_id
        and fresh.session_key == "visit-9"
    )


def _final_chunk(reason, **kw):
    final = inference_pb2.FinalInfo(finish_reason=reason, node_id="n2", request_id="r1", **kw)
    final.usage.completion_tokens = 2
    return inference_pb2.GenerateChunk(text="b", token_ids=[2], final=final)


def test_result_builder_records_failovers_and_nodes():
    b = ResultBuilder("r1")
    b.add(inference_pb2.GenerateChunk(text="a", token_ids=[1]))
    b.add(_final_chunk(inference_pb2.FINISH_REASON_LENGTH, failovers=1, nodes=["n1", "n2"]))
    r = b.result(target="h:1", attempts=2)
    assert (r.text, r.token_ids, r.finish_reason, r.chunks) == ("ab", [1, 2], "length", 2)
    assert r.failovers == 1 and r.nodes == ["n1", "n2"] and r.as_dict()["nodes"] == ["n1", "n2"]
    assert "chunks" not in r.as_dict() and r.as_dict()["target"] == "h:1"
    direct = ResultBuilder("r1")
    direct.add(_final_chunk(inference_pb2.FINISH_REASON_STOP))
    assert direct.result().nodes == ["n2"] and direct.result().failovers == 0


def test_result_builder_keeps_only_what_follows_the_last_restart():
    b = ResultBuilder("r1")
    b.add(inference_pb2.GenerateChunk(text="void ", token_ids=[7, 8]))
    b.add(inference_pb2.GenerateChunk(text="also void", token_ids=[9]))
    b.add(inference_pb2.GenerateChunk(text="a", token_ids=[1], restarted=True))
    b.add(
        _final_chunk(
            inference_pb2.FINISH_REASON_LENGTH,
            failovers=1,
            nodes=["n1", "n2"],
            restarts=1,
            message="restarted from the beginning on node n2",
        )
    )
    r = b.result()
    assert (r.text, r.token_ids, r.restarts, r.failovers) == ("ab", [1, 2], 1, 1)
    assert r.as_dict()["restarts"] == 1 and "restarted" in r.message
    # A restart flagged on the final chunk itself leaves only that chunk's text.
    last = ResultBuilder("r1")
    last.add(inference_pb2.GenerateChunk(text="void", token_ids=[7]))
    chunk = _final_chunk(inference_pb2.FINISH_REASON_STOP, restarts=1)
    chunk.restarted = True
    last.add(chunk)
    assert (last.result().text, last.result().token_ids) == ("b", [2])
    assert build_request(prompt="x", max_tokens=3, allow_restart=True).allow_restart
    assert not build_request(prompt="x", max_tokens=3).allow_restart


def test_result_builder_raises_on_interrupted_or_missing_final():
    b = ResultBuilder("r1")
    b.add(_final_chunk(inference_pb2.FINISH_REASON_ERROR, message="engine failed"))
    with pytest.raises(GenerationInterruptedError) as err:
        b.result(target="h:1")
    assert err.value.partial.token_ids == [2] and err.value.finish_reason == "error"
    assert "engine failed" in str(err.value) and "h:1" in str(err.value) and "r1" in str(err.value)
    with pytest.raises(FleetError, match="without a final chunk.*h:1.*request r1"):
        ResultBuilder("r1").result(target="h:1")


def test_from_rpc_error_maps_codes_pushback_and_context():
    err = from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("grpc-retry-pushback-ms", "300"),)
        ),
        target="h:1",
        request_id="r9",
        attempts=2,
        targets_tried=["h:0", "h:1"],
    )
    assert isinstance(err, OverloadedError) and err.retry_after_ms == 300 and err.details == "full"
    assert "h:0, h:1" in err.message and "r9" in err.message and "300 ms" in err.message
    assert isinstance(
        from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "gone")), ResumeImpossibleError
    )
    plain = from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert type(plain) is FleetError and plain.code == "INTERNAL" and plain.message == "boom"


# --- the sync client against real nodes ---------------------------------------------------


def test_sync_fails_over_from_a_dead_address_and_then_starts_with_the_live_one(node):
    dead = dead_address()
    with FleetClient(node.address) as direct:
        expected = direct.generate(
            prompt="Assessment:", max_tokens=12, request_id="direct-1", timeout_s=30
        )
    with FleetClient([dead, node.address], retry_policy=NO_JITTER) as client:
        assert client.target == dead
        result = client.generate(
            prompt="Assessment:", max_tokens=12, request_id="failover-1", timeout_s=30
        )
        assert (result.target, result.attempts) == (node.address, 2)
        assert result.token_ids == expected.token_ids and result.text == expected.text
        assert result.request_id == "failover-1" and result.node_id == "shared-node"
        assert result.nodes == ["shared-node"] and result.failovers == 0
        assert client.target == node.address
        again = client.generate(prompt="Plan:", max_tokens=3, timeout_s=30)
        assert again.attempts == 1 and again.request_id.startswith("req-")
        chunks = list(client.stream(build_request(prompt="Plan:", max_tokens=3), timeout_s=30))
        assert chunks[-1].HasField("final")


def test_sync_single_target_with_own_channel_and_comma_list(node):
    with node.dial(HARNESS_NODE_CALLER, Role.COORDINATOR) as channel:
        client = FleetClient(node.address, channel=channel)
        assert client.targets == [node.address]
        assert client.generate(prompt="Plan:", max_tokens=2, timeout_s=30).nodes == ["shared-node"]
    with pytest.raises(ValueError, match="exactly one"):
        FleetClient([node.address, node.address], channel=object())
    with FleetClient(f"{node.address}, {node.address}") as client:
        assert client.targets == [node.address, node.address]
    with pytest.raises(ValueError):
        FleetClient([])


def test_sync_stream_closed_early_cancels_the_rpc(node):
    before = node.status().load
    with FleetClient(node.address) as client:
        req = build_request(prompt="Long note:", max_tokens=2000, request_id="s-break")
        with contextlib.closing(client.stream(req, timeout_s=60)) as chunks:
            next(chunks)
        st, waited = node.wait_until(lambda s: s.load.running == 0, 3.0, "the node saw the cancel")
    assert waited < 1.0
    assert st.load.requests_cancelled_total == before.requests_cancelled_total + 1


def test_sync_all_addresses_dead_is_unavailable_naming_them(node):
    dead = [dead_address(), dead_address()]
    start = time.monotonic()
    with (
        FleetClient(dead, retry_policy=NO_JITTER) as client,
        pytest.raises(UnavailableError) as err,
    ):
        client.generate(
            prompt=f"Patient {PHI_MARKER}", max_tokens=3, request_id="nowhere", timeout_s=10
        )
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 5, elapsed  # backoff 0.1 s + 0.2 s between the three attempts
    e = err.value
    assert e.attempts == 3 and e.targets_tried == dead and e.request_id == "nowhere"
    assert all(a in str(e) for a in dead) and "nowhere" in str(e) and "next:" in str(e)
    assert PHI_MARKER not in str(e)


def test_invalid_argument_is_not_retried(node):
    before = node.status().load.requests_rejected_total
    start = time.monotonic()
    with (
        FleetClient([node.address, node.address]) as client,
        pytest.raises(InvalidRequestError) as err,
    ):
        client.generate(
            prompt=f"Patient {PHI_MARKER}", max_tokens=0, request_id="bad-1", timeout_s=10
        )
    assert time.monotonic() - start < 2
    assert err.value.attempts == 1 and node.address in str(err.value) and "bad-1" in str(err.value)
    assert PHI_MARKER not in str(err.value)
    assert node.status().load.requests_rejected_total == before + 1


# --- the async client against a real node -------------------------------------------------


def test_async_generate_and_stream(node):
    async def main():
        async with AsyncFleetClient(
            [dead_address(), node.address], retry_policy=NO_JITTER
        ) as client:
            result = await client.generate(
                prompt="Assessment:", max_tokens=12, request_id="a-gen", timeout_s=30
            )
            req = build_request(prompt="Assessment:", max_tokens=12, request_id="a-stream")
            chunks = [c async for c in client.stream(req, timeout_s=30)]
            return result, chunks, client.target

    result, chunks, target = asyncio.run(asyncio.wait_for(main(), 60))
    assert result.attempts == 2 and result.target == node.address == target
    assert result.completion_tokens == len(result.token_ids) and result.nodes == ["shared-node"]
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert chunks[-1].final.request_id == "a-stream"


def test_async_invalid_argument_is_not_retried(node):
    async def main():
        async with AsyncFleetClient(node.address) as client:
            with pytest.raises(InvalidRequestError) as err:
                await client.generate(prompt="x", max_tokens=0, request_id="a-bad", timeout_s=10)
            return err.value

    err = asyncio.run(asyncio.wait_for(main(), 30))
    assert err.attempts == 1 and "a-bad" in str(err)


@pytest.mark.parametrize("how", ["stream", "generate"])
def test_async_cancellation_cancels_the_rpc(node, how):
    before = node.status().load

    async def main():
        async with AsyncFleetClient(node.address) as client:
            first = asyncio.Event()
            req = build_request(prompt="Long note:", max_tokens=2000, request_id=f"a-cancel-{how}")

            async def consume():
                if how == "stream":
                    async for _ in client.stream(req, timeout_s=60):
                        first.set()
                else:
                    await client.generate(req, timeout_s=60)

            task = asyncio.create_task(consume())
            if how == "stream":
                await asyncio.wait_for(first.wait(), 30)
            else:  # no chunk is visible through generate: wait until the node runs it
                await asyncio.to_thread(
                    node.wait_until, lambda s: s.load.running >= 1, 30, "request running"
                )
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The client (and its channel) stays open: only the task's cancel can reach the node.
            return await asyncio.to_thread(
                node.wait_until,
                lambda s: s.load.running == 0 and s.load.engine_sequences == 0,
                3.0,
                "the node saw the cancel",
            )

    st, waited = asyncio.run(asyncio.wait_for(main(), 60))
    assert waited < 1.0
    assert st.load.requests_cancelled_total == before.requests_cancelled_total + 1
    assert st.load.tokens_generated_total - before.tokens_generated_total < 2000


def test_async_stream_closed_early_cancels_the_rpc(node):
    before = node.status().load

    async def main():
        async with AsyncFleetClient(node.address) as client:
            req = build_request(prompt="Long note:", max_tokens=2000, request_id="a-break")
            async with contextlib.aclosing(client.stream(req, timeout_s=60)) as chunks:
                async for _ in chunks:
                    break
            return await asyncio.to_thread(
                node.wait_until, lambda s: s.load.running == 0, 3.0, "the node saw the cancel"
            )

    st, waited = asyncio.run(asyncio.wait_for(main(), 60))
    assert waited < 1.0
    assert st.load.requests_cancelled_total == before.requests_cancelled_total + 1


# --- overload: pushback honoured, then surfaced ---------------------------------------------


@pytest.fixture(scope="module")
def capped(tiny_model, tmp_path_factory):
    """A node with one slot, no queue, and a 200 ms retry hint."""
    proc = NodeProcess(
        tiny_model,
        "--max-running",
        "1",
        "--max-queued",
        "0",
        node_id="tiny-cap",
        env={"STUDIOFLEET_NODE_RETRY_AFTER_MS": "200"},
    )
    with proc:
        proc.start(tmp_path_factory.mktemp("cap-logs"))
        proc.wait_serving()
        yield proc


@contextlib.contextmanager
def occupied(node):
    """Hold the node's only slot with one long stream (not read on; the node keeps it)."""
    call = node.inference.Generate(
        build_request(prompt="Long note:", max_tokens=2000, request_id="hog"), timeout=60
    )
    try:
        next(call)
        node.wait_until(lambda s: s.load.running == 1, what="the slot taken")
        yield call
        assert node.status().load.running == 1, (
            "the long request ended early; the test proved nothing"
        )
    finally:
        call.cancel()
        node.wait_until(lambda s: s.load.running == 0, what="the slot freed")


def test_overload_retries_after_pushback_then_surfaces_overloaded(capped):
    before = capped.status().load.requests_rejected_total
    with occupied(capped), FleetClient(capped.address) as client:
        start = time.monotonic()
        with pytest.raises(OverloadedError) as err:
            client.generate(prompt="Plan:", max_tokens=3, request_id="over-1", timeout_s=10)
        elapsed = time.monotonic() - start
        e = err.value
        assert e.retry_after_ms == 200 and e.attempts == 3
        assert 0.4 <= elapsed < 3, elapsed  # two waits of the 200 ms hint
        assert "over-1" in str(e) and capped.address in str(e) and "200 ms" in str(e)
        assert capped.status().load.requests_rejected_total == before + 3

        # A hint that does not fit in the deadline is not waited for.
        start = time.monotonic()
        with pytest.raises(OverloadedError) as err:
            client.generate(prompt="Plan:", max_tokens=3, request_id="over-2", timeout_s=0.2)
        assert err.value.attempts == 1 and time.monotonic() - start < 0.2

        async def main():
            async with AsyncFleetClient(capped.address, max_attempts=2) as aclient:
                with pytest.raises(OverloadedError) as aerr:
                    await aclient.generate(
                        prompt="Plan:", max_tokens=3, request_id="over-3", timeout_s=10
                    )
                return aerr.value

        aerr = asyncio.run(asyncio.wait_for(main(), 30))
        assert aerr.attempts == 2 and aerr.retry_after_ms == 200
        assert capped.status().load.requests_rejected_total == before + 6


def test_overload_retry_succeeds_once_the_slot_frees(capped):
    before = capped.status().load.requests_rejected_total
    with FleetClient(capped.address, max_attempts=10) as client, ThreadPoolExecutor(1) as pool:
        hog = capped.inference.Generate(
            build_request(prompt="Long note:", max_tokens=2000, request_id="hog-2"), timeout=60
        )
        try:
            next(hog)
            future = pool.submit(
                client.generate, prompt="Plan:", max_tokens=3, request_id="waits", timeout_s=20
            )
            capped.wait_until(
                lambda s: s.load.requests_rejected_total > before, what="the first refusal"
            )
        finally:
            hog.cancel()
        result = future.result(timeout=30)
    assert result.finish_reason in ("length", "stop") and result.attempts >= 2
    assert capped.status().load.requests_rejected_total == before + result.attempts - 1
