"""Live headroom (issue 21 #5): the closed form against the planner's simulator, the
arrival meter, profile matching, the coordinator's series under load, and the alert rule."""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess

import pytest

from cluster.capacity.headroom import (
    ArrivalMeter,
    FleetModel,
    LiveHeadroom,
    NodeModel,
    RoutableNode,
    TokenMix,
    fleet_p95_s,
    headroom,
    match_profile,
    sla_rate_per_s,
)
from cluster.capacity.profile import Info, Limits, ModelFacts, NodeFacts, Profile, StepModel
from cluster.capacity.simulate import NodeSpec, simulate
from cluster.capacity.workload import Request
from tests.procs import ROOT

RULES = ROOT / "monitoring" / "prometheus" / "studiofleet-rules.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "studiofleet-rules.test.yml"

# Three shapes of node: a fast Mac-like one, a tiny-model-like one whose step grows 20 % per
# running sequence with 8 slots, and a GPU-like one with 64 slots.
FITS = {
    "mac": (
        StepModel(
            decode_base_s=0.01,
            decode_per_seq_s=0.0005,
            prefill_base_s=0.02,
            prefill_per_token_s=0.0002,
        ),
        16,
    ),
    "tiny": (
        StepModel(
            decode_base_s=0.004,
            decode_per_seq_s=0.0008,
            decode_per_ctx_token_s=1e-7,
            prefill_base_s=0.005,
            prefill_per_token_s=0.00003,
        ),
        8,
    ),
    "gpu": (
        StepModel(
            decode_base_s=0.02,
            decode_per_seq_s=0.0002,
            prefill_base_s=0.03,
            prefill_per_token_s=0.00005,
        ),
        64,
    ),
}


def profile(
    fit: StepModel, slots: int, *, model_id: str = "m", node_id: str = "", name: str = "p"
) -> Profile:
    return Profile(
        Info(name, "derived, for a test", sources=("tests/test_headroom.py",)),
        NodeFacts("mlx", "test", 1.0, node_id=node_id),
        ModelFacts(model_id),
        Limits(slots),
        fit,
    )


@pytest.mark.parametrize("shape", sorted(FITS))
@pytest.mark.parametrize("load, tolerance", [(0.3, 0.10), (0.6, 0.10), (0.9, 0.25)])
def test_closed_form_p95_agrees_with_the_simulator(shape, load, tolerance):
    """Two nodes, the clinic's note (500 prompt, 400:600 output), Poisson arrivals at 30, 60
    and 90 % of the closed form's capacity: its p95 within 10 % of the simulator's (25 % at
    90 %, where both are steep in the rate)."""
    fit, slots = FITS[shape]
    model = FleetModel.of([NodeModel("a", fit, slots), NodeModel("b", fit, slots)], TokenMix())
    rate = load * model.capacity_per_s
    rng, t, requests = random.Random(1), 0.0, []
    horizon = 3000 / rate
    while t < horizon:
        t += rng.expovariate(rate)
        requests.append(Request(t, 500, rng.randint(400, 600)))
    p = profile(fit, slots)
    sim = simulate(
        [NodeSpec(p, "a"), NodeSpec(p, "b")], requests, window=(0.1 * horizon, 0.9 * horizon)
    )
    simulated = sim.q(sim.totals, 0.95)
    predicted = fleet_p95_s(model, rate)
    assert abs(predicted - simulated) <= tolerance * simulated, (predicted, simulated)


def test_p95_grows_with_the_rate_and_the_sla_rate_is_where_it_crosses():
    fit, slots = FITS["mac"]
    model = FleetModel.of([NodeModel("a", fit, slots)], TokenMix())
    rates = [model.capacity_per_s * f for f in (0.0, 0.2, 0.5, 0.8, 0.95)]
    p95s = [fleet_p95_s(model, r) for r in rates]
    assert p95s == sorted(p95s) and all(math.isfinite(p) for p in p95s)
    assert fleet_p95_s(model, model.capacity_per_s * 1.01) == math.inf
    # A lone note: its prefill, then 590 tokens (the p95 of 400:600) at the per-stream rate.
    assert p95s[0] == pytest.approx(fit.single_note_s(500, 590), rel=1e-6)
    at = sla_rate_per_s(model, 8.0)
    assert fleet_p95_s(model, at) == pytest.approx(8.0, rel=1e-3)
    assert sla_rate_per_s(model, 1.0) == 0.0, "an SLA below a lone note's time leaves no rate"


def test_headroom_snapshot_and_its_line():
    fit, slots = FITS["mac"]
    nodes = [NodeModel("a", fit, slots), NodeModel("b", fit, slots)]
    h = headroom(nodes, 1.0, TokenMix(), 8.0, unprofiled=1)
    assert h.known and h.sla_met and 0 < h.predicted_p95_s < 8.0
    assert h.headroom_per_s == pytest.approx(h.sla_rate_per_s - 1.0) and h.headroom_per_s > 0
    assert 0 < h.headroom_ratio < 1
    assert "within the 8 s SLA" in h.line() and "1 routable node(s) without a profile" in h.line()
    over = headroom(nodes, h.sla_rate_per_s * 1.2, TokenMix(), 8.0)
    assert not over.sla_met and over.headroom_per_s < 0 and "OVER" in over.line()
    none = headroom([], 1.0, TokenMix(), 8.0, unprofiled=2)
    assert (
        not none.known
        and math.isnan(none.predicted_p95_s)
        and "no routable node has a capacity profile" in none.line()
    )


def test_arrival_meter_counts_a_sliding_window_and_measures_the_mix():
    now = [1000.0]
    meter = ArrivalMeter(60.0, clock=lambda: now[0])
    assert meter.rate_per_s() == 0.0 and meter.mix().source == "default"
    now[0] += 30.0
    for i in range(30):  # 30 notes over the meter's first 30 s: 1 a second
        meter.observe(
            1000.0 + i, 1000.0 + i + 2, completed=True, prompt_tokens=400 + i, completion_tokens=500
        )
    meter.observe(1029.0, 1029.5, completed=False, counted=False)  # a refusal: not load
    assert meter.rate_per_s() == pytest.approx(1.0)
    mix = meter.mix()
    assert (
        mix.source == "measured" and mix.output_mean == 500 and mix.prompt_mean == 415
    )  # 414.5, to 5 tokens
    now[0] += 60.0  # the window moved past them all
    assert meter.rate_per_s() == 0.0 and meter.mix().source == "default"


def test_profiles_match_by_node_id_first_then_by_model_id():
    fit, slots = FITS["mac"]
    measured = profile(fit, slots, model_id="qwen", node_id="mac-01", name="measured-on-mac-01")
    for_model = profile(fit, 4, model_id="qwen", name="for-the-model")
    other = profile(fit, slots, model_id="llama", name="other-model")
    assert match_profile([for_model, measured], "mac-01", "qwen") is measured
    assert (
        match_profile([measured, for_model], "mac-02", "qwen") is measured
    )  # same model: first given
    assert match_profile([for_model, measured], "mac-02", "qwen") is for_model
    assert match_profile([other], "mac-01", "qwen") is None
    live = LiveHeadroom(
        [for_model], nodes=lambda: [RoutableNode("mac-01", "qwen", 8), RoutableNode("x", "llama")]
    )
    have, missing = live.models()
    assert [(m.node_id, m.max_running, m.profile) for m in have] == [("mac-01", 8, "for-the-model")]
    assert missing == 1
    with pytest.raises(ValueError, match="sla_p95_s"):
        LiveHeadroom([], nodes=list, sla_p95_s=0)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return path


def test_the_alert_rule_fires_on_predicted_p95_over_the_sla():
    """The rule is in the shipped rules file, promtool accepts it, and its unit tests (in the
    shipped rules' test file: fires past the SLA for 10 minutes, quiet within it or without
    a profile) pass."""
    rules, tests = RULES.read_text(), RULE_TESTS.read_text()
    assert "alert: StudioFleetCapacitySLAAtRisk" in rules
    assert tests.count("alertname: StudioFleetCapacitySLAAtRisk") >= 2
    checked = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    for series in re.findall(r"studiofleet_capacity_\w+", rules):
        assert series in (
            "studiofleet_capacity_predicted_p95_seconds",
            "studiofleet_capacity_sla_p95_seconds",
        )


# -- the coordinator's series, on a real fleet ---------------------------------------------

TINY_FIT = StepModel(
    decode_base_s=0.004, decode_per_seq_s=0.0008, prefill_base_s=0.005, prefill_per_token_s=0.00003
)


def _scrape(co) -> dict:
    from cluster.metrics import parse
    from cluster.security.identity import Role

    status, body, _ = co.http_get("/metrics", "prometheus", Role.MONITOR)
    assert status == 200, body
    return {
        name: value
        for (name, labels), value in parse(body.decode()).items()
        if name.startswith("studiofleet_capacity_")
        and (not labels or ("profiled", "yes") in labels)
    }


def test_the_coordinator_exports_the_live_headroom_under_load(
    start_node, start_coordinator, tmp_path
):
    """A profile given to the coordinator for the node it was measured on; before any traffic
    the prediction is a lone note's time; after a burst of notes the rate is measured and the
    prediction, headroom, GetTraffic and `fleetctl top` agree with the closed form."""
    from cluster.api import fleet_pb2, fleet_pb2_grpc
    from tests.fleet_helpers import collect, note
    from tests.test_replay import fleetctl

    node = start_node("--max-running", "8", node_id="headroom-node")
    path = profile(
        TINY_FIT, 8, model_id="some-other-id", node_id="headroom-node", name="tiny-measured"
    ).save(tmp_path / "tiny.toml")
    co = start_coordinator(
        "--capacity-profile",
        str(path),
        "--sla-p95-s",
        "5",
        "--capacity-window-s",
        "60",
        nodes=[node.address],
        name="headroom-coordinator",
    )
    co.wait_routable(1)
    before = _scrape(co)
    assert (
        before["studiofleet_capacity_nodes"] == 1
        and before["studiofleet_capacity_sla_p95_seconds"] == 5
    )
    assert before["studiofleet_capacity_arrivals_per_second"] == 0
    lone = TINY_FIT.single_note_s(
        500, 590
    )  # the default mix (the clinic's note) before 20 notes ended
    assert before["studiofleet_capacity_predicted_p95_seconds"] == pytest.approx(lone, rel=1e-6)
    assert before["studiofleet_capacity_headroom_ratio"] == 1.0

    results = [collect(co.inference, note(i, 8, request_id=f"headroom-{i}")) for i in range(24)]
    assert all(r.final is not None for r in results)
    after = _scrape(co)
    rate = after["studiofleet_capacity_arrivals_per_second"]
    assert 24 / 60 <= rate <= 24.0, rate  # 24 notes over at most the 60 s window, at least 1 s
    # 24 short notes ended: their measured mix (as the meter rounds it) replaces the default one.
    meter = ArrivalMeter(60.0)
    for r in results:
        meter.observe(
            0,
            meter._since,
            completed=True,
            prompt_tokens=r.final.usage.prompt_tokens,
            completion_tokens=r.final.usage.completion_tokens,
        )
    mix = meter.mix()
    assert mix.source == "measured" and mix.output_p95 <= 10
    assert after["studiofleet_capacity_predicted_p95_seconds"] < lone
    model = FleetModel.of([NodeModel("headroom-node", TINY_FIT, 8)], mix)
    assert after["studiofleet_capacity_predicted_p95_seconds"] == pytest.approx(
        fleet_p95_s(model, rate), rel=0.05
    )
    assert after["studiofleet_capacity_sla_arrivals_per_second"] > rate
    assert 0 < after["studiofleet_capacity_headroom_ratio"] < 1

    traffic = fleet_pb2_grpc.FleetStub(co.channel).GetTraffic(
        fleet_pb2.GetTrafficRequest(), timeout=10
    )
    h = traffic.headroom
    assert (
        h.known
        and h.profiled_nodes == 1
        and h.unprofiled_nodes == 0
        and h.sla_p95_s == 5
        and h.mix == "measured"
    )
    assert h.predicted_p95_s == pytest.approx(
        after["studiofleet_capacity_predicted_p95_seconds"], rel=0.1
    )
    top = fleetctl("top", "--once", "-c", co.address, "--tls-name", "operator")
    assert top.returncode == 0, top.stderr
    assert "capacity:" in top.stdout and "within the 5 s SLA" in top.stdout

    from cluster.security.identity import Role

    status, body, _ = co.http_get("/api/snapshot", "operator", Role.OPERATOR)
    assert status == 200, body
    import json

    card = json.loads(body)["capacity"]
    assert card["known"] and card["line"].startswith("capacity:") and card["sla_p95_s"] == 5


def test_a_node_without_a_profile_is_counted_and_left_out(start_node, start_coordinator, tmp_path):
    node = start_node(node_id="unprofiled-node")
    path = profile(TINY_FIT, 8, model_id="a-model-no-node-serves", name="elsewhere").save(
        tmp_path / "x.toml"
    )
    co = start_coordinator(
        "--capacity-profile", str(path), nodes=[node.address], name="unprofiled-coordinator"
    )
    co.wait_routable(1)
    from cluster.metrics import parse
    from cluster.security.identity import Role

    status, body, _ = co.http_get("/metrics", "prometheus", Role.MONITOR)
    samples = parse(body.decode())
    assert samples[("studiofleet_capacity_nodes", frozenset({("profiled", "no")}))] == 1
    assert samples[("studiofleet_capacity_nodes", frozenset({("profiled", "yes")}))] == 0
    assert not [k for k in samples if k[0] == "studiofleet_capacity_predicted_p95_seconds"], (
        "no prediction"
    )
    assert "# TYPE studiofleet_capacity_predicted_p95_seconds gauge" in body.decode()


def test_a_coordinator_refuses_a_profile_it_cannot_read(tmp_path):
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text("schema = 1\n[profile]\nname = 'x'\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.main",
            "--plaintext",
            "--no-mdns",
            "--capacity-profile",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "--capacity-profile" in out.stderr and "bad.toml" in out.stderr
