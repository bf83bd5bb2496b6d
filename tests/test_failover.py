"""Failover through a real coordinator: a node killed, stopped or stalled mid-stream.

Every stream must complete with each token once, and at temperature 0 (or with a fixed
seed) the spliced text must equal what the same request yields uninterrupted. A stream
whose weights are gone fails ABORTED, or with allow_restart starts over on other weights.
"""

from __future__ import annotations

import hashlib
import hmac
import signal
import subprocess
import sys
import time

import grpc
import pytest

from cluster.api import fleet_pb2, inference_pb2
from cluster.audit import query
from cluster.audit.keys import default_key_dir
from cluster.client import FleetClient, build_request
from cluster.security.identity import Role, dns_name
from cluster.tinymodel import TinyModelSpec, make_tiny_model
from tests.fleet_helpers import EventWatch, collect, in_threads, note
from tests.procs import ROOT

K = fleet_pb2


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A tiny model with other weights (another seed), so another weights digest."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "other", TinyModelSpec(seed=7))


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


def test_kill_9_mid_stream_resumes_every_stream_on_another_node(
    start_node, start_coordinator, fleet_name
):
    nodes = [start_node(node_id=f"k{i}", fleet=fleet_name) for i in range(3)]
    co = start_coordinator(fleet=fleet_name)
    co.wait_routable(3)
    max_tokens = 160
    requests = [
        note(
            i,
            max_tokens,
            request_id=f"kill-{i}",
            **({"temperature": 0.8, "seed": i} if i % 2 else {}),
        )
        for i in range(9)
    ]
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


def test_a_node_that_ends_streams_itself_on_shutdown_hands_them_over(
    start_node, start_coordinator, fleet_name
):
    leaving = start_node("--shutdown-grace-s", "0.3", node_id="leaving", fleet=fleet_name)
    staying = start_node(node_id="staying", fleet=fleet_name)
    co = start_coordinator(fleet=fleet_name)
    co.wait_routable(2)
    # Long enough that no stream on "leaving" can finish between its start and the SIGTERM's
    # grace running out, however slowly a loaded machine delivers the signal (400 could).
    max_tokens = 1200
    requests = [note(i, max_tokens, request_id=f"term-{i}") for i in range(4)]
    reference = _reference(staying, requests)

    def stop(live):
        _wait_started(live, 5)
        leaving.signal(signal.SIGTERM)  # grace 0.3 s, then the node ends streams with CANCELLED

    results = _run_with(co, requests, stop)
    _check_spliced(results, reference, max_tokens)
    assert any(s.final.failovers == 1 and s.final.nodes[0] == "leaving" for s in results)
    assert leaving.wait_exit(30) == 0


@pytest.mark.parametrize("allow_restart", [False, True])
def test_no_node_with_the_same_weights_left_fails_with_aborted(
    start_node, start_coordinator, other_model, allow_restart
):
    """Weights the caller required are never swapped, even with allow_restart."""
    only = start_node(node_id="pinned")
    other = start_node(node_id="other-weights", model=other_model)
    co = start_coordinator(nodes=[only.address, other.address])
    co.wait_routable(2)
    digest = only.status().model.weights_digest
    assert other.status().model.weights_digest != digest
    req = note(20, 1500, request_id="pinned-1")
    req.require_weights_digest = digest
    req.allow_restart = allow_restart

    def kill(live):
        _wait_started(live, 5)
        only.proc.kill()

    (result,) = _run_with(co, [req], kill)
    assert result.error is not None and result.error.code() == grpc.StatusCode.ABORTED
    assert "no other READY node serves weights" in result.error.details()
    assert ("require_weights_digest" in result.error.details()) == allow_restart
    assert len(result.ids) >= 5 and not result.restarted_at


def _two_weights(start_node, start_coordinator, other_model):
    """Two nodes serving different weights behind a coordinator."""
    nodes = [start_node(node_id="mlx-a"), start_node(node_id="mlx-b", model=other_model)]
    co = start_coordinator(nodes=[n.address for n in nodes])
    co.wait_routable(2)
    assert nodes[0].status().model.weights_digest != nodes[1].status().model.weights_digest
    return co, nodes


def _kill_serving(co, nodes, min_tokens: int, max_tokens: int, timeout_s: float = 30.0):
    """SIGKILL the node serving the one request once it has streamed `min_tokens`; (victim, survivor)."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [
            n.status.node_id
            for n in co.nodes().nodes
            if n.in_flight and n.outstanding_tokens <= max_tokens - min_tokens
        ]
        if busy:
            break
        assert time.monotonic() < deadline, "the request did not start streaming"
        time.sleep(0.005)
    victim = next(n for n in nodes if n.node_id == busy[0])
    victim.proc.kill()
    return victim, next(n for n in nodes if n is not victim)


def _record(co, request_id: str, timeout_s: float = 5.0) -> dict:
    """The request's audit record (query shows its accepted and end records as one); a failed
    request's record is durable before its status goes out."""
    deadline = time.monotonic() + timeout_s
    while not (found := list(query(co.audit_dir, request_id=request_id))):
        assert time.monotonic() < deadline, f"no audit record for {request_id}"
        time.sleep(0.01)
    [rec] = found
    return rec


def _hmac(co, data: str) -> str:
    key = (default_key_dir(co.audit_dir) / "hmac.key").read_bytes()
    return hmac.new(key, data.encode(), hashlib.sha256).hexdigest()


def test_without_allow_restart_a_stream_whose_weights_are_gone_is_aborted(
    start_node, start_coordinator, other_model
):
    co, nodes = _two_weights(start_node, start_coordinator, other_model)
    req = note(21, 1500, request_id="gone-1", temperature=0.8, seed=11)
    results, threads = in_threads(lambda r: collect(co.inference, r), [req])
    victim, survivor = _kill_serving(co, nodes, 5, 1500)
    threads[0].join(60)
    (s,) = results
    assert s.error is not None and s.error.code() == grpc.StatusCode.ABORTED, s.error
    details = s.error.details()
    assert "no other READY node serves weights" in details and victim.node_id in details
    assert "allow_restart" in details, "the message says what would have let it finish"
    assert len(s.ids) >= 5 and not s.restarted_at and s.final is None
    rec = _record(co, "gone-1")
    assert (rec["outcome"], rec["code"], rec["restarts"]) == (
        "failed",
        "ABORTED",
        0,
    ) and "voided" not in rec


def test_with_allow_restart_a_stream_whose_weights_are_gone_starts_over_on_other_weights(
    start_node, start_coordinator, other_model
):
    co, nodes = _two_weights(start_node, start_coordinator, other_model)
    watch = EventWatch(co)
    max_tokens = 300
    req = note(22, max_tokens, request_id="restart-1", temperature=0.8, seed=11)
    req.allow_restart = True
    results, threads = in_threads(lambda r: collect(co.inference, r), [req])
    try:
        victim, survivor = _kill_serving(co, nodes, 5, max_tokens)
        threads[0].join(60)
        event = watch.wait_for(K.EVENT_KIND_RESTART, victim.node_id, timeout_s=5)
    finally:
        watch.close()
    (s,) = results
    assert s.error is None, s.error
    assert len(s.restarted_at) == 1, "one chunk says the generation started over"
    [(n_void, chars_void)] = s.restarted_at
    kept_ids, kept_text = s.ids[n_void:], s.text[chars_void:]
    f = s.final
    assert n_void >= 5 and (f.restarts, f.failovers, list(f.nodes)) == (
        1,
        1,
        [victim.node_id, survivor.node_id],
    )
    assert (
        f.node_id == survivor.node_id
        and 0 < f.usage.completion_tokens == len(kept_ids) <= max_tokens
    )
    assert f.model.weights_digest == survivor.status().model.weights_digest
    assert f"restarted from the beginning on node {survivor.node_id}" in f.message
    assert (
        f"after node {victim.node_id} failed" in f.message
        and f"({n_void}) were discarded" in f.message
    )
    # The kept stream is what the other weights produce from scratch for the same request and
    # seed (a node ignores allow_restart: it is the coordinator's).
    direct = inference_pb2.GenerateRequest()
    direct.CopyFrom(req)
    direct.request_id = "restart-1-direct"
    reference = collect(survivor.inference, direct)
    assert reference.error is None and reference.ids == kept_ids and reference.text == kept_text
    assert (event.to_node_id, event.request_id, event.tokens_delivered) == (
        survivor.node_id,
        "restart-1",
        n_void,
    )
    # The audit record describes what the caller keeps, and what it was sent and told to drop.
    rec = _record(co, "restart-1")
    assert (rec["outcome"], rec["restarts"], rec["failovers"], rec["completion_tokens"]) == (
        "completed",
        1,
        1,
        len(kept_ids),
    )
    assert rec["completion_digest"].endswith(_hmac(co, kept_text))
    [voided] = rec["voided"]
    assert (voided["node"], voided["tokens"]) == (victim.node_id, n_void)
    assert voided["completion_digest"].endswith(_hmac(co, s.text[:chars_void]))
    assert [h["node"] for h in rec["nodes"]] == list(f.nodes)
    assert rec["nodes"][0]["digest"] == voided["digest"] != rec["nodes"][1]["digest"]


def test_the_client_library_keeps_only_the_text_after_a_restart(
    start_node, start_coordinator, other_model
):
    co, nodes = _two_weights(start_node, start_coordinator, other_model)
    max_tokens = 300
    options = dict(
        messages=[("user", "Write a SOAP note for a synthetic visit.")],
        max_tokens=max_tokens,
        temperature=0.8,
        seed=5,
    )
    with FleetClient(
        co.address, max_attempts=1, server_name=dns_name(Role.COORDINATOR, co.name)
    ) as client:
        results, threads = in_threads(
            lambda rid: client.generate(
                request_id=rid, allow_restart=True, timeout_s=60, **options
            ),
            ["lib-restart"],
        )
        victim, survivor = _kill_serving(co, nodes, 5, max_tokens)
        threads[0].join(60)
    (result,) = results
    assert result is not None, "generate raised (see the thread's traceback)"
    assert (result.restarts, result.failovers, result.nodes) == (
        1,
        1,
        [victim.node_id, survivor.node_id],
    )
    assert (
        0 < len(result.token_ids) == result.completion_tokens <= max_tokens
        and "restarted" in result.message
    )
    reference = collect(survivor.inference, build_request(request_id="lib-direct", **options))
    assert reference.error is None
    assert result.token_ids == reference.ids and result.text == reference.text, (
        "only the text after the restart"
    )


def test_fleetctl_generate_allow_restart_marks_the_restart_on_stderr(
    start_node, start_coordinator, other_model
):
    co, nodes = _two_weights(start_node, start_coordinator, other_model)
    max_tokens = 300
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "generate",
            "--target",
            co.address,
            "--prompt",
            "Write a note",
            "--max-tokens",
            str(max_tokens),
            "--seed",
            "3",
            "--temperature",
            "0.8",
            "--allow-restart",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        victim, survivor = _kill_serving(co, nodes, 5, max_tokens)
        out, err = cli.communicate(timeout=60)
    finally:
        cli.kill()
    assert cli.returncode == 0, err
    marker = [line for line in err.splitlines() if "RESTARTED" in line]
    assert len(marker) == 1 and "void" in marker[0]
    assert (
        f"restarted from the beginning on node {survivor.node_id}" in err
        and f"on {survivor.node_id}:" in err
    )


@pytest.mark.slow
def test_a_stalled_node_is_ejected_its_streams_move_and_it_is_readmitted(
    start_node, start_coordinator, fleet_name
):
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
