"""Failover through a real coordinator: a node killed, stopped or stalled mid-stream.

Every stream must complete with each token once, and at temperature 0 (or with a fixed
seed) the spliced text must equal what the same request yields uninterrupted.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from cluster.api import fleet_pb2
from cluster.tinymodel import TinyModelSpec, make_tiny_model
from tests.fleet_helpers import EventWatch, collect, in_threads, note

K = fleet_pb2


def _reference(node, requests):
    """The uninterrupted streams, straight from a node (same seed -> same tokens in any batch)."""
    return {r.request_id: collect(node.inference, r) for r in requests}


def _wait_started(streams, min_tokens: int, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while any(len(s.ids) < min_tokens for s in streams if s is not None) or None in streams:
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.005)


def _check_spliced(results, reference, max_tokens):
    for s in results:
        ref = reference[s.request.request_id]
        assert s.error is None, f"{s.request.request_id}: {s.error}"
        assert s.final.usage.completion_tokens == max_tokens == len(s.ids)
        assert s.ids == ref.ids, f"{s.request.request_id}: tokens lost, repeated or changed"
        assert s.text == ref.text, f"{s.request.request_id}: spliced text differs"


def _run_with(co, requests, on_progress):
    """Start every request through the coordinator; call on_progress(streams) once all flow."""
    live = [None] * len(requests)

    def run(i):
        return collect(co.inference, requests[i], on_chunk=lambda s, i=i: live.__setitem__(i, s))

    results, threads = in_threads(run, list(range(len(requests))))
    on_progress(live)
    for t in threads:
        t.join(120)
    return results


def test_kill_9_mid_stream_resumes_every_stream_on_another_node(start_node, start_coordinator, fleet_name):
    nodes = [start_node(node_id=f"k{i}", fleet=fleet_name) for i in range(3)]
    co = start_coordinator(fleet=fleet_name)
    co.wait_routable(3)
    max_tokens = 160
    requests = [note(i, max_tokens, request_id=f"kill-{i}", **({"temperature": 0.8, "seed": i} if i % 2 else {}))
                for i in range(9)]
    reference = _reference(nodes[2], requests)
    watch = EventWatch(co)
    victim = nodes[0]
    killed_at = []

    def kill(live):
        _wait_started(live, 10)
        killed_at.append(time.time())
        victim.proc.kill()

    try:
        results = _run_with(co, requests, kill)
        ejected = watch.wait_for(K.EVENT_KIND_EJECTED, victim.node_id, timeout_s=5)
        assert ejected.time_unix_s - killed_at[0] < 1.0, "a crash is an immediate ejection"
    finally:
        watch.close()
    _check_spliced(results, reference, max_tokens)
    moved = [s for s in results if s.final.failovers]
    assert moved, "some streams were running on the killed node"
    for s in moved:
        assert list(s.final.nodes)[0] == victim.node_id and s.final.nodes[-1] != victim.node_id
        assert s.final.failovers == 1
    assert all(s.final.failovers == 0 for s in results if victim.node_id not in s.final.nodes)


def test_a_node_that_ends_streams_itself_on_shutdown_hands_them_over(start_node, start_coordinator, fleet_name):
    leaving = start_node("--shutdown-grace-s", "0.3", node_id="leaving", fleet=fleet_name)
    staying = start_node(node_id="staying", fleet=fleet_name)
    co = start_coordinator(fleet=fleet_name)
    co.wait_routable(2)
    max_tokens = 400
    requests = [note(i, max_tokens, request_id=f"term-{i}") for i in range(4)]
    reference = _reference(staying, requests)

    def stop(live):
        _wait_started(live, 5)
        leaving.signal(signal.SIGTERM)  # grace 0.3 s, then the node ends streams with CANCELLED

    results = _run_with(co, requests, stop)
    _check_spliced(results, reference, max_tokens)
    assert any(s.final.failovers == 1 and s.final.nodes[0] == "leaving" for s in results)
    assert leaving.wait_exit(30) == 0


def test_no_node_with_the_same_weights_left_fails_with_aborted(start_node, start_coordinator, tmp_path, tiny_model):
    other_model = make_tiny_model(tmp_path / "other", TinyModelSpec(seed=7))
    only = start_node(node_id="pinned")
    other = start_node(node_id="other-weights", model=other_model)
    co = start_coordinator(nodes=[only.address, other.address])
    co.wait_routable(2)
    digest = only.status().model.weights_digest
    assert other.status().model.weights_digest != digest
    req = note(20, 1500, request_id="pinned-1")
    req.require_weights_digest = digest

    def kill(live):
        _wait_started(live, 5)
        only.proc.kill()

    (result,) = _run_with(co, [req], kill)
    assert result.error is not None and result.error.code() == grpc.StatusCode.ABORTED
    assert "no other READY node serves weights" in result.error.details()
    assert len(result.ids) >= 5


@pytest.mark.slow
def test_a_stalled_node_is_ejected_its_streams_move_and_it_is_readmitted(start_node, start_coordinator, fleet_name):
    stalled = start_node(node_id="stall", fleet=fleet_name)
    healthy = start_node(node_id="fine", fleet=fleet_name)
    co = start_coordinator(fleet=fleet_name)
    co.wait_routable(2)
    watch = EventWatch(co)
    max_tokens = 600
    requests = [note(i, max_tokens, request_id=f"stall-{i}") for i in range(4)]
    reference = _reference(healthy, requests)
    stopped_at = []

    def stall(live):
        _wait_started(live, 5)
        stopped_at.append(time.time())
        stalled.signal(signal.SIGSTOP)

    try:
        results = _run_with(co, requests, stall)
        ejected = watch.wait_for(K.EVENT_KIND_EJECTED, "stall", timeout_s=15)
        # Policy bound: 3 failed probes, each <= interval x 1.2 + the 1 s probe timeout.
        assert ejected.time_unix_s - stopped_at[0] < 3 * (1.2 + 1.0) + 1.0
        _check_spliced(results, reference, max_tokens)
        assert any(s.final.nodes[0] == "stall" and s.final.failovers == 1 for s in results)
        resumed_at = time.time()
        stalled.signal(signal.SIGCONT)
        back = watch.wait_for(K.EVENT_KIND_READMITTED, "stall", timeout_s=20, after=resumed_at)
        assert "3 passing probes" in back.reason
    finally:
        stalled.signal(signal.SIGCONT)
        watch.close()
    assert sum(n.routable for n in co.nodes().nodes) == 2
