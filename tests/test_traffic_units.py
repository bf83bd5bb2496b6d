"""The traffic policy's pure decisions (cluster/traffic.py): weights, classes, fallback and
the overflow switch, without sockets."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from cluster.routing import Candidate, Want, pick
from cluster.traffic import (
    HEADROOM,
    QUEUE,
    Chooser,
    Overflow,
    Policy,
    PolicyError,
    Pressure,
    Spiller,
    class_for_session,
    class_of,
    fallback_order,
    parse_weights,
    policy_for,
    step,
)


def test_a_nodes_class_is_its_label_else_its_engine():
    assert class_of("", "mlx") == "local" and class_of("", "vllm") == "local"
    assert class_of("", "upstream") == "upstream"
    assert class_of("macs", "mlx") == "macs" and class_of("burst", "upstream") == "burst"


@pytest.mark.parametrize(
    ("model", "weights", "overflow", "field"),
    [
        ("", {"local": 1}, "", "model"),
        ("bad model", {"local": 1}, "", "model"),
        ("m", {}, "", "weights"),
        ("m", {"Local": 1}, "", "weights"),
        ("m", {"local": -1}, "", "weights"),
        ("m", {"local": 10_001}, "", "weights"),
        ("m", {"local": 0, "upstream": 0}, "", "weights"),
        ("m", {f"c{i}": 1 for i in range(9)}, "", "weights"),
        ("m", {"local": 1}, "Up stream", "overflow"),
        ("m", {"upstream": 5}, "upstream", "overflow"),  # nothing left to protect
    ],
)
def test_bad_policies_are_refused_naming_the_field(model, weights, overflow, field):
    with pytest.raises(PolicyError) as err:
        Policy.parse(model, weights, overflow)
    assert err.value.field == field and str(err.value)


def test_weights_parse_and_spec_round_trip():
    p = Policy.parse("Qwen2.5-72B", parse_weights(["macs=90", "upstream=10"]), "upstream")
    assert p.spec() == "macs=90 upstream=10 overflow=upstream"
    assert p.local == {"macs"} and p.local_share == pytest.approx(0.9)
    for bad in (["macs"], ["macs=x"], ["macs=1.5"], ["macs=1", "macs=2"]):
        with pytest.raises(PolicyError):
            parse_weights(bad)


def test_a_model_takes_its_own_policy_else_the_star_one():
    own = Policy.parse("m", {"local": 1})
    star = Policy.parse("*", {"upstream": 1})
    assert policy_for({"m": own, "*": star}, "m@v2") is own
    assert policy_for({"m": own, "*": star}, "other") is star
    assert policy_for({"m": own}, "") is None


def test_smooth_round_robin_gives_exact_shares_spread_out():
    c = Chooser(Policy.parse("m", {"macs": 90, "upstream": 10, "off": 0}))
    picks = [c.next() for _ in range(1000)]
    assert Counter(picks) == {"macs": 900, "upstream": 100}
    gaps = [i for i, x in enumerate(picks) if x == "upstream"]
    assert max(b - a for a, b in zip(gaps, gaps[1:])) <= 11  # one in ten, not ten in a row


def test_sessions_stay_in_one_class_in_proportion():
    p = Policy.parse("m", {"macs": 75, "upstream": 25})
    assert len({class_for_session(p, "patient-synthetic-7") for _ in range(5)}) == 1
    share = Counter(class_for_session(p, f"s{i}") for i in range(4000))
    assert 0.22 < share["upstream"] / 4000 < 0.28


def test_fallback_tries_weighted_classes_then_overflow_only_while_on():
    p = Policy.parse("m", {"macs": 60, "gpus": 40, "upstream": 0}, "upstream")
    assert fallback_order(p, "macs", False) == ("gpus",)
    assert fallback_order(p, "macs", True) == ("gpus", "upstream")
    assert fallback_order(p, "upstream", True) == ("macs", "gpus")


def _cand(node_id: str, cls: str, in_flight: int = 0, slots: int = 4) -> Candidate:
    return Candidate(node_id, "sha256:a", in_flight, 0, 0, 2, slots, node_class=cls)


def test_the_class_composes_with_routing():
    nodes = [_cand("mac-1", "local", 1), _cand("mac-2", "local", 0), _cand("up-1", "upstream")]
    assert pick(nodes, Want(node_class="local")) == "mac-2"
    assert pick(nodes, Want(node_class="local", exclude=frozenset({"mac-2"}))) == "mac-1"
    assert pick(nodes, Want(node_class="upstream")) == "up-1"
    assert pick(nodes, Want(node_class="gpus")) is None
    # A session keeps its node within the class.
    keyed = Want(node_class="local", session_key="s-1")
    assert pick(nodes, keyed) == pick(nodes, keyed) and pick(nodes, keyed).startswith("mac")


def _headroom(p95: float, rate: float = 2.0, sla_rate: float = 1.0) -> Pressure:
    return Pressure(
        HEADROOM,
        sla_p95_s=8.0,
        predicted_p95_s=p95,
        arrival_rate_per_s=rate,
        local_rate_per_s=rate,
        sla_rate_per_s=sla_rate,
    )


def test_overflow_starts_at_the_breach_and_stops_after_the_hold():
    s = Overflow()
    s = step(s, _headroom(5.0, 0.5), 0.0, hold_s=5)
    assert not s.on
    s = step(s, _headroom(9.0), 1.0, hold_s=5)
    assert s.on and s.since == 1.0 and s.episodes == 1
    s = step(s, _headroom(7.0, 0.9), 2.0, hold_s=5)  # clear: the hold starts
    assert s.on and s.clear_since == 2.0
    s = step(s, _headroom(9.0), 3.0, hold_s=5)  # breach again: the hold restarts
    assert s.on and s.clear_since is None
    s = step(s, _headroom(7.0, 0.9), 4.0, hold_s=5)
    s = step(s, _headroom(7.0, 0.9), 8.9, hold_s=5)
    assert s.on
    s = step(s, _headroom(7.0, 0.9), 9.0, hold_s=5)
    assert not s.on and s.episodes == 1 and s.reason.startswith("off")


def test_the_headroom_share_is_the_excess_over_the_slas_rate():
    assert _headroom(9.0, rate=4.0, sla_rate=3.0).share == pytest.approx(0.25)
    assert _headroom(math.inf, rate=4.0, sla_rate=0.0).share == 1.0
    assert _headroom(7.0, rate=0.5).share == 0.0
    assert not _headroom(math.nan).breach  # no local node: no prediction, no breach
    spill = Spiller()
    assert sum(spill.take(0.25) for _ in range(400)) == 100


def test_the_queue_signal_clears_only_with_room_locally():
    busy = Pressure(QUEUE, 8.0, queue_wait_s=1.5, queue_limit_s=1.0)
    assert busy.breach and not busy.clear and busy.share == 0.0
    spilling = Pressure(QUEUE, 8.0, queue_wait_s=0.0, queue_limit_s=1.0, spare_slots=0)
    assert not spilling.breach and not spilling.clear  # full locally: keep spilling
    room = Pressure(QUEUE, 8.0, queue_wait_s=0.0, queue_limit_s=1.0, spare_slots=3)
    assert room.clear
    s = step(Overflow(), busy, 0.0, hold_s=2)
    s = step(s, spilling, 5.0, hold_s=2)
    assert s.on
    s = step(s, room, 6.0, hold_s=2)
    s = step(s, room, 8.0, hold_s=2)
    assert not s.on


def test_the_coordinators_traffic_flag_takes_policies(monkeypatch):
    """fleet-coordinator --traffic 'MODEL: CLASS=WEIGHT ... overflow=CLASS' (repeatable)."""
    from tests.test_settings_cli import _captured

    s = _captured(
        "coordinator.main",
        monkeypatch,
        ["--plaintext", "--no-mdns", "--traffic", "*: macs=90, upstream=10 overflow=upstream"],
    )
    rule = s.traffic["*"]
    assert rule.weights == {"macs": 90, "upstream": 10} and rule.overflow == "upstream"
    from cluster.traffic import parse_spec

    assert parse_spec("org/model:v1: a=1") == ("org/model:v1", {"a": 1}, "")
    with pytest.raises(PolicyError):
        parse_spec("no colon here")


def test_fleetctl_nodes_shows_each_nodes_traffic_class():
    """The named class, else the derived one (upstream engine: upstream; the rest: local)."""
    import io

    from rich.console import Console

    from cluster.api import common_pb2, fleet_pb2, node_pb2
    from cluster.fleetctl.nodes_cmd import fleet_table

    def node(node_id: str, engine: str, node_class: str = "") -> fleet_pb2.FleetNode:
        return fleet_pb2.FleetNode(
            address=f"{node_id}.lan:7700",
            status=node_pb2.NodeStatus(
                node_id=node_id, node_class=node_class, model=common_pb2.ModelInfo(engine=engine)
            ),
        )

    listing = fleet_pb2.ListNodesResponse(
        nodes=[node("mac-1", "mlx", "macs"), node("api-1", "upstream"), node("gpu-1", "vllm")]
    )
    console = Console(width=250, file=io.StringIO())
    console.print(fleet_table(listing))
    text = console.file.getvalue()
    rows = {line.split()[1]: line for line in text.splitlines() if ".lan" in line}
    assert "class" in text
    for node_id, cls in (("mac-1", "macs"), ("api-1", "upstream"), ("gpu-1", "local")):
        cells = [c.strip() for c in rows[node_id].split("│")]
        assert cls in cells, (node_id, cells)
