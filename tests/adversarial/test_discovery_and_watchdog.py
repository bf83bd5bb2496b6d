"""Discovery that a forged or duplicate mDNS announcement cannot subvert, and a stall
watchdog that blames a node only for its own silence (issue 19 #4 and #9, issue 20 #9)."""

from __future__ import annotations

import contextlib
import signal
import time

import grpc
from zeroconf import ServiceInfo, Zeroconf

from cluster.api import fleet_pb2, inference_pb2_grpc
from cluster.localfleet import HARNESS_APP
from cluster.mdns import IP_VERSION, SERVICE_TYPE, Advert
from cluster.security.identity import Role, dns_name
from cluster.security.tls import open_channel
from tests.fleet_helpers import EventWatch, collect, note

K = fleet_pb2
STALL_S = 1.0


def _slow_reader_channel(co) -> grpc.Channel:
    """An app's channel whose receive window stays small, so a reader that stops reading
    soon holds the coordinator's writes back (as a real slow consumer over a WAN does)."""
    return open_channel(
        co.address,
        co.credentials(HARNESS_APP, Role.APP),
        server_name=dns_name(Role.COORDINATOR, co.name),
        options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)],
    )


def test_a_caller_that_pauses_reading_longer_than_the_stall_limit_is_not_blamed_on_the_node(
    start_node, start_coordinator
):
    node = start_node(node_id="steady")
    # A first-token timeout shorter than the stream: the watchdog already watches for stalls
    # while the caller pauses (on the code before the fix it counted the pause from then on).
    co = start_coordinator(
        "--stall-timeout-s", str(STALL_S), "--first-token-timeout-s", "2", nodes=[node.address]
    )
    co.wait_routable(1)
    watch = EventWatch(co)
    channel = _slow_reader_channel(co)
    try:
        max_tokens = 1500
        stream = inference_pb2_grpc.InferenceStub(channel).Generate(
            note(1, max_tokens, request_id="slow-reader"), timeout=120
        )
        ids = list(next(stream).token_ids)
        time.sleep(4 * STALL_S)  # the caller's pause is what is under test, not a synchronisation
        final = None
        for chunk in stream:
            ids.extend(chunk.token_ids)
            if chunk.HasField("final"):
                final = chunk.final
        assert final is not None and len(ids) == max_tokens == final.usage.completion_tokens
        assert final.failovers == 0 and list(final.nodes) == ["steady"]
        assert not [
            e for e in watch.events if e.kind in (K.EVENT_KIND_FAILOVER, K.EVENT_KIND_EJECTED)
        ]
        [entry] = co.nodes().nodes
        assert entry.health == K.NODE_HEALTH_HEALTHY and entry.routable
    finally:
        channel.close()
        watch.close()


def test_a_node_that_stalls_mid_stream_is_failed_over_at_the_stall_limit(
    start_node, start_coordinator
):
    stalled = start_node(node_id="stalls")
    healthy = start_node(node_id="keeps-going")
    # Failed probes never eject here, so only the watchdog can move the stream.
    co = start_coordinator(
        "--stall-timeout-s",
        str(STALL_S),
        "--eject-after-failures",
        "1000",
        nodes=[stalled.address, healthy.address],
    )
    co.wait_routable(2)
    watch = EventWatch(co)
    stopped = []

    def stop_once(s):
        if not stopped and len(s.ids) >= 3 and s.final is None:
            owner = next((n for n in (stalled, healthy) if _serves(co, n.node_id)), None)
            if owner is not None:  # else: look again at the next chunk
                stopped.append(owner)
                owner.signal(signal.SIGSTOP)

    try:
        s = collect(
            co.inference, note(2, 400, request_id="mid-stall"), timeout_s=60, on_chunk=stop_once
        )
        assert stopped, "the stream never started"
        assert s.error is None, s.error
        assert s.final.failovers == 1 and s.final.usage.completion_tokens == 400
        moved = watch.wait_for(K.EVENT_KIND_FAILOVER, stopped[0].node_id, timeout_s=5)
        assert moved.reason.startswith(f"no token from node {stopped[0].node_id} for ")
        gap = max(b - a for a, b in zip(s.times, s.times[1:]))
        # The stall limit (1 s), not the 120 s first-token timeout, moved it (slack for a busy host).
        assert gap < STALL_S + 10.0, f"the stream stood still for {gap:.1f}s"
    finally:
        for n in (stalled, healthy):
            n.signal(signal.SIGCONT)
        watch.close()


def _serves(co, node_id: str) -> bool:
    return any(n.status.node_id == node_id and n.in_flight for n in co.nodes().nodes)


# -- discovery: an announcement is a claim, never a command -------------------------------


@contextlib.contextmanager
def _forged_announcement(instance: str, port: int, node_id: str, fleet: str):
    """An mDNS announcement no node made: `instance` at 127.0.0.1:`port` claiming `node_id`.
    Registered without the uniqueness probe, as a forger (or a responder that did not
    rename on a conflict) would; withdrawn at the end."""
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IP_VERSION)
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=port,
        properties=Advert(node_id=node_id, fleet=fleet).txt(),
        server=f"{instance}-forged.local.",
        parsed_addresses=["127.0.0.1"],
    )
    zc.register_service(info, cooperating_responders=True)
    try:
        yield
    finally:
        zc.unregister_service(info)
        zc.close()


def _probed_since(co, unix_s: float, timeout_s: float = 10.0) -> None:
    """Re-read the listing until every node's status was read after `unix_s`."""
    deadline = time.monotonic() + timeout_s
    while not all(n.last_status_age_s < time.time() - unix_s for n in co.nodes().nodes):
        assert time.monotonic() < deadline, f"no status read after the claim: {co.nodes()}"
        time.sleep(0.05)


def _port(node) -> int:
    return int(node.address.rsplit(":", 1)[1])


def test_a_forged_announcement_claiming_another_id_at_a_known_address_leaves_the_node_serving(
    start_node, start_coordinator, fleet_name
):
    real = start_node(node_id="real", fleet=fleet_name)
    co = start_coordinator(fleet=fleet_name)
    co.wait_routable(1)
    watch = EventWatch(co)
    try:
        with _forged_announcement("impostor", _port(real), "impostor", fleet_name):
            refused = watch.wait_for(K.EVENT_KIND_REJECTED, "impostor", timeout_s=20)
            assert refused.address == real.address
            assert (
                "could not prove it" in refused.reason and "(real) is unchanged" in refused.reason
            )
            _probed_since(
                co, refused.time_unix_s
            )  # the entry's own probe still passes after the claim
            assert (
                collect(co.inference, note(3, 4, request_id="after-forgery")).final.node_id
                == "real"
            )
            [entry] = co.nodes().nodes
            assert (entry.status.node_id, entry.health, entry.routable) == (
                "real",
                K.NODE_HEALTH_HEALTHY,
                True,
            )
        assert not [
            e
            for e in watch.events
            if e.node_id == "real"
            and e.kind in (K.EVENT_KIND_REJECTED, K.EVENT_KIND_LEFT, K.EVENT_KIND_EJECTED)
        ]
    finally:
        watch.close()


def test_a_duplicate_that_takes_over_the_instance_name_is_rejected_and_the_original_stays(
    start_node, start_coordinator, fleet_name, tmp_path
):
    first = start_node(node_id="twin", fleet=fleet_name)  # announces twin._studiofleet._tcp
    co = start_coordinator(fleet=fleet_name)
    co.wait_routable(1)
    second = start_node(
        "--state-dir", str(tmp_path / "twin-2"), node_id="twin"
    )  # not announced itself
    watch = EventWatch(co)
    try:
        # The second instance announces under the first one's name (no rename): it looks like a move.
        with _forged_announcement("twin", _port(second), "twin", fleet_name):
            refused = watch.wait_for(K.EVENT_KIND_REJECTED, timeout_s=20, address=second.address)
            assert f"duplicate node id twin: already serving at {first.address}" in refused.reason
            assert (
                collect(co.inference, note(4, 4, request_id="after-twin")).final.node_id == "twin"
            )
            routable = [n.address for n in co.nodes().nodes if n.routable]
            assert routable == [first.address]
        assert not [
            e for e in watch.events if e.kind in (K.EVENT_KIND_LEFT, K.EVENT_KIND_ADDRESS_CHANGED)
        ]
    finally:
        watch.close()


def test_a_new_id_at_a_known_address_takes_the_entry_once_its_handshake_proves_it(
    start_node, start_coordinator, fleet_name
):
    before = start_node(node_id="before", fleet=fleet_name)
    co = start_coordinator(fleet=fleet_name)
    co.wait_routable(1)
    watch = EventWatch(co)
    try:
        before.proc.kill()  # no goodbye: the entry stays, bound to "before"
        watch.wait_for(K.EVENT_KIND_EJECTED, "before", timeout_s=15)
        start_node(
            "--listen", before.address, node_id="after", fleet=fleet_name
        )  # the same address
        joined = watch.wait_for(K.EVENT_KIND_JOINED, "after", timeout_s=30, address=before.address)
        left = watch.wait_for(K.EVENT_KIND_LEFT, "before", timeout_s=5)
        assert (
            "replaced at this address by after" in left.reason
            and left.time_unix_s <= joined.time_unix_s
        )
        co.wait_routable(1)
        assert (
            collect(co.inference, note(5, 4, request_id="after-replace")).final.node_id == "after"
        )
    finally:
        watch.close()
