"""Coordinator failover in the client library: coordinator A killed (SIGKILL) mid-stream.

Two real coordinators over one node; the client is given both addresses and starts on A;
24 streams at once, through the sync client and through the asyncio client (issue 24).
Once every stream has its first tokens A is killed: every stream must complete on B with
each token once, equal (token ids and text) to the same request uninterrupted (greedy or
seeded), count one coordinator failover, and B's audit chain must hold it as a request
resumed from A. Without another address, the caller gets a clear ResumeImpossibleError.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cluster.api import inference_pb2
from cluster.audit import query
from cluster.client import AsyncFleetClient, FleetClient, ResultBuilder, ResumeImpossibleError
from cluster.client.errors import FleetError
from cluster.validation import InvalidRequest
from coordinator.relay import check_resumed_from
from studiofleet_client.resume import StreamState
from tests.fleet_helpers import collect, in_threads, note

MAX_TOKENS = 160
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def pair(start_node, start_coordinator):
    """One node, coordinators co-a and co-b over it, both routing to it."""
    node = start_node("--max-running", "32", "--max-queued", "64", node_id="fo-node")
    a = start_coordinator(nodes=[node.address], name="co-a")
    b = start_coordinator(nodes=[node.address], name="co-b")
    a.wait_routable(1)
    b.wait_routable(1)
    return node, a, b


def _requests(tag: str, n: int) -> list[inference_pb2.GenerateRequest]:
    """Half greedy, half sampled with a seed; each runs to MAX_TOKENS (past end-of-sequence),
    so every one is still streaming when A is killed."""
    out = [
        note(
            i,
            MAX_TOKENS,
            request_id=f"{tag}-{i}",
            **({"temperature": 0.8, "seed": 1000 + i} if i % 2 else {}),
        )
        for i in range(n)
    ]
    for r in out:
        r.sampling.ignore_eos = True
    return out


def _reference(co, requests) -> dict:
    """The same requests uninterrupted (other ids), all at once through one coordinator."""
    refs = []
    for r in requests:
        ref = inference_pb2.GenerateRequest()
        ref.CopyFrom(r)
        ref.request_id = f"ref-{r.request_id}"
        refs.append(ref)
    streams, threads = in_threads(lambda r: collect(co.inference, r), refs)
    for t in threads:
        t.join(120)
    bad = [
        (s.request.request_id, s.error.code().name if s.error else "OK", len(s.ids))
        for s in streams
        if s.error is not None or len(s.ids) != MAX_TOKENS
    ]
    assert not bad, f"the uninterrupted reference streams did not complete: {bad[:3]}"
    return {r.request_id: s for r, s in zip(requests, streams)}


def _wait_all_started(progress: list[int], min_tokens: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while min(progress) < min_tokens:
        assert time.monotonic() < deadline, f"streams did not start: {progress}"
        time.sleep(0.005)
    assert max(progress) < MAX_TOKENS, "a stream finished before the kill: make them longer"


def _check(results, requests, reference, b) -> None:
    for req, r in zip(requests, results):
        rid = req.request_id
        assert not isinstance(r, Exception), f"{rid}: {r}"
        ref = reference[rid]
        assert r.token_ids == ref.ids, (
            f"{rid}: tokens lost, repeated or changed across the coordinator failover"
        )
        assert r.text == ref.text, f"{rid}: the spliced text differs from the uninterrupted text"
        assert r.completion_tokens == MAX_TOKENS == len(r.token_ids)
        assert r.coordinator_failovers == 1, (
            f"{rid}: {r.coordinator_failovers} coordinator failovers"
        )
        assert r.target == b.address and r.request_id == rid
        assert "resumed after coordinator co-a" in r.message
        if req.sampling.HasField("seed"):
            assert r.seed == req.sampling.seed


def _check_audit(b, requests) -> None:
    """B's chain holds each as a completed request resumed from co-a (before it, at most a
    refused try while the node still wound down A's run of the same id: ALREADY_EXISTS)."""
    for req in requests:
        records = [
            r for r in query(b.audit_dir, request_id=req.request_id) if r.get("type") == "request"
        ]
        (record,) = [r for r in records if r.get("outcome") == "completed"]
        assert all(r.get("code") == "ALREADY_EXISTS" for r in records if r is not record), records
        assert record["coordinator"] == "co-b", record
        assert record["resumed_from"] == "co-a", record
        assert 0 < record["resumed_after_tokens"] < MAX_TOKENS
        assert record["completion_tokens"] == MAX_TOKENS - record["resumed_after_tokens"]


def test_kill_9_of_the_coordinator_mid_stream_sync_client_resumes_every_stream(pair):
    node, a, b = pair
    requests = _requests("sync", 24)
    reference = _reference(b, requests)
    progress = [0] * len(requests)

    with FleetClient([a.address, b.address]) as client:

        def run(i):
            builder = ResultBuilder(requests[i].request_id)
            try:
                for chunk in client.stream(requests[i], timeout_s=120):
                    builder.add(chunk)
                    progress[i] += len(chunk.token_ids)
                return builder.result(target=client.target)
            except FleetError as exc:
                return exc

        results, threads = in_threads(run, list(range(len(requests))))
        _wait_all_started(progress, 3)
        a.proc.kill()
        a.proc.wait(10)
        for t in threads:
            t.join(120)
    _check(results, requests, reference, b)
    _check_audit(b, requests)

    # With no other coordinator left to resume on, the caller is told so (never silently cut).
    lone = note(99, MAX_TOKENS, request_id="lone-1")
    lone.sampling.ignore_eos = True
    got: list[int] = []
    with FleetClient(b.address) as client, pytest.raises(ResumeImpossibleError) as err:
        for chunk in client.stream(lone, timeout_s=60):
            got.extend(chunk.token_ids)
            if len(got) >= 3 and b.proc.poll() is None:
                b.proc.kill()
                b.proc.wait(10)
    message = str(err.value)
    assert (
        "lone-1" in message and "co-b" in message and "no other coordinator address" in message
    ), message
    assert f"{len(got)} tokens were delivered" in message and err.value.request_id == "lone-1"


def test_kill_9_of_the_coordinator_mid_stream_async_client_resumes_every_stream(pair):
    node, a, b = pair
    requests = _requests("async", 24)
    reference = _reference(b, requests)
    progress = [0] * len(requests)

    # The caller's streams are read chunk by chunk (to kill A once all flow) and collected
    # into results as generate() does (ResultBuilder).
    async def streamed():
        async with AsyncFleetClient([a.address, b.address]) as client:

            async def run(i):
                builder = ResultBuilder(requests[i].request_id)
                try:
                    async for chunk in client.stream(requests[i], timeout_s=120):
                        builder.add(chunk)
                        progress[i] += len(chunk.token_ids)
                    return builder.result(target=client.target)
                except FleetError as exc:
                    return exc

            tasks = [asyncio.create_task(run(i)) for i in range(len(requests))]
            deadline = time.monotonic() + 60
            while min(progress) < 3:
                assert time.monotonic() < deadline, f"streams did not start: {progress}"
                await asyncio.sleep(0.005)
            assert max(progress) < MAX_TOKENS, "a stream finished before the kill: make them longer"
            await asyncio.to_thread(_kill, a)
            return await asyncio.gather(*tasks)

    results = asyncio.run(streamed())
    _check(results, requests, reference, b)
    _check_audit(b, requests)


def _kill(proc) -> None:
    proc.proc.kill()
    proc.proc.wait(10)


class _Broken(grpc.RpcError):
    """A transport failure as grpc reports it."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "Socket closed"


def _chunk(ids, text, resume=None, final=False):
    c = inference_pb2.GenerateChunk(token_ids=ids, text=text)
    if resume is not None:
        c.resume.CopyFrom(resume)
    if final:
        c.final.usage.completion_tokens = 2
    return c


def test_the_continuation_carries_the_prefix_the_budget_the_seed_and_the_weights():
    req = note(1, 10, request_id="unit-1")
    state = StreamState(req, max_failovers=3)
    info = inference_pb2.ResumeInfo(
        seed=42, weights_digest=DIGEST, max_tokens=10, coordinator_id="co-a"
    )
    state.observe(_chunk([5, 6], "ab", info))
    state.observe(_chunk([7], ""))  # a token whose text (part of a character) is held back
    state.broke(_Broken(), "127.0.0.1:1", ["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:1"], 1)
    r = state.request
    assert list(r.prefix_token_ids) == [5, 6, 7] and r.prefix_text_chars == 2 and r.max_tokens == 7
    assert r.sampling.seed == 42 and r.require_weights_digest == DIGEST
    assert (
        r.resumed_from_coordinator == "co-a" and r.request_id == "unit-1" and state.failovers == 1
    )
    final = state.observe(_chunk([8, 9], "cde", final=True))
    assert final.final.usage.completion_tokens == 5 and final.final.coordinator_failovers == 1
    check_resumed_from(r)  # what the client sends passes the coordinator's check


def test_a_stream_without_resume_information_or_another_address_is_not_resumed_silently():
    req = note(1, 10, request_id="unit-2")
    state = StreamState(req, max_failovers=3)
    state.observe(_chunk([5], "a"))  # from a node: no ResumeInfo
    with pytest.raises(ResumeImpossibleError, match="unit-2.*no resume information"):
        state.broke(_Broken(), "t1", ["t1", "t2"], ["t1"], 1)
    state.observe(
        _chunk(
            [],
            "",
            inference_pb2.ResumeInfo(
                seed=1, weights_digest=DIGEST, max_tokens=10, coordinator_id="co-a"
            ),
        )
    )
    with pytest.raises(ResumeImpossibleError, match="no other coordinator address"):
        state.broke(_Broken(), "t1", ["t1"], ["t1"], 1)


@pytest.mark.parametrize(
    "origin, prefix, fix",
    [
        ("co a", [1], "must be a coordinator id"),
        ("x" * 200, [1], "must be a coordinator id"),
        ("co-a", [], "without prefix_token_ids"),
    ],
)
def test_the_coordinator_checks_resumed_from_coordinator(origin, prefix, fix):
    req = note(1, 10, request_id="unit-3")
    req.resumed_from_coordinator = origin
    req.prefix_token_ids[:] = prefix
    with pytest.raises(InvalidRequest, match=fix):
        check_resumed_from(req)


class _Refused(_Broken):
    def code(self):
        return grpc.StatusCode.FAILED_PRECONDITION

    def details(self):
        return "request unit-4: no READY node serves the required weights; check `fleetctl nodes`"


def test_a_continuation_the_next_coordinator_refuses_ends_in_resume_impossible():
    from studiofleet_client.retry import Attempts, RetryPolicy, decide_retry

    state = StreamState(note(1, 10, request_id="unit-4"), max_failovers=3)
    state.observe(
        _chunk(
            [5],
            "a",
            inference_pb2.ResumeInfo(
                seed=1, weights_digest=DIGEST, max_tokens=10, coordinator_id="co-a"
            ),
        )
    )
    attempts = Attempts(["t1", "t2"], 0, RetryPolicy(jitter=False), 30, "unit-4")
    attempts.begin()
    attempts.broke(_Broken(), state)
    assert attempts.target == "t2" and state.failovers == 1
    attempts.begin()
    with pytest.raises(ResumeImpossibleError) as err:
        attempts.failed(_Refused(), received_chunk=False, stream=state)
    message = str(err.value)
    assert (
        "unit-4" in message
        and "co-a" in message
        and "no READY node serves the required weights" in message
    )
    assert "1 tokens were delivered" in message and err.value.target == "t2"
    # While resuming, the node may still hold the dead coordinator's run of the id: wait and retry there.
    again = decide_retry(
        "ALREADY_EXISTS", received_chunk=False, attempt=1, time_left_s=10, resuming=True
    )
    assert again.retry and not again.next_target
    assert not decide_retry("ALREADY_EXISTS", received_chunk=False, attempt=1, time_left_s=10).retry


def test_the_coordinator_stamps_resume_information_on_its_first_chunk_and_after_a_restart():
    from coordinator.splice import Splice

    req = note(1, 10, request_id="unit-5", seed=7)
    req.allow_restart = True
    req.resumed_from_coordinator = "co-z"  # the audit's: never sent on to a node
    run = Splice(req, clock=time.monotonic)
    run.routed("n1", DIGEST)
    first, second = _chunk([1], "a"), _chunk([2], "b")
    for chunk in (first, second):
        run.absorb(chunk)
        run.stamp_resume(chunk, "co-a")
    assert first.resume == inference_pb2.ResumeInfo(
        seed=7, weights_digest=DIGEST, max_tokens=10, coordinator_id="co-a"
    )
    assert not second.HasField("resume")
    run.restart("gone")
    other = "sha256:" + "cd" * 32
    run.routed("n2", other)
    third = _chunk([3], "c")
    run.absorb(third)
    run.stamp_resume(third, "co-a")
    assert third.resume.weights_digest == other
    assert not run.request_for_node(other).resumed_from_coordinator
