"""`fleetctl plan` as an operator runs it: refusals name the flag, an SLA below the
single-stream bound is answered (with the numbers), -o json carries the plan, charts are written."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from cluster.capacity.profile import (
    PUBLISHED,
    Cost,
    Info,
    Limits,
    ModelFacts,
    NodeFacts,
    Profile,
    StepModel,
)
from cluster.fleetctl.app import app

# A dense 72B at 4 bits on one Mac, shaped like the reference profiles (15 tok/s a stream).
SLOW = StepModel(
    decode_base_s=1 / 15, decode_per_seq_s=0.004, prefill_base_s=0.02, prefill_per_token_s=1 / 170
)
# A small model on a GPU: 100 tok/s a stream, fast prefill.
FAST = StepModel(
    decode_base_s=0.01, decode_per_seq_s=0.0003, prefill_base_s=0.01, prefill_per_token_s=0.0002
)


def make_profile(
    tmp_path, name: str, fit: StepModel, max_running: int = 8, cost: Cost | None = None
) -> str:
    p = Profile(
        Info(name, PUBLISHED, "2026-12-06T08:00:00Z", ("synthetic test profile",)),
        NodeFacts("mlx", "test chip", 192.0),
        ModelFacts(f"org/{name}", params_b=72.7),
        Limits(max_running, 32768),
        fit,
        cost=cost,
    )
    return str(p.save(tmp_path / f"{name}.toml"))


def plan(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


SMALL_DAY = ("--notes-per-day", "1500", "--window-hours", "1")


@pytest.mark.parametrize(
    "args, flag, words",
    [
        (("--notes-per-day", "-5"), "--notes-per-day", "must be a number > 0"),
        (("--hours", "8-25"), "--hours", "within 0-24"),
        (("--hours", "eight"), "--hours", "expected START-END"),
        (("--peak-factor", "-1"), "--peak-factor", "must be a number > 0"),
        (("--output-tokens", "600:400"), "--output-tokens", "LO <= HI"),
        (("--sla-p95-s", "0"), "--sla-p95-s", "must be a number of seconds > 0"),
        (("--power-w", "-3"), "--power-w", "must be a number >= 0"),
        (("--amortize-months", "0"), "--amortize-months", "must be a number > 0"),
        (("--shared-prefix-tokens", "-1"), "--shared-prefix-tokens", "must be >= 0"),
        (("-o", "yaml"), "--output", "table or json"),
    ],
)
def test_plan_refuses_nonsense_naming_the_flag(tmp_path, args, flag, words):
    res = plan("--profile", make_profile(tmp_path, "slow", SLOW), *args)
    assert res.exit_code == 2, res.output
    assert f"fleetctl plan: {flag}: " in res.stderr and words in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no-such-profile", "no reference profile by that name"),
        ("/nowhere/x.toml", "/nowhere/x.toml: no such profile file"),
        ("{slow}=abc", "expected FILE_OR_NAME=COUNT with a whole number"),
        ("{slow}=0", "at least 1 node"),
        ("{slow}=-2", "expected FILE_OR_NAME=COUNT"),
    ],
)
def test_plan_refuses_a_bad_profile_spec(tmp_path, spec, words):
    res = plan("--profile", spec.format(slow=make_profile(tmp_path, "slow", SLOW)))
    assert (
        res.exit_code == 2 and "fleetctl plan: --profile: " in res.stderr and words in res.stderr
    ), res.output


def test_plan_refuses_a_broken_profile_file_naming_its_key(tmp_path):
    path = make_profile(tmp_path, "slow", SLOW)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("max_running = 8", "max_running = 0"))
    res = plan("--profile", path)
    assert res.exit_code == 2 and f"{path}: limits.max_running: must be >= 1" in res.stderr


def test_an_sla_below_the_single_stream_bound_is_answered(tmp_path):
    res = plan(
        "--profile", make_profile(tmp_path, "slow", SLOW) + "=2", *SMALL_DAY, "--sla-p95-s", "8"
    )
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "No fleet of slow can meet p95 <= 8 s: per-stream decode 15.0 tok/s bounds a" in out
    assert "even alone" in out and "does NOT meet the 8 s target" in out
    assert "What would meet 8 s instead of slow:" in out and "node group" in out
    assert "The best it can do: p95 <= " in out and "x its single-note bound) takes " in out
    assert "plan: simulating the given fleet" in res.stderr  # progress goes to stderr


def test_plan_json_for_a_mixed_fleet_with_costs(tmp_path):
    slow = make_profile(tmp_path, "slow", SLOW, cost=Cost(node_cost_usd=7200.0, power_w=250.0))
    fast = make_profile(tmp_path, "fast", FAST, max_running=16)
    res = plan(
        "--profile",
        f"{slow}=1",
        "--profile",
        f"{fast}=2",
        *SMALL_DAY,
        "--sla-p95-s",
        "12",
        "--rent-usd-hour",
        "1.5",
        "-o",
        "json",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [(f["profile"], f["count"]) for f in doc["fleet"]["fleet"]] == [("slow", 1), ("fast", 2)]
    assert doc["fleet"]["size"] == 3 and len(doc["fleet"]["nodes"]) == 3
    for key in ("time_per_note_s", "queue_wait_s", "ttft_s"):
        q = doc["fleet"][key]
        assert q["p50"] <= q["p95"] <= q["p99"]
    assert (
        doc["sla_p95_s"] == 12
        and doc["simulated"]["measured_to"] > doc["simulated"]["measured_from"]
    )
    assert 0 < doc["fleet"]["nodes"][0]["busy"] <= 1
    bounds = doc["single_note_bounds"]
    assert bounds["slow"]["notes_beyond_sla"] == 1.0 and bounds["fast"]["notes_beyond_sla"] == 0.0
    searches = {s["profile"]: s for s in doc["searches"]}
    slow_search = searches["slow"]
    assert slow_search["smallest_count"] is None and "15.0 tok/s" in slow_search["why_not"]
    # Out of reach, the search answers for the best the profile can do: 1.25x its single-note bound.
    relaxed = slow_search["relaxed_sla_p95_s"]
    assert relaxed == math.ceil(1.25 * bounds["slow"]["p95_note_s"])
    best = slow_search["relaxed_smallest_count"]
    by_count = {t["count"]: t["p95_time_per_note_s"] for t in slow_search["tried"]}
    assert by_count[best] <= relaxed and (best - 1 not in by_count or by_count[best - 1] > relaxed)
    fast_search = searches["fast"]
    n = fast_search["smallest_count"]
    tried = {t["count"]: t["p95_time_per_note_s"] for t in fast_search["tried"]}
    assert tried[n] <= 12 and (n == 1 or tried.get(n - 1) is None or tried[n - 1] > 12)
    costs = doc["costs"]
    # The rent flag replaces both profiles' purchase price: 3 nodes x $1.50 x 24 h, plus the slow node's power.
    assert costs["fleet"]["fleet_usd_day_parts"]["rent"] == pytest.approx(3 * 36.0)
    assert costs["fleet"]["fleet_usd_day_parts"]["capital"] == 0
    assert costs["fleet"]["fleet_usd_day_parts"]["power"] == pytest.approx(0.25 * 24 * 0.13)
    per_note_api = (500 * 5.0 + 500 * 20.0) / 1e6
    assert costs["fleet"]["api_usd_day"] == pytest.approx(1500 * per_note_api)
    assert costs["fleet"]["break_even_notes_day"] == pytest.approx(
        costs["fleet"]["fleet_usd_day"] / per_note_api
    )
    assert costs["field_report"]["api_usd_day_at_report_volume"] == pytest.approx(45.0)
    assert costs["smallest_fleets"]["fast"]["fleet_usd_day"] == pytest.approx(n * 36.0)


def test_more_nodes_shorten_the_queue_to_the_single_note_bound(tmp_path):
    slow = make_profile(tmp_path, "slow", SLOW)
    res = plan("--profile", f"{slow}=1", *SMALL_DAY, "--sla-p95-s", "60", "-o", "json")
    doc = json.loads(res.stdout)
    search = doc["searches"][0]
    assert search["smallest_count"] is not None
    tried = sorted((t["count"], t["p95_time_per_note_s"] or math.inf) for t in search["tried"])
    assert all(
        a[1] >= b[1] * 0.97 for a, b in zip(tried, tried[1:], strict=False)
    )  # p95 falls as nodes are added
    assert tried[-1][1] >= doc["single_note_bounds"]["slow"]["p95_note_s"] * 0.97


def test_plan_writes_png_and_svg_charts(tmp_path):
    slow = make_profile(tmp_path, "slow", SLOW, cost=Cost(node_cost_usd=7200.0, power_w=250.0))
    res = plan(
        "--profile",
        f"{slow}=2",
        *SMALL_DAY,
        "--sla-p95-s",
        "60",
        "--plot-dir",
        str(tmp_path / "plots"),
    )
    assert res.exit_code == 0, res.output
    for stem in ("capacity-p95", "capacity-cost"):
        png = (tmp_path / "plots" / f"{stem}.png").read_bytes()
        svg = (tmp_path / "plots" / f"{stem}.svg").read_text()
        assert png.startswith(b"\x89PNG") and "<svg" in svg and "notes" in svg
        assert f"Plot: {tmp_path / 'plots' / stem}.png" in res.stdout


def test_an_overloaded_fleet_reports_refusals_as_never_in_strict_json(tmp_path):
    slow = make_profile(tmp_path, "slow", SLOW, max_running=2)
    res = plan(
        "--profile",
        slow,
        "--notes-per-day",
        "6000",
        "--window-hours",
        "1",
        "--no-search",
        "-o",
        "json",
    )
    assert res.exit_code == 0, res.output

    def no_constants(name):
        raise AssertionError(f"{name} in JSON")

    doc = json.loads(res.stdout, parse_constant=no_constants)
    refused = sum(doc["fleet"]["refused"].values())
    assert refused > 0.05 * doc["fleet"]["notes"]
    assert doc["fleet"]["time_per_note_s"]["p95"] is None and doc["fleet"]["meets_sla"] is False


def test_plan_routes_the_fleet_by_a_traffic_policy(tmp_path):
    """--traffic with profiles tagged by --node-class: each class's share is its weight's (the
    coordinator's own round robin), and the report has each class's p95 and busy fraction."""
    mac = make_profile(tmp_path, "mac", FAST)
    api = make_profile(tmp_path, "api", FAST)
    args = ("--profile", f"{mac}=2", "--profile", f"{api}=1", "--node-class", "mac=macs",
            "--node-class", "api=upstream", "--traffic", "notes: macs=90 upstream=10",
            *SMALL_DAY, "--no-search")  # fmt: skip
    res = plan(*args, "-o", "json")
    assert res.exit_code == 0, res.output
    f = json.loads(res.stdout)["fleet"]
    assert f["traffic_policy"] == "macs=90 upstream=10" and f["traffic_fallbacks"] == 0
    by = {c["node_class"]: c for c in f["traffic_classes"]}
    assert by["macs"]["nodes"] == 2 and by["upstream"]["nodes"] == 1
    assert by["macs"]["share"] == pytest.approx(0.9, abs=0.01)
    assert by["upstream"]["share"] == pytest.approx(0.1, abs=0.01)
    assert by["macs"]["served"] + by["upstream"]["served"] == f["notes"]
    for c in by.values():
        assert 0 < c["p50_s"] <= c["p95_s"] and 0 < c["busy"] < 1
    # Per node, the 2 macs carry 45% each and the upstream 10%: their busy fractions follow.
    assert by["macs"]["busy"] > 2 * by["upstream"]["busy"]
    text = plan(*args)
    assert text.exit_code == 0, text.output
    assert "traffic policy macs=90 upstream=10" in text.stdout and "class macs" in text.stdout


def test_plan_simulates_overflow_past_the_sla(tmp_path):
    """One slow Mac with overflow to a fast upstream: past the SLA's rate the excess overflows
    (the coordinator's switch on the live headroom's signal); well within it nothing does."""
    mac = make_profile(tmp_path, "mac", SLOW)
    api = make_profile(tmp_path, "api", FAST, max_running=16)

    def run(notes_per_day: str, sla_s: str) -> dict:
        res = plan("--profile", mac, "--profile", api, "--node-class", "mac=macs",
                   "--node-class", "api=upstream", "--traffic", "*: macs=1 overflow=upstream",
                   "--notes-per-day", notes_per_day, "--window-hours", "1", "--sla-p95-s", sla_s,
                   "--no-search", "-o", "json")  # fmt: skip
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["fleet"]

    busy = run("6000", "60")
    by = {c["node_class"]: c for c in busy["traffic_classes"]}
    assert busy["traffic_overflow_episodes"] >= 1 and busy["traffic_overflow_routed"] > 0
    assert by["upstream"]["served"] == busy["traffic_overflow_routed"]
    assert by["macs"]["p95_s"] <= 60 * 1.2
    # 300 notes a day leave the Mac's 8 slots idle but for a few notes at a time; a note alone
    # takes ~45 s, so a 600 s SLA holds at any rate the 30 s window could measure.
    quiet = run("300", "600")
    assert quiet["traffic_overflow_routed"] == 0 and quiet["traffic_overflow_episodes"] == 0
    assert {c["node_class"]: c["served"] for c in quiet["traffic_classes"]}["upstream"] == 0


def test_plan_simulates_overflow_on_the_queue_signal(tmp_path):
    """--overflow-signal queue (a coordinator without --capacity-profile): overflow starts
    only once notes wait in the coordinator's queue, i.e. after the Mac's own queue is full,
    so the Mac's p95 is far past what the headroom signal keeps it to; the report names it."""
    mac = make_profile(tmp_path, "mac", SLOW)
    api = make_profile(tmp_path, "api", FAST, max_running=16)
    args = ("--profile", mac, "--profile", api, "--node-class", "mac=macs",
            "--node-class", "api=upstream", "--traffic", "*: macs=1 overflow=upstream",
            "--notes-per-day", "20000", "--window-hours", "1", "--sla-p95-s", "60",
            "--no-search", "--overflow-signal", "queue", "--overflow-queue-wait-s", "5")  # fmt: skip
    res = plan(*args, "-o", "json")
    assert res.exit_code == 0, res.output
    f = json.loads(res.stdout)["fleet"]
    assert f["traffic_overflow_signal"] == "queue" and f["traffic_overflow_queue_wait_s"] == 5
    assert f["traffic_overflow_episodes"] >= 1 and f["traffic_overflow_routed"] > 0
    by = {c["node_class"]: c for c in f["traffic_classes"]}
    assert by["upstream"]["served"] == f["traffic_overflow_routed"]
    headroom = plan(*args[:-4], "-o", "json")  # the same day on the headroom signal
    assert headroom.exit_code == 0, headroom.output
    h = json.loads(headroom.stdout)["fleet"]
    assert h["traffic_overflow_signal"] == "headroom" and "traffic_overflow_queue_wait_s" not in h
    on_headroom = {c["node_class"]: c for c in h["traffic_classes"]}
    assert on_headroom["macs"]["p95_s"] <= 60 * 1.2 < 3 * 60 < by["macs"]["p95_s"]
    assert h["traffic_overflow_routed"] > f["traffic_overflow_routed"]
    text = plan(*args)
    assert text.exit_code == 0 and "on the queue signal, waits over 5 s" in text.stdout, text.output


@pytest.mark.parametrize(
    "args, flag, words",
    [
        (("--overflow-signal", "queue"), "--overflow-signal", "give --traffic"),
        (
            ("--traffic", "*: local=1 overflow=upstream", "--overflow-signal", "fast"),
            "--overflow-signal",
            "headroom or queue",
        ),
        (
            ("--traffic", "*: local=1 overflow=upstream", "--overflow-queue-wait-s", "-1"),
            "--overflow-queue-wait-s",
            "> 0",
        ),
        (("--traffic", "*: upstream=1 overflow=upstream"), "--traffic", "another class"),
        (("--traffic", "*: local=lots"), "--traffic", "CLASS=WEIGHT"),
        (("--traffic", "*: local=1", "--node-class", "nope=macs"), "--node-class", "PROFILE"),
        (("--traffic", "*: local=1", "--node-class", "mac=Macs!"), "--node-class", "lower-case"),
        (("--node-class", "mac=macs"), "--node-class", "give --traffic"),
    ],
)
def test_plan_refuses_a_bad_traffic_policy_naming_the_flag(tmp_path, args, flag, words):
    mac = make_profile(tmp_path, "mac", FAST)
    res = plan("--profile", mac, *SMALL_DAY, "--no-search", *args)
    assert res.exit_code == 2, res.output
    assert flag in res.output and words in res.output, res.output
