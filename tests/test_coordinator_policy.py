"""The coordinator's decisions as pure functions: health verdicts, routing, splicing."""

from __future__ import annotations

import itertools
import time

from cluster.api import inference_pb2
from cluster.routing import Candidate, Want, pick
from coordinator import health_policy as hp
from coordinator.splice import Splice

POLICY = hp.Policy(
    eject_after_failures=3,
    eject_base_s=2.0,
    eject_max_s=5.0,
    readmit_after_probes=3,
    ejection_decay_s=100.0,
)
PROBE, REQUEST = hp.Source.PROBE, hp.Source.REQUEST


def _fail(h, *, hard=False, now=0.0, last=False, source=PROBE):
    return hp.on_failure(
        h,
        source=source,
        reason="probe timed out",
        hard=hard,
        now=now,
        last_healthy=last,
        policy=POLICY,
    )


def _ok(h, source=PROBE, now=0.0):
    return hp.on_success(h, source=source, now=now, policy=POLICY)


def _healthy():
    return _ok(hp.Health())


def test_n_consecutive_soft_failures_eject_and_a_success_resets_the_count():
    h = _healthy()
    assert h.verdict is hp.Verdict.HEALTHY
    h = _fail(_fail(h))
    assert h.verdict is hp.Verdict.SUSPECT and h.failures == 2
    h = _ok(h)
    assert h.verdict is hp.Verdict.HEALTHY and h.failures == 0
    h = _fail(_fail(_fail(h, now=10), now=11), now=12)
    assert h.verdict is hp.Verdict.EJECTED
    assert h.ejected_until == 12 + 2.0
    assert "3 consecutive probe failures" in h.reason


def test_a_node_that_answers_status_but_fails_requests_is_still_ejected():
    h = _healthy()
    for now in range(3):
        h = _fail(h, source=REQUEST, now=now)
        if h.verdict is not hp.Verdict.EJECTED:
            h = _ok(h, PROBE)  # its status probes keep passing in between
    assert h.verdict is hp.Verdict.EJECTED
    assert "3 consecutive request failures" in h.reason
    h = _fail(_fail(_healthy(), source=REQUEST), source=REQUEST)
    assert _ok(h, REQUEST).verdict is hp.Verdict.HEALTHY, (
        "a completed request clears request failures"
    )


def test_the_ejection_count_decays_after_a_long_healthy_spell():
    h = _fail(_healthy(), hard=True, now=0)
    h = hp.on_tick(h, now=2)
    for _ in range(3):
        h = _ok(h, now=2)
    assert h.verdict is hp.Verdict.HEALTHY and h.ejections == 1
    assert _ok(h, now=50).ejections == 1
    assert _ok(h, now=102).ejections == 0


def test_a_hard_signal_ejects_at_once_even_the_last_healthy_node():
    h = _fail(_healthy(), hard=True, last=True, now=1)
    assert h.verdict is hp.Verdict.EJECTED and h.ejections == 1


def test_the_last_healthy_node_is_never_ejected_on_soft_signals():
    h = _healthy()
    for _ in range(10):
        h = _fail(h, last=True)
    assert h.verdict is hp.Verdict.SUSPECT
    assert "last healthy node" in h.reason


def test_readmission_needs_the_backoff_then_passing_probes_and_backoff_grows_to_its_cap():
    h = _fail(_healthy(), hard=True, now=0)
    assert hp.on_tick(h, now=1.9).verdict is hp.Verdict.EJECTED
    h = hp.on_tick(h, now=2.0)
    assert h.verdict is hp.Verdict.PROBING
    h = _ok(_ok(h))
    assert h.verdict is hp.Verdict.PROBING and h.passes == 2
    h = _fail(h, now=3)  # a failed probe while probing: ejected again, for longer
    assert h.verdict is hp.Verdict.EJECTED and h.ejections == 2 and h.ejected_until == 3 + 4.0
    h = _fail(hp.on_tick(h, now=7), now=7)
    assert h.ejected_until == 7 + 5.0, "capped at eject_max_s"
    h = hp.on_tick(h, now=12)
    for _ in range(3):
        h = _ok(h)
    assert h.verdict is hp.Verdict.HEALTHY and "readmitted after 3 passing probes" in h.reason


def _cand(node_id, *, in_flight=0, tokens=0, queued=0, max_running=8, slots=16, digest="sha256:a"):
    return Candidate(node_id, digest, in_flight, tokens, queued, max_running, slots)


def test_least_outstanding_work_per_slot_wins():
    nodes = [
        _cand("a", in_flight=2, tokens=800),
        _cand("b", in_flight=3, tokens=300),
        _cand("c", in_flight=1, tokens=900, max_running=32),
    ]
    assert pick(nodes, Want()) == "c"  # 900/32 < 300/8 < 800/8
    assert pick(nodes, Want(exclude=frozenset({"c"}))) == "b"


def test_full_nodes_other_weights_and_failed_nodes_are_never_picked():
    nodes = [_cand("full", in_flight=16), _cand("other", digest="sha256:b"), _cand("failed")]
    assert pick(nodes, Want(digest="sha256:a", exclude=frozenset({"failed"}))) is None
    assert pick(nodes, Want(digest="sha256:b")) == "other"


def test_session_affinity_is_sticky_and_load_bounded():
    nodes = [_cand(n) for n in "abcd"]
    keys = [f"patient-session-{i}" for i in range(400)]
    first = {k: pick(nodes, Want(session_key=k)) for k in keys}
    assert all(pick(nodes, Want(session_key=k)) == first[k] for k in keys)
    spread = {n: sum(v == n for v in first.values()) for n in "abcd"}
    assert min(spread.values()) > 40, spread
    # The key's home node is far above the average: the key moves on, not piles on.
    home = first[keys[0]]
    busy = [_cand(n, in_flight=10 if n == home else 0) for n in "abcd"]
    assert pick(busy, Want(session_key=keys[0])) != home
    # Removing one node only moves the keys that lived on it.
    rest = [c for c in nodes if c.node_id != "d"]
    moved = [k for k in keys if first[k] != "d" and pick(rest, Want(session_key=k)) != first[k]]
    assert not moved


def test_splice_resumes_after_the_delivered_tokens_with_the_same_settings():
    req = inference_pb2.GenerateRequest(
        request_id="r1",
        prompt="Plan:",
        max_tokens=10,
        sampling=inference_pb2.SamplingParams(temperature=0.7, seed=42),
    )
    clock = itertools.count(0.0, 0.01).__next__
    run = Splice(req, clock=clock)
    first = run.request_for_node("sha256:abc")
    assert first.require_weights_digest == "sha256:abc", "pinned to the weights the router chose"
    assert first.prompt == req.prompt and not first.prefix_token_ids and first.max_tokens == 10
    run.routed("n1", "sha256:abc")
    assert run.absorb(inference_pb2.GenerateChunk(text="ab", token_ids=[5, 6])) == 2
    assert run.absorb(inference_pb2.GenerateChunk(text="c", token_ids=[7])) == 1
    run.failed("n1")
    nxt = run.request_for_node("sha256:other")
    assert list(nxt.prefix_token_ids) == [5, 6, 7] and nxt.max_tokens == 7
    assert nxt.require_weights_digest == "sha256:abc" and nxt.prefix_text_chars == 3
    assert nxt.sampling.seed == 42 and nxt.sampling.temperature == req.sampling.temperature
    assert run.failovers == 1 and run.excluded == {"n1"}
    run.routed("n2", "sha256:abc")
    last = inference_pb2.GenerateChunk(text="d", token_ids=[8])
    last.final.usage.completion_tokens = 1
    last.final.finish_reason = inference_pb2.FINISH_REASON_LENGTH
    run.absorb(last)
    out = run.final(last)
    assert out.final.usage.completion_tokens == 4
    assert out.final.failovers == 1 and list(out.final.nodes) == ["n1", "n2"]
    assert out.text == "d" and list(out.token_ids) == [8]


def test_a_caller_prefix_with_its_text_offset_is_carried_into_a_resume():
    req = inference_pb2.GenerateRequest(
        request_id="r2", prompt="Plan:", max_tokens=10, prefix_token_ids=[1, 2], prefix_text_chars=4
    )
    run = Splice(req, clock=itertools.count(0.0, 0.01).__next__)
    run.routed("n1", "sha256:abc")
    run.absorb(inference_pb2.GenerateChunk(text="xyz", token_ids=[9]))
    nxt = run.request_for_node("sha256:abc")
    assert list(nxt.prefix_token_ids) == [1, 2, 9] and nxt.prefix_text_chars == 4 + 3


def test_a_restart_voids_what_was_sent_and_asks_for_the_original_request():
    req = inference_pb2.GenerateRequest(
        request_id="r3",
        prompt="Plan:",
        max_tokens=10,
        allow_restart=True,
        sampling=inference_pb2.SamplingParams(temperature=0.7, seed=42),
    )
    run = Splice(req, clock=itertools.count(0.0, 0.01).__next__)
    assert run.request_for_node("sha256:aaa").allow_restart is False, "coordinator only"
    run.routed("n1", "sha256:aaa")
    run.absorb(inference_pb2.GenerateChunk(text="xyz", token_ids=[5, 6, 7]))
    run.failed("n1")
    assert run.restart_refusal() == ""
    voided = run.restart("no node serving sha256:aaa was left")
    assert (voided.node, voided.digest, voided.tokens) == ("n1", "sha256:aaa", 3)
    assert run.digest == "" and not run.delivered and run.text_chars == 0 and run.excluded == {"n1"}
    fresh = run.request_for_node("sha256:bbb")
    assert (
        not fresh.prefix_token_ids
        and not fresh.HasField("prefix_text_chars")
        and fresh.max_tokens == 10
    )
    assert fresh.require_weights_digest == "sha256:bbb" and fresh.sampling.seed == 42
    run.routed("n2", "sha256:bbb")
    first = inference_pb2.GenerateChunk(text="p", token_ids=[1])
    run.absorb(first)
    run.mark_restarted(first, "n2", "sha256:bbb")
    assert first.restarted and run.digest == "sha256:bbb", (
        "pinned to the new weights from its first token"
    )
    last = inference_pb2.GenerateChunk(text="q", token_ids=[2])
    last.final.finish_reason = inference_pb2.FINISH_REASON_STOP
    run.absorb(last)
    run.mark_restarted(last, "n2", "sha256:bbb")
    out = run.final(last)
    assert not out.restarted, "only the first chunk after the restart"
    f = out.final
    assert (f.usage.completion_tokens, f.failovers, f.restarts, list(f.nodes)) == (
        2,
        1,
        1,
        ["n1", "n2"],
    )
    assert "restarted from the beginning on node n2" in f.message and "node n1 failed" in f.message
    assert "(3) were discarded" in f.message
    # The caller's own pins forbid a restart elsewhere.
    pinned = inference_pb2.GenerateRequest(
        prompt="x", max_tokens=3, allow_restart=True, require_weights_digest="sha256:aaa"
    )
    assert "require_weights_digest" in Splice(pinned, clock=time.monotonic).restart_refusal()
    prefixed = inference_pb2.GenerateRequest(
        prompt="x", max_tokens=3, allow_restart=True, prefix_token_ids=[1]
    )
    assert "prefix_token_ids" in Splice(prefixed, clock=time.monotonic).restart_refusal()
    assert (
        "allow_restart"
        in Splice(
            inference_pb2.GenerateRequest(prompt="x", max_tokens=3), clock=time.monotonic
        ).restart_refusal()
    )


def test_a_stalled_attempt_is_evicted_and_a_flowing_one_is_not():
    """Attempt's watchdog on a real event loop; the node call is a stand-in that records
    cancel(), since a node that accepts a call and then never sends cannot be made on demand."""
    import asyncio

    from coordinator.attempt import Attempt

    class Call:
        cancelled = False

        def cancel(self):
            self.cancelled = True

        def done(self):
            return self.cancelled

    class Entry:
        node_id = "n-stall"

    async def scenario():
        stalled = Attempt(Entry(), first_token_s=0.05, stall_s=0.05)
        stalled.call = Call()
        flowing = Attempt(Entry(), first_token_s=0.05, stall_s=0.05)
        flowing.call = Call()
        for _ in range(8):
            await asyncio.sleep(0.02)
            flowing.progress(1)
        stalled.close()
        flowing.close()
        return stalled, flowing

    stalled, flowing = asyncio.run(scenario())
    assert stalled.call.cancelled and "no first token from node n-stall" in stalled.evicted
    assert not stalled.penalise, "a slow first token may be the node's queue: no penalty"
    assert flowing.evicted is None
