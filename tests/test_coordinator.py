"""A real coordinator in front of real node agents on loopback: discovery over mDNS,
routing, validation, admission, deadlines, and failover when a node dies mid-stream."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from cluster.api import fleet_pb2
from cluster.client import build_request
from tests.fleet_helpers import EventWatch, collect, in_threads, note, wait_queued

K = fleet_pb2


@pytest.fixture(scope="module")
def duo(tiny_model, tmp_path_factory):
    """A coordinator and two node agents that find each other over mDNS on loopback."""
    from tests.procs import CoordinatorProcess, NodeProcess

    logs = tmp_path_factory.mktemp("duo-logs")
    fleet = f"duo{int(time.time() * 1000) % 10**8}"
    with (
        CoordinatorProcess(fleet=fleet) as co,
        NodeProcess(tiny_model, node_id="duo-a", fleet=fleet) as a,
        NodeProcess(tiny_model, node_id="duo-b", fleet=fleet) as b,
    ):
        co.start(logs)
        a.start(logs)
        b.start(logs)
        co.wait_serving()
        co.wait_routable(2)
        yield co, a, b


def test_nodes_announced_over_mdns_are_verified_and_listed(duo):
    co, a, b = duo
    listing = co.nodes()
    by_id = {n.status.node_id: n for n in listing.nodes}
    assert set(by_id) == {"duo-a", "duo-b"}
    for node, proc in ((by_id["duo-a"], a), (by_id["duo-b"], b)):
        assert node.address == proc.address and node.source == "mdns"
        assert node.mdns_name.startswith(proc.node_id)
        assert node.health == K.NODE_HEALTH_HEALTHY and node.routable
        assert node.status.model.weights_digest.startswith("sha256:")
        assert node.status.capacity.max_running > 0


def test_requests_through_the_coordinator_match_the_node_and_spread(duo):
    co, a, b = duo
    direct = collect(a.inference, note(1, 24, request_id="direct"))
    via, _ = in_threads(
        lambda i: collect(co.inference, note(1, 24, request_id=f"via-{i}")), range(4)
    )
    results, threads = via, _
    for t in threads:
        t.join(60)
    for s in results:
        assert s.error is None, s.error
        assert s.ids == direct.ids and s.text == direct.text
        assert s.final.usage.completion_tokens == 24 and s.final.failovers == 0
        assert list(s.final.nodes) == [s.final.node_id]
    assert {s.final.node_id for s in results} == {"duo-a", "duo-b"}, (
        "least-work routing uses both nodes"
    )


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r.ClearField("prompt"), "no input"),
        (lambda r: setattr(r, "max_tokens", 0), "max_tokens"),
        (lambda r: setattr(r, "request_id", "bad\nid"), "request_id"),
        (lambda r: r.sampling.__setattr__("temperature", -1.0), "temperature"),
        (lambda r: r.sampling.__setattr__("top_p", float("nan")), "top_p"),
        (lambda r: r.stop.append("x" * 500), "stop[0]"),
        (lambda r: setattr(r, "prefix_text_chars", 4), "prefix_text_chars"),
    ],
)
def test_bad_requests_get_invalid_argument_and_the_coordinator_is_unharmed(duo, mutate, fragment):
    co, _, _ = duo
    req = build_request(
        prompt="Synthetic history: cough for two days.", max_tokens=8, request_id="bad-1"
    )
    mutate(req)
    s = collect(co.inference, req, timeout_s=10)
    assert s.error is not None and s.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in s.error.details()
    assert "cough" not in s.error.details(), "error messages never quote the prompt"
    ok = collect(co.inference, note(2, 4, request_id="after-bad"))
    assert ok.error is None and ok.final.usage.completion_tokens == 4


def test_a_node_side_rejection_is_passed_through_not_failed_over(
    tiny_model, start_node, start_coordinator
):
    node = start_node("--max-tokens-limit", "16", node_id="small-limit")
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    s = collect(co.inference, note(3, 64, request_id="too-long"))
    assert s.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "between 1 and 16" in s.error.details()
    listing = co.nodes()
    assert (
        listing.nodes[0].health == K.NODE_HEALTH_HEALTHY and listing.nodes[0].failovers_total == 0
    )


def test_deadline_and_cancellation_reach_the_node(duo):
    co, a, b = duo
    s = collect(co.inference, note(4, 1900, request_id="deadline"), timeout_s=0.6)
    assert s.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = co.inference.Generate(note(5, 1900, request_id="cancel-me"), timeout=30)
    for i, _ in enumerate(call):
        if i == 3:
            call.cancel()
            break
    for proc in (a, b):
        proc.wait_until(
            lambda st: st.load.running == 0 and st.load.engine_sequences == 0,
            timeout_s=2,
            what="the slot freed after the caller left",
        )


def test_session_key_keeps_a_session_on_one_node(duo):
    co, _, _ = duo
    homes = {
        collect(
            co.inference, note(6, 2, request_id=f"s1-{i}", session_key="session-1")
        ).final.node_id
        for i in range(5)
    }
    assert len(homes) == 1


def test_fleetctl_nodes_and_events_show_the_fleet(duo):
    co, _, _ = duo
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "nodes",
            "-c",
            co.address,
            "--tls-name",
            "operator",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "duo-a" in out.stdout and "duo-b" in out.stdout and "HEALTHY" in out.stdout
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "events",
            "-c",
            co.address,
            "--tls-name",
            "operator",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ev.returncode == 0, ev.stderr
    assert "joined" in ev.stdout and "duo-a" in ev.stdout
    # Admin calls need the operator role: the app identity is refused, by name and role.
    denied = subprocess.run(
        [sys.executable, "-m", "cluster.fleetctl.app", "nodes", "-c", co.address],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (
        denied.returncode == 1
        and "PERMISSION_DENIED" in denied.stderr
        and "allowed: operator" in denied.stderr
    )


def test_a_node_started_later_becomes_routable_without_config(
    start_node, start_coordinator, fleet_name
):
    co = start_coordinator(fleet=fleet_name)
    first = start_node(node_id="early", fleet=fleet_name)
    co.wait_routable(1)
    watch = EventWatch(co)
    try:
        late = start_node(node_id="late", fleet=fleet_name, wait=False)
        watch.wait_for(K.EVENT_KIND_JOINED, "late", timeout_s=30)
        co.wait_routable(2)
        seen = {
            collect(co.inference, note(7, 2, request_id=f"late-{i}")).final.node_id
            for i in range(4)
        }
        assert "late" in seen and "early" in seen
        # A goodbye (graceful stop) removes it from the fleet view.
        late.stop()
        watch.wait_for(K.EVENT_KIND_LEFT, "late", timeout_s=15)
        assert [n.status.node_id for n in co.nodes().nodes] == ["early"]
    finally:
        watch.close()
    assert first.status().load.requests_failed_total == 0


def test_static_nodes_without_mdns_and_an_unreachable_one_stays_pending(
    start_node, start_coordinator
):
    import socket

    node = start_node(node_id="static-a")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    co = start_coordinator(nodes=[node.address, dead])
    co.wait_routable(1)
    by_addr = {n.address: n for n in co.nodes().nodes}
    assert by_addr[node.address].source == "static" and by_addr[node.address].routable
    assert by_addr[dead].health == K.NODE_HEALTH_PENDING and not by_addr[dead].routable
    assert "UNAVAILABLE" in by_addr[dead].health_reason
    assert collect(co.inference, note(8, 4)).final.node_id == "static-a"


def test_a_duplicate_node_id_is_rejected(start_node, start_coordinator, tmp_path):
    a = start_node(node_id="same-id")
    b = start_node(
        "--state-dir", str(tmp_path / "same-id-2"), node_id="same-id"
    )  # a state directory each
    co = start_coordinator(nodes=[a.address, b.address])
    listing = _one_place_for(co, "same-id")
    assert sum(n.health == K.NODE_HEALTH_REJECTED for n in listing.nodes) == 1


def _one_place_for(co, node_id: str):
    """Wait for the duplicate's rejection; exactly one of the two takes traffic."""
    watch = EventWatch(co)
    try:
        ev = watch.wait_for(K.EVENT_KIND_REJECTED, "", timeout_s=20)
        assert f"duplicate node id {node_id}" in ev.reason
    finally:
        watch.close()
    listing = co.wait_routable(
        1
    )  # the one admitted turns routable when its health Watch pushes SERVING
    assert sum(n.routable for n in listing.nodes) == 1
    return listing


def test_queue_depth_and_wait_limits_answer_resource_exhausted_with_a_hint(
    start_node, start_coordinator
):
    node = start_node("--max-running", "1", "--max-queued", "0", node_id="one-slot")
    co = start_coordinator(
        "--queue-max-depth", "1", "--queue-max-wait-s", "1.5", nodes=[node.address]
    )
    co.wait_routable(1)
    busy = co.inference.Generate(note(9, 1500, request_id="hog"), timeout=60)
    next(busy)  # running on the only slot
    waiting, threads = in_threads(
        lambda r: collect(co.inference, r, timeout_s=30), [note(10, 4, request_id="queued")]
    )
    wait_queued(co, 1)
    full = collect(co.inference, note(11, 4, request_id="over"), timeout_s=10)
    assert full.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in full.error.details()
    assert dict(full.error.trailing_metadata())["grpc-retry-pushback-ms"] == "500"
    threads[0].join(15)
    assert waiting[0].error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "every node is busy" in waiting[0].error.details()
    busy.cancel()
    node.wait_until(lambda st: st.load.running == 0, timeout_s=2, what="the hog cancelled")
    assert collect(co.inference, note(12, 4)).error is None


def test_interactive_requests_leave_the_queue_before_batch(start_node, start_coordinator):
    node = start_node("--max-running", "1", "--max-queued", "0", node_id="prio")
    co = start_coordinator("--queue-max-wait-s", "30", nodes=[node.address])
    co.wait_routable(1)
    hog = co.inference.Generate(note(13, 1500, request_id="prio-hog"), timeout=60)
    next(hog)
    order = []

    def run(req):
        s = collect(co.inference, req, timeout_s=60)
        order.append(s.request.request_id)
        return s

    batch, bt = in_threads(run, [note(14, 8, request_id="batch-1", priority="batch")])
    wait_queued(co, 1)
    inter, it = in_threads(run, [note(15, 8, request_id="interactive-1", priority="interactive")])
    wait_queued(co, 2)
    hog.cancel()
    for t in bt + it:
        t.join(30)
    assert batch[0].error is None and inter[0].error is None
    assert order == ["interactive-1", "batch-1"]


def test_a_node_back_at_a_new_address_is_an_address_change(
    start_node, start_coordinator, fleet_name
):
    co = start_coordinator(fleet=fleet_name)
    first = start_node(node_id="mover", fleet=fleet_name)
    co.wait_routable(1)
    watch = EventWatch(co)
    try:
        old_address = first.address
        first.proc.kill()  # no goodbye: the process is gone
        watch.wait_for(K.EVENT_KIND_EJECTED, "mover", timeout_s=10)
        again = start_node(node_id="mover", fleet=fleet_name)  # same id, new port
        assert again.address != old_address
        moved = watch.wait_for(K.EVENT_KIND_ADDRESS_CHANGED, "mover", timeout_s=20)
        assert moved.address == again.address and old_address in moved.reason
        co.wait_routable(1)
        assert [(n.status.node_id, n.address) for n in co.nodes().nodes] == [
            ("mover", again.address)
        ]
        assert collect(co.inference, note(30, 4)).final.node_id == "mover"
    finally:
        watch.close()


def test_two_nodes_announcing_the_same_name_over_mdns_get_one_place(
    start_node, start_coordinator, fleet_name, tmp_path
):
    co = start_coordinator(fleet=fleet_name)
    first = start_node(node_id="twin", fleet=fleet_name)
    co.wait_routable(1)
    # zeroconf renames the second instance, or (under load) does not and the same name moves
    # to its address: either way it is a duplicate, and the original keeps its place.
    start_node("--state-dir", str(tmp_path / "twin-2"), node_id="twin", fleet=fleet_name)
    listing = _one_place_for(co, "twin")
    assert [n.address for n in listing.nodes if n.routable] == [first.address]


def test_a_node_filled_by_another_coordinator_answers_resource_exhausted_promptly(
    start_node, start_coordinator
):
    node = start_node("--max-running", "1", "--max-queued", "0", node_id="shared-slot")
    a = start_coordinator(nodes=[node.address], name="coord-a")
    b = start_coordinator(nodes=[node.address], name="coord-b")
    a.wait_routable(1)
    b.wait_routable(1)
    hog = b.inference.Generate(note(31, 1500, request_id="b-hog"), timeout=60)
    next(hog)
    started = time.monotonic()
    s = collect(a.inference, note(32, 4, request_id="a-late"), timeout_s=20)
    assert s.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, s.error
    assert "at capacity" in s.error.details()
    assert dict(s.error.trailing_metadata())["grpc-retry-pushback-ms"] == "500"
    assert time.monotonic() - started < 2, "not after the queue's wait limit"
    hog.cancel()
    assert a.nodes().nodes[0].health == K.NODE_HEALTH_HEALTHY, "a full node is not a failed node"
