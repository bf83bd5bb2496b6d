"""The fleet across "hosts": network namespaces on a bridge, each node agent and the
coordinator with its own address, real multicast mDNS between them (tests/netns.py).

Skipped with the reason where namespaces are unavailable (not root, not Linux); the
loopback tests in test_coordinator.py and test_failover.py cover the same logic.
"""

from __future__ import annotations

import collections
import threading
import time

import grpc
import pytest

from cluster.api import fleet_pb2
from cluster.localfleet import CoordinatorProcess
from tests.fleet_helpers import EventWatch, collect, in_threads, note, wait_queued
from tests.netns import NetnsLab, netns_unavailable
from tests.procs import NodeProcess

_why = netns_unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"network namespaces unavailable: {_why}")

K = fleet_pb2
NODE_PORT = 7700
NODE_ARGS = ("--max-running", "8", "--max-queued", "0")
# The policy bound for a host that stops answering: eject_after_failures probes, each
# at most poll_interval x (1 + jitter) apart plus the probe timeout (defaults 3, 1.2 s, 1 s).
EJECT_BOUND_S = 3 * (1.2 + 1.0)


class Fleet:
    def __init__(self, lab: NetnsLab, model, logs):
        self.lab, self.model, self.logs = lab, model, logs
        self.name = f"ns{int(time.time() * 1000) % 10**8}"
        self.hosts = {}
        self.nodes: dict[str, NodeProcess] = {}
        self.procs = []

    def host(self, name):
        if name not in self.hosts:
            self.hosts[name] = self.lab.add_host(name)
        return self.hosts[name]

    def start_node(self, name: str, *args: str, wait: bool = True) -> NodeProcess:
        h = self.host(name)
        node = NodeProcess(
            self.model,
            *(args or NODE_ARGS),
            node_id=name,
            fleet=self.name,
            listen=f"{h.ip}:{NODE_PORT}",
            wrapper=h.exec_argv([]),
        )
        self.procs.append(node)
        node.start(self.logs)
        if wait:
            node.wait_serving()
        self.nodes[name] = node
        return node

    def start_coordinator(
        self, name: str, *args: str, port: int = 7800, nodes=()
    ) -> CoordinatorProcess:
        h = self.host("coord")
        co = CoordinatorProcess(
            *args,
            fleet=None if nodes else self.name,
            nodes=nodes,
            name=name,
            listen=f"{h.ip}:{port}",
            mdns_interface=h.ip,
            wrapper=h.exec_argv([]),
        )
        self.procs.append(co)
        co.start(self.logs)
        co.wait_serving()
        return co

    def close(self):
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def fleet(tiny_model, tmp_path_factory):
    with NetnsLab() as lab:
        f = Fleet(lab, tiny_model, tmp_path_factory.mktemp("netns-logs"))
        try:
            f.coordinator = f.start_coordinator("coord", "--queue-max-wait-s", "60")
            f.start_node("node1")
            f.start_node("node2")
            f.coordinator.wait_routable(2)
            yield f
        finally:
            f.close()


def _spread(co, count: int, max_tokens: int, prefix: str, workers: int = 6) -> collections.Counter:
    """A closed loop of `workers` callers; returns how many requests each node served."""
    served = collections.Counter()
    lock = threading.Lock()
    todo = iter(range(count))

    def work(_):
        for i in todo:
            s = collect(co.inference, note(i, max_tokens, request_id=f"{prefix}-{i}"))
            assert s.error is None, s.error
            with lock:
                served[s.final.node_id] += 1

    _, threads = in_threads(work, range(workers))
    for t in threads:
        t.join(180)
    return served


def test_a_host_started_later_is_discovered_and_routable(fleet):
    co = fleet.coordinator
    watch = EventWatch(co)
    try:
        node = fleet.start_node("node3", wait=False)
        node.wait_serving()
        ready_at = time.time()
        joined = watch.wait_for(K.EVENT_KIND_JOINED, "node3", timeout_s=20)
        co.wait_routable(3)
        listing = {n.status.node_id: n for n in co.nodes().nodes}
        assert listing["node3"].address == f"{fleet.hosts['node3'].ip}:{NODE_PORT}"
        assert listing["node3"].source == "mdns"
        print(f"node3 READY -> joined: {joined.time_unix_s - ready_at:+.2f}s")
    finally:
        watch.close()
    served = _spread(co, 12, 8, "late")
    assert served["node3"] > 0


def test_a_throttled_host_gets_less_traffic(fleet):
    co = fleet.coordinator
    slow = fleet.hosts["node3"]
    slow.throttle(rate="32kbit", burst="4kb", latency="400ms")
    try:
        served = _spread(co, 48, 48, "slow", workers=6)
    finally:
        slow.unthrottle()
    fast = min(served["node1"], served["node2"])
    print(f"requests served with node3 throttled to 32 kbit/s: {dict(served)}")
    assert served["node3"] * 2 < fast, served
    co.wait_routable(3, timeout_s=30)


def test_a_host_cut_off_is_ejected_in_bound_its_streams_move_and_it_returns(fleet):
    co = fleet.coordinator
    cut = fleet.hosts["node2"]
    max_tokens = 300
    requests = [note(i, max_tokens, request_id=f"cut-{i}") for i in range(9)]
    reference = {r.request_id: collect(fleet.nodes["node1"].inference, r) for r in requests}
    watch = EventWatch(co)
    live = [None] * len(requests)
    results, threads = in_threads(
        lambda i: collect(
            co.inference, requests[i], on_chunk=lambda s, i=i: live.__setitem__(i, s)
        ),
        list(range(len(requests))),
    )
    try:
        deadline = time.monotonic() + 30
        while None in live or min(len(s.ids) for s in live) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        cut_at = time.time()
        cut.link_down()
        ejected = watch.wait_for(K.EVENT_KIND_EJECTED, "node2", timeout_s=EJECT_BOUND_S + 5)
        took = ejected.time_unix_s - cut_at
        print(f"link down -> ejected in {took:.2f}s (policy bound {EJECT_BOUND_S:.1f}s)")
        assert took < EJECT_BOUND_S + 0.5
        for t in threads:
            t.join(120)
        for s in results:
            ref = reference[s.request.request_id]
            assert s.error is None, s.error
            assert s.ids == ref.ids and s.text == ref.text
        assert any(s.final.nodes[0] == "node2" and s.final.failovers == 1 for s in results)
        back_at = time.time()
        cut.link_up()
        readmitted = watch.wait_for(K.EVENT_KIND_READMITTED, "node2", timeout_s=30, after=back_at)
        print(
            f"link up -> readmitted in {readmitted.time_unix_s - back_at:.2f}s ({readmitted.reason})"
        )
    finally:
        cut.link_up()
        watch.close()
    co.wait_routable(3, timeout_s=30)


def test_queue_full_and_bad_requests(fleet):
    bad = collect(fleet.coordinator.inference, note(1, 0, request_id="zero-tokens"))
    assert (
        bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in bad.error.details()
    )
    small = fleet.start_node("node4", "--max-running", "1", "--max-queued", "0")
    co = fleet.start_coordinator(
        "coord-small",
        "--queue-max-depth",
        "1",
        "--queue-max-wait-s",
        "30",
        port=7810,
        nodes=[small.address],
    )  # 7801: the first one's monitoring port
    co.wait_routable(1)
    hog = co.inference.Generate(note(2, 1500, request_id="hog"), timeout=60)
    next(hog)
    queued, threads = in_threads(
        lambda r: collect(co.inference, r), [note(3, 4, request_id="queued")]
    )
    wait_queued(co, 1)
    over = collect(co.inference, note(4, 4, request_id="over"))
    assert over.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(over.error.trailing_metadata())["grpc-retry-pushback-ms"]) > 0
    hog.cancel()
    threads[0].join(30)
    assert queued[0].error is None
    ok = collect(fleet.coordinator.inference, note(5, 4, request_id="still-fine"))
    assert ok.error is None
    small.stop()
    co.stop()


def test_kill_9_one_host_during_24_streams_loses_and_repeats_nothing(fleet):
    co = fleet.coordinator
    co.wait_routable(3, timeout_s=30)
    max_tokens = 200

    def request(i, prefix):
        return note(
            i,
            max_tokens,
            request_id=f"{prefix}-{i}",
            **({"temperature": 0.7, "seed": 100 + i} if i % 3 == 0 else {}),
        )

    requests = [request(i, "k24") for i in range(24)]
    # The uninterrupted run, through the same coordinator before anything breaks.
    ref_streams, ref_threads = in_threads(
        lambda i: collect(co.inference, request(i, "ref")), list(range(24))
    )
    for t in ref_threads:
        t.join(180)
    assert all(s.error is None and s.final.failovers == 0 for s in ref_streams)
    reference = {f"k24-{i}": s for i, s in enumerate(ref_streams)}
    live = [None] * len(requests)
    results, threads = in_threads(
        lambda i: collect(
            co.inference, requests[i], on_chunk=lambda s, i=i: live.__setitem__(i, s)
        ),
        list(range(len(requests))),
    )
    deadline = time.monotonic() + 60
    while None in live or min(len(s.ids) for s in live) < 5:
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.005)
    victim = fleet.nodes["node3"]
    on_victim = sum(n.in_flight for n in co.nodes().nodes if n.status.node_id == "node3")
    victim.proc.kill()
    for t in threads:
        t.join(180)
    for s in results:
        ref = reference[s.request.request_id]
        assert s.error is None, f"{s.request.request_id}: {s.error}"
        assert len(s.ids) == s.final.usage.completion_tokens == max_tokens
        assert s.ids == ref.ids, f"{s.request.request_id}: a token was lost, repeated or changed"
        assert s.text == ref.text, f"{s.request.request_id}: spliced text differs"
    moved = [s for s in results if s.final.failovers]
    print(f"{len(moved)} of 24 streams resumed after node3 was killed ({on_victim} were on it)")
    assert len(moved) == on_victim > 0
    assert all(s.final.nodes[0] == "node3" for s in moved)
