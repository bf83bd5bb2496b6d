"""`fleetctl replay` (issue 21 #4) against a real 2-node tiny fleet: every note completes,
the report's counts match the coordinator's request log, prompts have the planned length,
and bad flags exit 2 naming the flag."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cluster.api import fleet_pb2, fleet_pb2_grpc
from tests.procs import ROOT

# ~24 notes in 8 s: the busiest window of a 6,000-note day (8-18 h at 2x) is 5.9 notes a
# minute; 30x compresses 4 minutes of it into 8 s. Short notes keep the test quick.
TRAFFIC = (
    "--notes-per-day",
    "6000",
    "--hours",
    "8-18",
    "--peak-factor",
    "2",
    "--time-scale",
    "30",
    "--duration",
    "8",
    "--prompt-tokens",
    "80:160",
    "--output-tokens",
    "16:48",
    "--seed",
    "7",
)


def fleetctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.fleetctl.app", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def request_log(co, prefix: str, expected: int, timeout_s: float = 10.0) -> list:
    """The coordinator's request-log rows whose id starts with `prefix`, once `expected` are
    there (rows reach SQLite from a writer thread, a moment after the request ends)."""
    stub = fleet_pb2_grpc.FleetStub(co.channel)
    deadline = time.monotonic() + timeout_s
    while True:
        reply = stub.ListRequests(
            fleet_pb2.ListRequestsRequest(since_s=3600, limit=10_000), timeout=10
        )
        rows = [r for r in reply.requests if r.request_id.startswith(prefix)]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.fixture
def fleet(start_node, start_coordinator):
    nodes = [start_node("--max-running", "8", node_id=f"replay-node-{i}") for i in (1, 2)]
    co = start_coordinator(nodes=[n.address for n in nodes], name="replay-coordinator")
    co.wait_routable(2)
    return co, nodes


def test_replay_completes_every_note_and_matches_the_request_log(fleet):
    co, _nodes = fleet
    out = fleetctl("replay", "-c", co.address, *TRAFFIC, "-o", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    m = report["measured"]
    assert m["notes"] >= 10, report  # the window really held traffic
    assert report["outcomes"] == {"completed": m["notes"]}, report["outcomes"]
    assert m["completed"] == m["notes"]
    assert 0 < m["ttft_p50_s"] <= m["p50_s"] <= m["p95_s"] <= m["p99_s"]
    assert m["notes_per_s"] > 0 and m["output_tokens_per_s"] > 0
    # Prompts were built to the planned lengths, as the fleet's own tokenizer counts them.
    planned, sent = report["prompt_tokens_planned_mean"], report["prompt_tokens_sent_mean"]
    assert abs(sent - planned) <= 0.05 * planned, (planned, sent)
    assert "notes ended" in out.stderr, "progress is shown while it runs"

    run = report["run_id"]
    rows = request_log(co, f"{run}-", m["notes"] + report["calibration_requests"])
    notes = [r for r in rows if not r.request_id.startswith(f"{run}-cal-")]
    calibration = [r for r in rows if r.request_id.startswith(f"{run}-cal-")]
    assert len(calibration) == report["calibration_requests"]
    assert len(notes) == m["notes"], (
        f"the request log has {len(notes)} of the run's {m['notes']} notes"
    )
    by_outcome: dict = {}
    for r in notes:
        by_outcome[r.outcome] = by_outcome.get(r.outcome, 0) + 1
    assert by_outcome == report["outcomes"]
    assert {r.caller for r in notes} == {"app/app"}
    # ignore_eos: each note generated exactly the output length drawn for it (16-48 tokens).
    assert all(16 <= r.completion_tokens <= 48 and r.finish_reason == "length" for r in notes)
    assert sum(r.completion_tokens for r in notes) == pytest.approx(
        m["output_tokens_per_s"] * report["wall_s"], rel=1e-6
    )
    assert len({r.nodes[-1] for r in notes}) == 2, "both nodes served notes"


def test_replay_with_a_prediction_shows_both_and_the_error(fleet, tmp_path):
    """--predict-with PROFILE=2: the simulator's figures for the same notes beside the
    measured ones (the profile here is made up; bench/capacity.py measures real ones)."""
    from cluster.capacity.profile import Info, Limits, ModelFacts, NodeFacts, Profile, StepModel

    co, _nodes = fleet
    fit = StepModel(
        decode_base_s=0.004, decode_per_seq_s=0.0008, prefill_base_s=0.005, prefill_per_token_s=3e-5
    )
    path = Profile(
        Info("tiny-made-up", "derived, for a test", sources=("tests/test_replay.py",)),
        NodeFacts("mlx", "test", 1.0),
        ModelFacts("tiny"),
        Limits(8),
        fit,
    ).save(tmp_path / "tiny.toml")
    args = (
        "replay",
        "-c",
        co.address,
        *TRAFFIC[:-6],
        "--duration",
        "3",
        "--prompt-tokens",
        "60",
        "--output-tokens",
        "8",
        "--predict-with",
        f"{path}=2",
    )
    out = fleetctl(*args)
    assert out.returncode == 0, out.stderr
    assert "time per note p95" in out.stdout and "predicted" in out.stdout and " %" in out.stdout
    assert "outcomes: completed" in out.stdout and f"predicted for: {path}=2" in out.stdout
    out = fleetctl(*args, "-o", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    p, m = report["predicted"], report["measured"]
    assert p["notes"] == m["notes"] == p["completed"] and 0 < p["p50_s"] <= p["p95_s"]
    # A lone 60+8-token note on that profile: the simulator cannot beat the fit's own bound.
    assert p["p50_s"] >= fit.single_note_s(60, 8) * 0.999
    assert report["error_pct"]["p95_s"] == pytest.approx(
        100 * (p["p95_s"] - m["p95_s"]) / m["p95_s"], abs=0.05
    )


@pytest.mark.parametrize(
    "flags, flag",
    [
        (("--time-scale", "0"), "--time-scale"),
        (("--duration", "-1"), "--duration"),
        (("--start", "25:00"), "--start"),
        (("--output-tokens", "600:400"), "--output-tokens"),
        (("--predict-with", "/nonexistent/profile.toml"), "--predict-with"),
        (("--predict-with", "x.toml=zero"), "--predict-with"),
        (("-o", "yaml"), "--output"),
        (("--nodes-per-host", "0"), "--nodes-per-host"),
        (("--host-parallelism", "0"), "--host-parallelism"),
    ],
)
def test_replay_refuses_bad_flags_naming_the_flag(flags, flag):
    out = fleetctl("replay", "-c", "127.0.0.1:1", *flags, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert flag in out.stderr, out.stderr


def test_replay_names_the_coordinator_it_cannot_reach():
    out = fleetctl(
        "replay", "-c", "127.0.0.1:1", "--duration", "2", "--time-scale", "600", timeout=60
    )
    assert out.returncode == 3, out.stdout + out.stderr
    assert "127.0.0.1:1" in out.stderr
