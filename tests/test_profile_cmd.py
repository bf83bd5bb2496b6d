"""`fleetctl profile` on a real tiny node: the profile file loads, and its fitted step
times predict a separate measured run; refusals name the target and what to do."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from cluster.capacity import measure
from cluster.capacity.profile import MEASURED, load_profile
from cluster.capacity.workload import NOTE_TEMPERATURE
from cluster.client import AsyncFleetClient
from cluster.localfleet import HARNESS_APP, HARNESS_NODE_CALLER, HARNESS_OPERATOR
from cluster.security.identity import ANY_NODE
from tests.fleet_helpers import serving_coordinator
from tests.procs import ROOT, CoordinatorProcess

AT_NODE = ("--node", "--tls-name", HARNESS_NODE_CALLER)
TOLERANCE = 0.15
# Batch sizes and contexts the profile's grid (1, 2, 4, 8, 16 at 16 and 512 prompt tokens) has not measured.
HELD_OUT = ((3, 300), (6, 120), (12, 40))
REFERENCE = (4, 16)  # a point of the grid, measured again beside the held-out ones
DRIFT, MAX_DRIFT, ATTEMPTS = 0.10, 0.50, 3


def fleetctl(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "cluster.fleetctl.app", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def profile_node(address: str, out) -> tuple[dict, str]:
    """`fleetctl profile --node --quick`: (the JSON it prints, its stderr)."""
    res = fleetctl(
        "profile", *AT_NODE, "--target", address, "--quick", "--out", str(out), "-o", "json"
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def held_out_run(address: str, limits: measure.NodeLimits) -> list:
    """Step times measured as the profile measures them: its REFERENCE point again, then
    points it did not measure."""

    async def run():
        async with AsyncFleetClient(address, server_name=ANY_NODE) as client:
            # The profile's sampling (fleetctl profile's default): sampled steps are slower.
            prober = measure.Prober(client, limits, seed=7, temperature=NOTE_TEMPERATURE)
            await prober.calibrate()
            await prober.decode_point(16, 16, 4)  # warm-up, as the profile does
            return await measure.decode_curve(prober, (REFERENCE, *HELD_OUT), 24, 3, 0.3)

    return asyncio.run(run())


# Up to two profiles and held-out runs of about a minute each on a busy host; it times the
# machine, so it runs alone (scripts/test), not beside another test file.
@pytest.mark.serial
@pytest.mark.timeout(420)
def test_profile_writes_a_file_whose_fit_predicts_a_separate_run(node, tmp_path, as_node_caller):
    # The machine is shared: another process's CPU time slows every step for seconds at a
    # time, and CI hosts differ in speed from run to run. The profile's REFERENCE point is
    # measured again at the start of each held-out run; the ratio of the two (the drift) is
    # how much faster or slower the machine ran since the profile. Profile and run are
    # measured again while the drift exceeds DRIFT (at most ATTEMPTS times); the attempt
    # with the smallest drift is kept, and its predictions are scaled by it, so the check
    # below is of the fitted model, not of the machine's load at that minute.
    attempts = []
    for attempt in range(ATTEMPTS):
        path = tmp_path / f"tiny-{attempt}.toml"
        printed, stderr = profile_node(node.address, path)
        prof = load_profile(path)
        reference, *measured = held_out_run(node.address, measure.limits_of(node.status()))
        before = min(
            (d for d in prof.curves.decode if d.running == REFERENCE[0]),
            key=lambda d: d.context_tokens,
        )
        attempts.append((reference.step_s / before.step_s - 1, path, printed, stderr, measured))
        if abs(attempts[-1][0]) <= DRIFT:
            break
    drift, path, printed, stderr, measured = min(attempts, key=lambda a: abs(a[0]))
    prof = load_profile(path)
    st = node.status()
    assert prof.info.provenance == MEASURED and prof.info.created.endswith("Z")
    assert (
        prof.info.sources[0].startswith("fleetctl profile --node")
        and node.address in prof.info.sources[0]
    )
    assert (prof.model.id, prof.model.digest) == (st.model.model_id, st.model.weights_digest)
    assert (
        prof.node.chip == st.chip and prof.model.params_b == round(st.model.parameters / 1e9, 6) > 0
    )
    assert (prof.node.node_id, prof.node.engine, prof.limits.max_running) == (
        "shared-node",
        "mlx",
        32,
    )
    assert prof.limits.max_context_tokens == st.model.context_length
    assert 0 < prof.memory.weights_gb <= prof.memory.peak_gb and prof.node.memory_gb > 0
    assert printed == prof.to_dict()  # -o json prints the file's content
    assert f"profile written to {path}" in stderr
    # The curves hold what was measured: prefill grows with the uncached part, a cached prefix saves time.
    fresh = sorted(
        (p for p in prof.curves.prefill if p.cached_tokens < p.prompt_tokens // 10),
        key=lambda p: p.prompt_tokens,
    )
    cached = [p for p in prof.curves.prefill if p.cached_tokens > p.prompt_tokens // 2]
    assert len(fresh) >= 3 and fresh[-1].seconds > fresh[0].seconds and cached
    longest = max(cached, key=lambda p: p.prompt_tokens)
    assert longest.seconds < next(
        p.seconds for p in reversed(fresh) if p.prompt_tokens <= longest.prompt_tokens * 1.1
    )
    assert {d.running for d in prof.curves.decode} >= {1, 2, 4, 8, 16}
    assert [t.concurrency for t in prof.curves.ttft] == [1, 8, 16]
    assert prof.fit.decode_base_s > 0 and prof.fit.prefill_per_token_s > 0

    def predicted(n: int, c: int) -> float:
        return prof.fit.decode_step_s(n, c) * (1 + drift)

    errors = {
        (p.running, p.context_tokens): (predicted(p.running, p.context_tokens) - p.step_s)
        / p.step_s
        for p in measured
    }
    report = ", ".join(
        f"{n} running at {c} context: measured {p.step_s * 1000:.2f} ms, predicted "
        f"{predicted(n, c) * 1000:.2f} ms ({e:+.1%})"
        for p, ((n, c), e) in zip(measured, errors.items(), strict=True)
    )
    report += (
        f"; drift {drift:+.1%} (of {', '.join(f'{a[0]:+.1%}' for a in attempts)}); "
        f"fit {prof.fit}; the profile's points: "
    ) + ", ".join(
        f"{d.running}/{d.context_tokens}: {d.step_s * 1000:.2f} ms" for d in prof.curves.decode
    )
    # A drift this large means the machine's speed changed within the runs themselves.
    assert abs(drift) <= MAX_DRIFT, report
    assert all(abs(e) <= TOLERANCE for e in errors.values()), report


def test_profile_refuses_bad_input_and_names_the_target(tmp_path):
    bad = fleetctl("profile", "--target", "nohost", "--plaintext")
    assert bad.returncode == 2 and "--target" in bad.stderr and "HOST:PORT" in bad.stderr
    zero = fleetctl("profile", *AT_NODE, "--target", "127.0.0.1:0")
    assert zero.returncode == 2 and "--target" in zero.stderr
    out = fleetctl(
        "profile", *AT_NODE, "--target", "127.0.0.1:9", "--out", str(tmp_path / "no" / "p.toml")
    )
    assert out.returncode == 2 and "--out" in out.stderr and str(tmp_path / "no") in out.stderr
    reps = fleetctl("profile", *AT_NODE, "--target", "127.0.0.1:9", "--repeats", "0")
    assert reps.returncode == 2 and "--repeats" in reps.stderr
    hot = fleetctl("profile", *AT_NODE, "--target", "127.0.0.1:9", "--temperature", "3")
    assert hot.returncode == 2 and "--temperature must be 0 to 2" in hot.stderr
    gone = fleetctl(
        "profile", *AT_NODE, "--target", "127.0.0.1:9", timeout=60
    )  # discard port: nothing listens
    assert gone.returncode == 3, gone.stderr
    assert (
        "127.0.0.1:9" in gone.stderr
        and "no node agent answers" in gone.stderr
        and "check the address" in gone.stderr
    )
    assert not list(tmp_path.iterdir())


def test_profile_through_a_coordinator_of_two_nodes_is_refused(node, start_node, tmp_path):
    other = start_node("--max-running", "4", node_id="second-node")
    with CoordinatorProcess(nodes=[node.address, other.address], name="profile-co2") as co:
        co.start(tmp_path / "logs")
        co.wait_serving()
        co.wait_routable(2)
        res = fleetctl(
            "profile",
            "--target",
            co.address,
            "--tls-name",
            HARNESS_APP,
            "--operator-tls-name",
            HARNESS_OPERATOR,
            "--out",
            str(tmp_path / "p.toml"),
        )
        assert res.returncode == 2, res.stderr
        assert (
            "routes to 2 nodes" in res.stderr
            and "shared-node" in res.stderr
            and "second-node" in res.stderr
        )
        assert "--node" in res.stderr and not (tmp_path / "p.toml").exists()
        as_node = fleetctl("profile", *AT_NODE, "--target", co.address)
        assert as_node.returncode == 2 and "not a node agent" in as_node.stderr
        no_operator = fleetctl("profile", "--target", co.address, "--tls-name", HARNESS_APP)
        assert no_operator.returncode == 2 and "--operator-tls-name" in no_operator.stderr
    assert other.status().load.requests_accepted_total == 0  # nothing was measured on either node


def test_profile_through_a_coordinator_of_one_node(node, tmp_path):
    with serving_coordinator(node, tmp_path / "logs", "profile-co") as co:
        out = tmp_path / "via-co.toml"
        res = fleetctl(
            "profile",
            "--target",
            co.address,
            "--tls-name",
            HARNESS_APP,
            "--operator-tls-name",
            HARNESS_OPERATOR,
            "--quick",
            "--repeats",
            "1",
            "--out",
            str(out),
        )
        assert res.returncode == 0, res.stderr
    prof = load_profile(out)
    assert prof.node.node_id == "shared-node" and "through the coordinator" in prof.info.notes
    assert "sampling: temperature 0.7, seeded" in prof.info.notes  # the notes' sampling
    assert "decode step" in res.stdout and "ms per extra sequence" in res.stdout
    assert prof.fit.decode_base_s > 0
