"""The traffic policy through a real coordinator (docs/traffic.md): two real tiny MLX nodes
labelled into two classes (--node-class), weights over a few hundred requests, overflow on
a predicted SLA breach and off after it clears, and `fleetctl traffic` (validation, roles,
the audit chain)."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.api import fleet_pb2, fleet_pb2_grpc
from cluster.capacity.profile import Info, Limits, ModelFacts, NodeFacts, Profile, StepModel
from tests.audit_helpers import records
from tests.fleet_helpers import collect, note
from tests.procs import NodeProcess
from tests.test_replay import fleetctl

# A profile that makes the tiny node "slow" in the model (the node itself is fast): two
# slots, and the 3 s SLA holds to about 2 short notes a second.
SLOW_FIT = StepModel(decode_base_s=0.03, decode_per_seq_s=0.015, prefill_base_s=0.003)


@pytest.fixture(scope="module")
def nodes(tiny_model, tmp_path_factory):
    """A node in class `macs` (two places: a burst waits in the coordinator's queue) and one
    in class `burst`, shared by the module's tests."""
    logs = tmp_path_factory.mktemp("traffic-logs")
    procs = [
        NodeProcess(
            tiny_model,
            *("--node-class", "macs", "--max-running", "2", "--max-queued", "0"),
            node_id="mac-1",
        ),
        NodeProcess(tiny_model, "--node-class", "burst", node_id="burst-1"),
    ]
    try:
        for p in procs:
            p.start(logs)
        for p in procs:
            p.wait_serving()
        yield {p.node_id: p for p in procs}
    finally:
        for p in procs:
            p.stop()


def _parallel(co, tag: str, count: int, workers: int = 8, max_tokens: int = 1) -> list:
    """`count` notes from `workers` callers at once; each one's stream."""
    with ThreadPoolExecutor(workers) as pool:
        return list(
            pool.map(
                lambda i: collect(co.inference, note(i, max_tokens, request_id=f"{tag}-{i}")),
                range(count),
            )
        )


def _named(i: int, model: str):
    req = note(i, 1, request_id=f"named-{i}")
    req.model = model
    return req


def _served(results) -> Counter:
    assert all(r.final is not None for r in results), [r.error for r in results if r.error]
    return Counter(r.final.nodes[-1] for r in results)


def _stub(co) -> fleet_pb2_grpc.FleetStub:
    return fleet_pb2_grpc.FleetStub(co.channel)


def test_weights_hold_over_a_few_hundred_requests(nodes, tmp_path, start_coordinator):
    """macs=80 burst=20 from the config file: 300 requests split within 4 sigma of 80/20, as
    the final chunks, GetTraffic, /metrics, `fleetctl top` and the dashboard all say."""
    conf = tmp_path / "studiofleet.toml"
    conf.write_text('[coordinator.traffic."*"]\nweights = { macs = 80, burst = 20 }\n')
    co = start_coordinator(
        "--config", str(conf), nodes=[n.address for n in nodes.values()], name="weights-co"
    )
    co.wait_routable(2)
    results = _parallel(co, "w", 300)
    served = _served(results)
    share = served["mac-1"] / 300
    assert abs(share - 0.8) < 4 * math.sqrt(0.8 * 0.2 / 300), served

    traffic = _stub(co).GetTraffic(fleet_pb2.GetTrafficRequest(), timeout=10)
    by = {c.node_class: c for c in traffic.classes}
    assert (
        by["macs"].routed_total == served["mac-1"] and by["burst"].routed_total == served["burst-1"]
    )
    assert by["macs"].routable_nodes == by["burst"].routable_nodes == 1
    assert by["macs"].share == pytest.approx(share, abs=0.01)

    from cluster.metrics import parse
    from cluster.security.identity import Role

    status, body, _ = co.http_get("/metrics", "prometheus", Role.MONITOR)
    assert status == 200
    series = parse(body.decode())
    assert (
        series[("studiofleet_traffic_routed_total", frozenset({("node_class", "macs")}))]
        == served["mac-1"]
    )

    top = fleetctl("top", "--once", "-c", co.address, "--tls-name", "operator")
    assert top.returncode == 0, top.stderr
    assert "traffic by class" in top.stdout and "macs" in top.stdout and "burst" in top.stdout

    status, body, _ = co.http_get("/api/snapshot", "operator", Role.OPERATOR)
    card = json.loads(body)["traffic_classes"]
    assert {c["node_class"] for c in card["classes"]} >= {"macs", "burst"}


def test_fleetctl_traffic_round_trip_refusals_and_audit(nodes, start_coordinator):
    co = start_coordinator(nodes=[n.address for n in nodes.values()], name="fleetctl-co")
    co.wait_routable(2)
    c = ("-c", co.address, "--tls-name", "operator")
    done = fleetctl(
        "traffic", "set", "tiny-qwen2", "macs=90", "burst=10", "--overflow", "burst", *c
    )
    assert done.returncode == 0, done.stderr
    shown = fleetctl("traffic", "show", "-o", "json", *c)
    assert shown.returncode == 0, shown.stderr
    (p,) = json.loads(shown.stdout)["policies"]
    assert p["policy"] == {
        "model": "tiny-qwen2",
        "weights": {"burst": 10, "macs": 90},
        "overflow": "burst",
    }
    assert p["set_by"] == "operator" and p.get("overflow_active", False) is False
    table = fleetctl("traffic", "show", *c)
    assert "burst=10 macs=90 overflow=burst" in table.stdout

    # Bad input: exit 2, naming what to fix; nothing reaches the coordinator.
    for args, named in [
        (("set", "tiny-qwen2", "macs=lots"), "CLASS=WEIGHT"),
        (("set", "tiny-qwen2", "Macs=1"), "CLASS=WEIGHT"),
        (("set", "tiny-qwen2", "macs=0"), "CLASS=WEIGHT"),
        (("set", "tiny-qwen2", "macs=1", "--overflow", "Up stream"), "--overflow"),
        (("set", "bad model", "macs=1"), "MODEL"),
        (("show", "-o", "yaml"), "--output"),
    ]:
        out = fleetctl("traffic", *args, *c)
        assert out.returncode == 2 and named in out.stderr, (args, out.stderr)
    # The RPC validates too (a caller other than fleetctl), and says which field.
    with pytest.raises(grpc.RpcError) as err:
        _stub(co).SetTrafficPolicy(
            fleet_pb2.SetTrafficPolicyRequest(
                policy=fleet_pb2.TrafficPolicy(model="tiny-qwen2", weights={"macs": 20_000})
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("weights:")
    gone = fleetctl("traffic", "clear", "no-such-model", *c)
    assert gone.returncode == 6 and "no traffic policy" in gone.stderr
    # Only operators: an app certificate is refused.
    denied = fleetctl("traffic", "show", "-c", co.address, "--tls-name", "app")
    assert denied.returncode != 0 and "PERMISSION_DENIED" in denied.stderr

    # The change is in effect: requests naming the model follow it.
    served = _served([collect(co.inference, _named(i, "tiny-qwen2")) for i in range(20)])
    assert served == {"mac-1": 18, "burst-1": 2}
    cleared = fleetctl("traffic", "clear", "tiny-qwen2", *c)
    assert cleared.returncode == 0, cleared.stderr

    sets = [r for r in records(co.audit_dir) if r.get("action") == "traffic.set"]
    outcomes = [(r.get("outcome"), r.get("policy", "")) for r in sets]
    assert ("accepted", "burst=10 macs=90 overflow=burst") in outcomes, sets
    assert ("ok", "burst=10 macs=90 overflow=burst") in outcomes, sets
    assert any(o == "refused" for o, _ in outcomes), sets
    assert all(r["caller"] == "operator" for r in sets), sets


def _events(co, kind: int) -> list:
    got = []
    call = _stub(co).WatchEvents(fleet_pb2.WatchEventsRequest(replay=True), timeout=0.5)
    try:
        for ev in call:
            if ev.kind == kind:
                got.append(ev)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return got


def test_overflow_only_while_the_local_class_would_miss_the_sla(nodes, tmp_path, start_coordinator):
    """macs=100 overflow=burst, with a profile that puts macs' SLA rate near 2 notes/s: a
    trickle stays on macs; a burst turns overflow on and part of it goes to burst; once the
    rate falls back, overflow turns off after the hold and the trickle is on macs again."""
    path = Profile(
        Info("slow-macs", "derived, for a test", sources=("tests/test_traffic_policy.py",)),
        NodeFacts("mlx", "test", 1.0, node_id="mac-1"),
        ModelFacts("tiny-qwen2"),
        Limits(2),
        SLOW_FIT,
    ).save(tmp_path / "slow.toml")
    co = start_coordinator(
        "--capacity-profile",
        str(path),
        "--sla-p95-s",
        "3",
        "--traffic-overflow-window-s",
        "4",
        "--traffic-overflow-hold-s",
        "1",
        nodes=[n.address for n in nodes.values()],
        name="overflow-co",
    )
    co.wait_routable(2)
    # Twenty short notes first, so the live headroom measures their token mix.
    _served([collect(co.inference, note(i, 8, request_id=f"warm-{i}")) for i in range(22)])
    c = ("-c", co.address, "--tls-name", "operator")
    done = fleetctl("traffic", "set", "*", "macs=100", "burst=0", "--overflow", "burst", *c)
    assert done.returncode == 0, done.stderr

    def trickle(tag: str, count: int) -> Counter:
        got = []
        for i in range(count):
            got.append(collect(co.inference, note(i, 8, request_id=f"{tag}-{i}")))
            time.sleep(1.0)  # load pacing: one note a second, under the SLA's rate
        return _served(got)

    assert trickle("before", 2) == {"mac-1": 2}
    state = _stub(co).GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=10)
    assert not state.policies[0].overflow_active
    assert state.policies[0].overflow_signal == "headroom"

    served = _served(_parallel(co, "burst", 40, max_tokens=8))
    assert served["burst-1"] > 0 and served["mac-1"] > 0, served
    state = _stub(co).GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=10)
    p = state.policies[0]
    assert p.overflow_episodes == 1 and p.overflow_routed_total >= served["burst-1"]
    assert p.predicted_p95_s > 3 or not p.overflow_active

    # The rate falls back under the SLA's within the 4 s window; off 1 s later.
    deadline = time.monotonic() + 20
    while (
        _stub(co)
        .GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=10)
        .policies[0]
        .overflow_active
    ):
        assert time.monotonic() < deadline, "overflow did not turn off after the burst"
        time.sleep(0.2)
    reasons = [e.reason for e in _events(co, fleet_pb2.EVENT_KIND_TRAFFIC)]
    assert any("overflow for * to burst on:" in r for r in reasons), reasons
    assert any("overflow for * to burst off:" in r for r in reasons), reasons
    assert trickle("after", 2) == {"mac-1": 2}
    assert (
        _stub(co)
        .GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=10)
        .policies[0]
        .overflow_episodes
        == 1
    )


def test_coordinators_sharing_a_state_database_follow_one_policy(
    nodes, tmp_path, start_coordinator
):
    """A policy set through one coordinator is taken up by its pair (same --state-db) within
    a few seconds, and a coordinator started afterwards starts with it; a clear reaches both."""
    db = str(tmp_path / "shared.db")
    addresses = [n.address for n in nodes.values()]
    a = start_coordinator("--state-db", db, nodes=addresses, name="pair-a")
    b = start_coordinator("--state-db", db, nodes=addresses, name="pair-b")
    a.wait_routable(2)
    b.wait_routable(2)
    done = fleetctl("traffic", "set", "*", "burst=1", "-c", a.address, "--tls-name", "operator")
    assert done.returncode == 0, done.stderr

    def policies(co) -> dict:
        got = _stub(co).GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=10)
        return {p.policy.model: (dict(p.policy.weights), p.set_by) for p in got.policies}

    deadline = time.monotonic() + 10
    while policies(b) != {"*": ({"burst": 1}, "operator")}:
        assert time.monotonic() < deadline, f"pair-b did not take up the policy: {policies(b)}"
        time.sleep(0.1)
    assert _served(_parallel(b, "pair", 6)) == {"burst-1": 6}
    late = start_coordinator("--state-db", db, nodes=addresses, name="pair-late")
    assert policies(late) == {"*": ({"burst": 1}, "operator")}

    gone = fleetctl("traffic", "clear", "*", "-c", b.address, "--tls-name", "operator")
    assert gone.returncode == 0, gone.stderr
    deadline = time.monotonic() + 10
    while policies(a):
        assert time.monotonic() < deadline, f"pair-a kept a cleared policy: {policies(a)}"
        time.sleep(0.1)


def test_without_a_profile_the_queue_wait_starts_and_stops_overflow(
    nodes, tmp_path, start_coordinator
):
    """No capacity profile: overflow turns on when a macs-bound request has waited past
    --traffic-overflow-queue-wait-s, the waiting ones go to burst, and it turns off once no
    request waits and macs has room again for the hold."""
    co = start_coordinator(
        "--traffic",
        "*: macs=100 overflow=burst",
        "--traffic-overflow-queue-wait-s",
        "0.3",
        "--traffic-overflow-hold-s",
        "1",
        nodes=[n.address for n in nodes.values()],
        name="queue-co",
    )
    co.wait_routable(2)
    assert _served([collect(co.inference, note(i, 8, request_id=f"q0-{i}")) for i in range(3)]) == {
        "mac-1": 3
    }
    served = _served(_parallel(co, "qburst", 16, workers=16, max_tokens=200))
    assert served["burst-1"] > 0 and served["mac-1"] >= 2, served
    p = _stub(co).GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=10).policies[0]
    assert p.overflow_signal == "queue" and p.overflow_episodes == 1
    assert p.overflow_routed_total == served["burst-1"]
    deadline = time.monotonic() + 15
    while (
        _stub(co)
        .GetTrafficPolicies(fleet_pb2.GetTrafficPoliciesRequest(), timeout=10)
        .policies[0]
        .overflow_active
    ):
        assert time.monotonic() < deadline, "overflow did not turn off once the queue cleared"
        time.sleep(0.1)
    assert _served([collect(co.inference, note(i, 8, request_id=f"q1-{i}")) for i in range(3)]) == {
        "mac-1": 3
    }
