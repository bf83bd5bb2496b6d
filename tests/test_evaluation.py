"""The evaluation harness end to end: `fleetctl eval run` and `compare` against a real
coordinator, and the eval gate stopping a rollout to a model that truncates every note
(a generated model with a context too short for the notes) while letting an equal one in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.api import common_pb2, fleet_pb2
from cluster.digest import weights_digest
from tests.test_fleetctl import fleetctl as fleetctl_proc
from tests.test_rollout import fleetctl, rollout

MINI = Path(__file__).resolve().parent / "eval-mini.toml"
K = fleet_pb2


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """Same shapes as the tiny model, but a 560-token context: the mini suite's prompts
    (~450-490 tokens) fit, their ~250-token notes do not, so every note is truncated."""
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-short", TinyModelSpec(max_position_embeddings=560)
    )


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-other", TinyModelSpec(seed=7))


def test_eval_run_scores_every_case_and_compare_puts_two_runs_side_by_side(
    node, start_coordinator, tmp_path
):
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    base = ("--target", co.address, "--tls-name", "app", "--suite", str(MINI))
    runs = []
    for label in ("v1", "v1-again"):
        out = fleetctl_proc(
            "eval", "run", *base, "--label", label, "--out", str(tmp_path / f"{label}.json")
        )
        assert out.returncode == 0, out.stderr
        assert "[  3/3]" in out.stderr and "score " in out.stdout and "tok/s" in out.stdout
        runs.append(json.loads((tmp_path / f"{label}.json").read_text()))
    a, b = runs
    assert [c["id"] for c in a["cases"]] == ["cough", "bp-check", "ankle"]
    assert all(c["ok"] and c["schema_valid"] and c["quality"] > 0 for c in a["cases"])
    assert a["template"] == "soap-brief@default/v1" and a["summary"]["tokens_per_s"] > 0
    assert a["summary"]["score"] == b["summary"]["score"], (
        "same seed, same weights: same notes, same score"
    )
    assert "transcript" not in json.dumps(a).lower()  # scores and counts only
    out = fleetctl_proc(
        "eval", "compare", str(tmp_path / "v1.json"), str(tmp_path / "v1-again.json")
    )
    assert out.returncode == 0, out.stderr
    assert "score" in out.stdout and "case ankle" in out.stdout and "+0.000" in out.stdout
    # A floor the run misses is exit 1; a bad suite is exit 2 before anything is sent.
    assert fleetctl_proc("eval", "run", *base, "--min-score", "1.01").returncode == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('prompt_template = "haiku"\n')
    out = fleetctl_proc(
        "eval", "run", "--target", co.address, "--tls-name", "app", "--suite", str(bad)
    )
    assert out.returncode == 2 and "haiku" in out.stderr


def test_the_eval_gate_stops_a_rollout_to_a_model_that_truncates_every_note(
    start_node, start_coordinator, tiny_model, short_context_model, other_model
):
    nodes = [start_node(node_id=n, wait=False) for n in ("gate-a", "gate-b")]
    for n in nodes:
        n.wait_serving()
    co = start_coordinator(
        "--rollout-eval-suite",
        str(MINI),
        "--rollout-eval-margin",
        "0.2",
        nodes=[n.address for n in nodes],
    )
    co.wait_routable(2)
    old = weights_digest(tiny_model)

    out = fleetctl(
        co,
        "rollout",
        "start",
        "--model",
        str(short_context_model),
        "--rollout-id",
        "r-short",
        "--wait",
    )
    assert out.exit_code == 7, out.output
    r = rollout(co, "r-short")
    assert r.state == K.ROLLOUT_STATE_FAILED and [n.step for n in r.nodes] == [
        "rolled_back",
        "pending",
    ], r
    why = r.nodes[0].message
    assert "eval gate: suite mini scored" in why and "truncated 3 vs 0" in why, why
    for n in nodes:  # both serve the old weights again, uncordoned
        st = n.status()
        assert (
            st.model.weights_digest == old
            and not st.cordoned
            and st.lifecycle == common_pb2.LIFECYCLE_READY
        )

    out = fleetctl(
        co, "rollout", "start", "--model", str(other_model), "--rollout-id", "r-other", "--wait"
    )
    assert out.exit_code == 0, out.output
    assert rollout(co, "r-other").state == K.ROLLOUT_STATE_SUCCEEDED
    assert all(n.status().model.weights_digest == weights_digest(other_model) for n in nodes)
