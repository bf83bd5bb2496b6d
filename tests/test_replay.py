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
TRAFFIC = ("--notes-per-day", "6000", "--hours", "8-18", "--peak-factor", "2", "--time-scale", "30",
           "--duration", "8", "--prompt-tokens", "80:160", "--output-tokens", "16:48", "--seed", "7")


def fleetctl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.fleetctl.app", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def request_log(co, prefix: str, expected: int, timeout_s: float = 10.0) -> list:
    """The coordinator's request-log rows whose id starts with `prefix`, once `expected` are
    there (rows reach SQLite from a writer thread, a moment after the request ends)."""
    stub = fleet_pb2_grpc.FleetStub(co.channel)
    deadline = time.monotonic() + timeout_s
    while True:
        reply = stub.ListRequests(fleet_pb2.ListRequestsRequest(since_s=3600, limit=10_000), timeout=10)
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
    assert m["notes"] >= 10, report                       # the window really held traffic
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
    assert len(notes) == m["notes"], f"the request log has {len(notes)} of the run's {m['notes']} notes"
    by_outcome: dict = {}
    for r in notes:
        by_outcome[r.outcome] = by_outcome.get(r.outcome, 0) + 1
    assert by_outcome == report["outcomes"]
    assert {r.caller for r in notes} == {"app/app"}
    # ignore_eos: each note generated exactly the output length drawn for it (16-48 tokens).
    assert all(16 <= r.completion_tokens <= 48 and r.finish_reason == "length" for r in notes)
    assert sum(r.completion_tokens for r in notes) == pytest.approx(m["output_tokens_per_s"] * report["wall_s"],
                                                                     rel=1e-6)
    assert len({r.nodes[-1] for r in notes}) == 2, "both nodes served notes"


def test_replay_table_output_shows_the_figures(fleet):
    co, _nodes = fleet
    out = fleetctl("replay", "-c", co.address, *TRAFFIC[:-6], "--duration", "3", "--prompt-tokens", "60",
                   "--output-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "time per note p95" in out.stdout and "outcomes: completed" in out.stdout


@pytest.mark.parametrize("flags, flag", [
    (("--time-scale", "0"), "--time-scale"),
    (("--duration", "-1"), "--duration"),
    (("--start", "25:00"), "--start"),
    (("--output-tokens", "600:400"), "--output-tokens"),
    (("--predict-with", "/nonexistent/profile.toml"), "--predict-with"),
    (("--predict-with", "x.toml=zero"), "--predict-with"),
    (("-o", "yaml"), "--output"),
])
def test_replay_refuses_bad_flags_naming_the_flag(flags, flag):
    out = fleetctl("replay", "-c", "127.0.0.1:1", *flags, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert flag in out.stderr, out.stderr


def test_replay_names_the_coordinator_it_cannot_reach():
    out = fleetctl("replay", "-c", "127.0.0.1:1", "--duration", "2", "--time-scale", "600", timeout=60)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "127.0.0.1:1" in out.stderr
