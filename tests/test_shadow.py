"""Shadow evaluation (docs/shadow.md): a real coordinator, a live node and a candidate node
serving another model id (other weights). Copies of live requests run on the candidate; the
caller gets only the live output; only scores and timings are kept, and a PHI canary in
every prompt appears in no log, request log, audit record or metric."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import grpc
import pytest

from cluster.api import shadow_pb2, shadow_pb2_grpc
from cluster.client import build_request
from cluster.security.identity import Role
from coordinator.gates import GateContext, ShadowGate
from coordinator.shadow import Shadow, ShadowConfig, ShadowRefused, remote_unsafe
from coordinator.shadow_report import Outcome
from tests.fleet_helpers import collect
from tests.procs import CoordinatorProcess, NodeProcess
from tests.test_fleetctl import fleetctl

CANARY = "Quillon Marchbanks MRN ZX-90210 DOB 1907-13-01"  # synthetic; must appear nowhere
LIVE, CANDIDATE = "notes-live", "notes-candidate"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-other", TinyModelSpec(seed=7))


@pytest.fixture(scope="module")
def fleet(tiny_model, other_model, tmp_path_factory):
    """A live node, a candidate node on other weights, and a coordinator whose rollouts take
    a shadow run's verdict as evidence."""
    logs = tmp_path_factory.mktemp("shadow-logs")
    live = NodeProcess(tiny_model, "--model-id", LIVE, node_id="shadow-live")
    cand = NodeProcess(other_model, "--model-id", CANDIDATE, node_id="shadow-cand")
    co = None
    try:
        for n in (live, cand):
            n.start(logs)
        for n in (live, cand):
            n.wait_serving()
        co = CoordinatorProcess(
            "--rollout-shadow-gate", nodes=[live.address, cand.address], name="shadow-co"
        )
        co.start(logs)
        co.wait_serving()
        co.wait_routable(2)
        yield co, live, cand, logs
    finally:
        for p in (co, live, cand):
            if p is not None:
                p.stop()


def _stub(co, name="operator", role=Role.OPERATOR):
    return shadow_pb2_grpc.ShadowStub(co.dial(name, role))


def _wait(co, predicate, what: str, timeout_s: float = 60.0) -> shadow_pb2.ShadowReport:
    stub, deadline = _stub(co), time.monotonic() + timeout_s
    while True:
        r = stub.GetShadow(shadow_pb2.GetShadowRequest(), timeout=10)
        if predicate(r):
            return r
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s}s: {r}"
        time.sleep(0.05)


def _ctl(co, *args):
    return fleetctl(*args, "-c", co.address, "--tls-name", "operator")


def note(i: int, request_id: str = ""):
    return build_request(
        template="soap-brief",
        variables={"transcript": f"Patient {CANARY}: dry cough for {i} days, no fever."},
        max_tokens=40,
        temperature=0.0,
        seed=11,
        request_id=request_id or f"shadow-note-{i}",
    )


def test_every_live_request_is_copied_and_only_the_live_output_reaches_the_caller(fleet):
    co, live, cand, logs = fleet
    before = collect(co.inference, _model(note(100), LIVE))  # shadow off: the reference output
    assert before.final is not None
    out = _ctl(
        co, "shadow", "start", "--model", CANDIDATE, "--fraction", "1.0", "--max-in-flight", "16"
    )
    assert out.returncode == 0, out.stderr
    assert "candidate notes-candidate" in out.stdout
    n = 6
    results = [collect(co.inference, _model(note(i), LIVE)) for i in range(n)]
    same = collect(co.inference, _model(note(100, request_id="shadow-note-100b"), LIVE))
    for s in results + [same]:
        assert s.error is None and s.final is not None
        assert s.final.model.model_id == LIVE and list(s.final.nodes) == ["shadow-live"]
    assert same.ids == before.ids and same.text == before.text  # nothing of the copy mixed in
    r = _wait(co, lambda r: r.sent == n + 1 and r.in_flight == 0, "every copy ended")
    assert (r.eligible, r.sampled, r.dropped_busy, r.dropped_no_node) == (n + 1, n + 1, 0, 0)
    (row,) = r.by_template
    assert row.template == "soap-brief"
    assert row.candidate.completed == n + 1 and row.candidate.scored == n + 1
    assert row.live.scored == n + 1
    assert row.candidate.models == [CANDIDATE] and row.live.models == [LIVE]
    assert row.candidate.digests != row.live.digests
    assert 0 < row.candidate.score <= 1 and 0 < row.live.score <= 1
    assert set(row.candidate.parts) >= {"schema_valid", "sections", "not_truncated"}
    assert row.candidate.latency_p50_ms > 0 and row.live.latency_p50_ms > 0
    assert row.verdict == "insufficient"  # 7 samples, under the default 20
    # /metrics and the dashboard: counts by fixed labels, never the candidate or a prompt.
    series = _series(co)
    assert series['studiofleet_shadow_copies_total{outcome="completed"}'] == n + 1
    assert series['studiofleet_shadow_copies_total{outcome="failed"}'] == 0
    assert series['studiofleet_shadow_dropped_total{reason="busy"}'] == 0
    assert series["studiofleet_shadow_active"] == 1 and series["studiofleet_shadow_in_flight"] == 0
    assert not [k for k in series if k.startswith("studiofleet_shadow") and CANDIDATE in k]
    status, body, _ = co.http_get("/api/snapshot")
    card = json.loads(body)["shadow"]
    assert status == 200 and card["id"] == r.shadow_id and card["active"] is True
    assert (card["model"], card["fraction"], card["sent"], card["dropped"]) == (
        CANDIDATE, 1.0, n + 1, 0
    )  # fmt: skip
    assert card["verdict"] == "insufficient" and card["since"] == r.started_unix_s
    assert cand.status().load.requests_completed_total >= n + 1
    # The report as an operator reads it.
    table = _ctl(co, "shadow", "report")
    assert table.returncode == 0, table.stderr
    assert "soap-brief" in table.stdout and "schema-valid" in table.stdout
    assert "latency p95 ms" in table.stdout and "verdict: insufficient" in table.stdout
    assert _ctl(co, "shadow", "report", "--check").returncode == 1
    top = _ctl(co, "top", "--once")
    assert top.returncode == 0, top.stderr
    assert f"shadow {r.shadow_id}: 1 of requests to {CANDIDATE}, {n + 1} copied" in top.stdout
    stopped = _ctl(co, "shadow", "stop", "-o", "json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["active"] is False
    assert _series(co)["studiofleet_shadow_active"] == 0
    again = _ctl(co, "shadow", "stop")
    assert again.returncode == 2 and "no shadow run is active" in again.stderr
    # Counted apart from callers' requests: the request log and metrics saw n + 2 requests.
    ids = {f"shadow-note-{i}" for i in range(n)} | {"shadow-note-100", "shadow-note-100b"}
    deadline = time.monotonic() + 30
    while True:  # the request log writes its rows in the background
        listed = _ctl(co, "requests", "-o", "json", "--since", "1h")
        assert listed.returncode == 0, listed.stderr
        seen = {row["request_id"] for row in json.loads(listed.stdout)["requests"]}
        if seen >= ids or time.monotonic() > deadline:
            break
    assert seen == ids
    _, metrics, _ = co.http_get("/metrics")
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.decode().splitlines()
        if line.startswith("studiofleet_requests_total{")
    )
    assert total == n + 2, "shadow copies are not callers' requests"
    assert CANARY not in metrics.decode()


def _series(co) -> dict[str, float]:
    _, body, _ = co.http_get("/metrics")
    return {
        k: float(v)
        for k, v in (
            line.rsplit(" ", 1) for line in body.decode().splitlines() if line[:1] not in "#"
        )
    }


def _model(req, model: str):
    req.model = model
    return req


def test_the_fraction_samples_about_that_share_and_copies_never_queue(fleet):
    co, *_ = fleet
    stub = _stub(co)
    stub.StartShadow(
        shadow_pb2.StartShadowRequest(model=CANDIDATE, fraction=0.25, max_in_flight=64),
        timeout=10,
    )
    n = 80
    for i in range(n):
        req = build_request(prompt=f"{CANARY} {i}", max_tokens=2, request_id=f"frac-{i}")
        assert collect(co.inference, _model(req, LIVE)).final is not None
    r = _wait(co, lambda r: r.in_flight == 0, "copies done")
    assert r.eligible == n
    assert 6 <= r.sampled <= 34, r.sampled  # binomial(80, 0.25): mean 20, sd 3.9
    assert r.sent + r.dropped_busy == r.sampled
    (row,) = r.by_template
    assert row.template == "" and row.candidate.scored == 0  # no output format: timings only
    assert "no quality scores" in row.reason
    # One copy at a time: with 8 streams at once, the others are dropped (never queued).
    stub.StartShadow(
        shadow_pb2.StartShadowRequest(model=CANDIDATE, fraction=1.0, max_in_flight=1), timeout=10
    )
    from tests.fleet_helpers import in_threads

    reqs = [
        _model(build_request(prompt="x", max_tokens=200, request_id=f"busy-{i}"), LIVE)
        for i in range(8)
    ]
    for r in reqs:
        r.sampling.ignore_eos = True
    results, threads = in_threads(lambda r: collect(co.inference, r), reqs)
    for t in threads:
        t.join(60)
    assert all(s.final is not None for s in results)
    r = _wait(co, lambda r: r.in_flight == 0, "copies done")
    assert r.sampled == 8 and r.sent >= 1 and r.dropped_busy >= 1 and r.sent + r.dropped_busy == 8
    stub.StopShadow(shadow_pb2.StopShadowRequest(), timeout=10)


def test_stop_cancels_copies_under_way(fleet):
    co, *_ = fleet
    stub = _stub(co)
    stub.StartShadow(
        shadow_pb2.StartShadowRequest(model=CANDIDATE, fraction=1.0, timeout_s=120), timeout=10
    )
    live_req = _model(build_request(prompt="long", max_tokens=1500, request_id="long-1"), LIVE)
    live_req.sampling.ignore_eos = True  # its copy runs for seconds, whatever the weights say
    call = co.inference.Generate(live_req, timeout=60)
    next(iter(call))  # the live stream has started: its copy is under way
    _wait(co, lambda r: r.in_flight == 1, "the copy under way", timeout_s=10)
    stopped = stub.StopShadow(shadow_pb2.StopShadowRequest(), timeout=10)
    assert not stopped.active and stopped.in_flight == 0
    call.cancel()
    r = stub.GetShadow(shadow_pb2.GetShadowRequest(), timeout=10)
    assert r.by_template[0].candidate.failed == 1  # the cancelled copy, counted and recorded


def test_bad_input_is_refused_naming_the_flag(fleet):
    co, *_ = fleet
    for args, flag in (
        (["--model", CANDIDATE, "--fraction", "0"], "--fraction"),
        (["--model", CANDIDATE, "--fraction", "1.5"], "--fraction"),
        (["--model", CANDIDATE, "--fraction", "0.1", "--template", "haiku"], "--template"),
        (["--fraction", "0.1"], "--model"),
        (["--model", "no-such-model", "--fraction", "0.1"], "model"),
    ):
        out = _ctl(co, "shadow", "start", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert flag in out.stderr, (args, out.stderr)
    with pytest.raises(grpc.RpcError) as err:  # the coordinator checks too
        _stub(co).StartShadow(
            shadow_pb2.StartShadowRequest(model=CANDIDATE, fraction=2.0), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fraction" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # an app is not an operator
        _stub(co, "shadow-app", Role.APP).GetShadow(shadow_pb2.GetShadowRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_config_checks_and_a_remote_node_without_phi_allowed_gets_no_copy():
    with pytest.raises(ShadowRefused) as err:
        ShadowConfig.of(shadow_pb2.StartShadowRequest(model="m", fraction=0.5, templates=["x"]))
    assert err.value.field == "template"
    c = ShadowConfig.of(shadow_pb2.StartShadowRequest(model="m@v2", fraction=0.5))
    assert (c.margin, c.min_samples, c.max_in_flight) == (0.05, 20, 2)

    class Entry:
        def __init__(self, engine, phi):
            from cluster.api import common_pb2, node_pb2

            self.status = node_pb2.NodeStatus(
                model=common_pb2.ModelInfo(engine=engine), phi_allowed=phi
            )

    assert remote_unsafe(Entry("upstream", False))
    assert not remote_unsafe(Entry("upstream", True)) and not remote_unsafe(Entry("mlx", False))
    # A start is refused when every node serving the candidate is such a remote endpoint.
    from coordinator.shadow_admin import ShadowAdmin

    class Fleet:
        def __init__(self, *entries):
            self.entries = entries

        def routable(self):
            return list(self.entries)

    def entry(node_id, engine, phi):
        e = Entry(engine, phi)
        e.node_id, e.model_id = node_id, CANDIDATE
        e.status.model.model_id = CANDIDATE
        return e

    def refusal(*entries):
        admin = ShadowAdmin(shadow=None, fleet=Fleet(*entries), identify=None, audit=None)
        return admin._unservable(CANDIDATE)

    why = refusal(entry("api-1", "upstream", False))
    assert "api-1" in why and "--phi-allowed" in why
    assert refusal(entry("api-1", "upstream", True)) == ""
    assert refusal(entry("api-1", "upstream", False), entry("mac-1", "mlx", False)) == ""
    assert "no READY node serves" in refusal()


def _shadow_with(digest: str, cand_score: float, n: int) -> Shadow:
    """A Shadow whose run holds `n` scored outcomes per side (the report's arithmetic)."""

    class Audit:
        failing = ""

    s = Shadow(fleet=None, admission=None, audit=Audit(), coordinator_id="c")
    asyncio.run(s.start(ShadowConfig(model=CANDIDATE, fraction=1.0, min_samples=5), "op"))
    pair = s.run.pair("soap-brief")
    for _ in range(n):
        pair.live.add(Outcome(True, 100.0, 10.0, 0.8, True, (("sections", 1.0),), LIVE, "sha256:a"))
        pair.candidate.add(
            Outcome(True, 90.0, 9.0, cand_score, True, (("sections", 1.0),), CANDIDATE, digest)
        )
    return s


def test_the_rollout_gate_takes_a_shadow_report_as_evidence():
    ctx = GateContext("r1", "node-1", "127.0.0.1:1", None, "sha256:b")
    gate = lambda s: asyncio.run(ShadowGate(s).check(ctx))  # noqa: E731
    assert gate(_shadow_with("sha256:b", 0.79, 5)) is None  # within the margin: passes
    assert "fail" in gate(_shadow_with("sha256:b", 0.5, 5))  # under it: the node rolls back
    assert "insufficient" in gate(_shadow_with("sha256:b", 0.8, 3))
    assert "not exactly sha256:b" in gate(_shadow_with("sha256:c", 0.8, 5))
    none = Shadow(fleet=None, admission=None, audit=None, coordinator_id="c")
    assert "no shadow run" in gate(none)
    from cluster.config import RolloutSection
    from coordinator.gates import default_gates

    names = [g.name for g in default_gates(RolloutSection(rollout_shadow_gate=True), shadow=none)]
    assert names == ["smoke", "shadow"]


def test_a_rollout_takes_the_shadow_verdict_as_its_evidence(fleet, other_model):
    """The live node rolls to the candidate's weights only once a shadow run passed on them."""
    from cluster.api import fleet_pb2
    from cluster.digest import weights_digest
    from tests.test_rollout import fleetctl as fleetctl_in_process
    from tests.test_rollout import rollout

    co, live, _, _ = fleet
    old, new = live.status().model.weights_digest, weights_digest(other_model)
    stub = _stub(co)

    def shadow(min_samples: int, first: int) -> None:
        stub.StartShadow(
            shadow_pb2.StartShadowRequest(
                model=CANDIDATE,
                fraction=1.0,
                min_samples=min_samples,
                margin=1.0,
                max_in_flight=16,
            ),
            timeout=10,
        )
        for i in range(first, first + 3):
            assert collect(co.inference, _model(note(i), LIVE)).final is not None
        _wait(co, lambda r: r.in_flight == 0 and r.sent == 3, "copies done")

    def roll(rollout_id: str):
        return fleetctl_in_process(
            co, "rollout", "start", "--model", str(other_model), "--node", "shadow-live",
            "--rollout-id", rollout_id, "--wait",
        )  # fmt: skip

    shadow(min_samples=50, first=200)  # 3 samples: insufficient
    out = roll("r-shadow-short")
    assert out.exit_code == 7, out.output
    why = rollout(co, "r-shadow-short").nodes[0].message
    assert "shadow gate: shadow run" in why and "insufficient" in why, why
    assert live.status().model.weights_digest == old  # rolled back
    shadow(min_samples=3, first=300)
    assert stub.GetShadow(shadow_pb2.GetShadowRequest(), timeout=10).verdict == "pass"
    out = roll("r-shadow-pass")
    assert out.exit_code == 0, out.output
    assert rollout(co, "r-shadow-pass").state == fleet_pb2.ROLLOUT_STATE_SUCCEEDED
    assert live.status().model.weights_digest == new


def test_a_run_outlives_a_restart_and_reaches_the_pair_on_the_same_state_database(
    fleet, tmp_path, start_coordinator
):
    """The run's definition and its outcomes are in the state database: the other coordinator
    of a pair takes the run up and copies its own traffic, each reports the pooled scores (its
    request counts its own), a restarted coordinator resumes the run with every score so far,
    and a stop through either reaches both."""
    _, live, cand, _ = fleet
    db = str(tmp_path / "pair.db")
    nodes = [live.address, cand.address]
    a = start_coordinator("--state-db", db, nodes=nodes, name="shadow-pair-a")
    b = start_coordinator("--state-db", db, nodes=nodes, name="shadow-pair-b")
    for co in (a, b):
        co.wait_routable(2)
    out = _ctl(a, "shadow", "start", "--model", CANDIDATE, "--fraction", "1", "--margin", "0.2",
               "--template", "soap-brief", "--max-in-flight", "16")  # fmt: skip
    assert out.returncode == 0, out.stderr
    started = _stub(a).GetShadow(shadow_pb2.GetShadowRequest(), timeout=10)
    assert started.figures_since_unix_s == started.started_unix_s and started.figures_pooled
    on_b = _wait(b, lambda r: r.shadow_id == started.shadow_id, "pair-b took the run up", 10)
    assert on_b.active and (on_b.model, on_b.fraction, on_b.margin) == (CANDIDATE, 1.0, 0.2)
    assert list(on_b.templates) == ["soap-brief"] and on_b.max_in_flight == 16
    assert (on_b.started_by, on_b.started_unix_s) == ("operator", started.started_unix_s)
    assert on_b.figures_since_unix_s == on_b.started_unix_s and on_b.figures_pooled
    for i in range(2):
        assert collect(b.inference, _model(note(400 + i), LIVE)).final is not None
    r = _wait(b, lambda r: r.sent == 2 and r.in_flight == 0, "pair-b's copies done")
    assert r.by_template[0].candidate.scored == 2
    # pair-a relayed none of them: its counts are its own, the scores are pooled.
    on_a = _wait(a, lambda r: r.by_template and r.by_template[0].live.scored == 2
                 and r.by_template[0].candidate.scored == 2, "pair-b's scores on pair-a", 10)  # fmt: skip
    assert (
        on_a.sent == 0
        and on_a.by_template[0].candidate.digests == r.by_template[0].candidate.digests
    )

    a.stop()  # SIGTERM: its copies end, the run stays active in the database
    a2 = start_coordinator("--state-db", db, nodes=nodes, name="shadow-pair-a2")
    resumed = _wait(a2, lambda r: r.by_template and r.by_template[0].candidate.scored == 2,
                    "the restarted coordinator reads the scores so far", 10)  # fmt: skip
    assert resumed.shadow_id == started.shadow_id and resumed.active
    assert resumed.started_unix_s == started.started_unix_s
    assert resumed.figures_since_unix_s == started.started_unix_s and resumed.sent == 0
    shown = _ctl(a2, "shadow", "show")
    assert shown.returncode == 0 and "every coordinator's" in shown.stdout, shown.stdout
    a2.wait_routable(2)
    assert collect(a2.inference, _model(note(410), LIVE)).final is not None
    _wait(a2, lambda r: r.sent == 1 and r.in_flight == 0, "the resumed run copies")
    _wait(b, lambda r: r.by_template[0].candidate.scored == 3, "a2's score on pair-b", 10)

    assert _ctl(b, "shadow", "stop").returncode == 0
    gone = _wait(a2, lambda r: not r.active, "the stop through pair-b reached a2", 10)
    assert gone.shadow_id == started.shadow_id and gone.stopped_unix_s > 0
    assert gone.by_template[0].candidate.scored == 3  # nothing counted twice


def test_a_start_the_state_database_does_not_take_changes_nothing():
    class Audit:
        failing = ""

    class Broken:
        def started(self, row):
            raise OSError("disk I/O error")

        def stopped(self, run_id, at):
            raise OSError("disk I/O error")

    s = Shadow(fleet=None, admission=None, audit=Audit(), coordinator_id="c")
    first = asyncio.run(s.start(ShadowConfig(model=CANDIDATE, fraction=0.5), "op"))
    s.store = Broken()
    with pytest.raises(OSError):
        asyncio.run(s.start(ShadowConfig(model="other", fraction=1.0), "op"))
    assert s.run is first and first.active
    with pytest.raises(OSError):
        asyncio.run(s.stop())
    assert s.run is first and first.active


def test_outcomes_wait_while_the_state_database_is_away_and_are_written_once(tmp_path):
    """Two coordinators' Shadows on one real SQLite state database: each reads the other's
    outcomes into its report; while the database refuses writes, one keeps its outcomes (its
    report still has them) and writes each exactly once when the database is back."""
    from coordinator.shadow_store import ShadowStore

    class Audit:
        failing = ""

    db = f"sqlite:///{tmp_path / 'state.db'}"
    a, b = (Shadow(fleet=None, admission=None, audit=Audit(), coordinator_id=n) for n in "ab")
    a.store, b.store = ShadowStore(db), ShadowStore(db)
    asyncio.run(a.start(ShadowConfig(model=CANDIDATE, fraction=1.0, min_samples=1), "op"))
    asyncio.run(b.sync())
    scored = Outcome(True, 100.0, 10.0, 0.8, True, (("sections", 1.0),), LIVE, "sha256:a")
    a._record(a.run, "soap-brief", "live", scored)
    asyncio.run(a._exchange())
    asyncio.run(b._exchange())
    assert b.report().by_template[0].live.scored == 1

    real = b.store.add_outcomes

    def away(instance, rows):
        raise OSError("database is locked")

    b.store.add_outcomes = away
    b._record(b.run, "soap-brief", "candidate", scored)
    b._record(b.run, "soap-brief", "candidate", scored)
    asyncio.run(b._sync_logged())  # logged, not raised; kept
    assert len(b._pending) == 2 and b.report().by_template[0].candidate.scored == 2
    asyncio.run(a._exchange())
    assert not a.report().by_template[0].candidate.scored
    b.store.add_outcomes = real
    for _ in range(2):
        asyncio.run(b._sync_logged())
        asyncio.run(a._exchange())
    assert not b._pending
    assert a.report().by_template[0].candidate.scored == 2
    assert b.report().by_template[0].candidate.scored == 2  # its own, not read back again
    assert len(a.store.outcomes(a.run.id)) == 3
    a.store.close()
    b.store.close()


def test_afterwards_each_request_ended_once_and_the_canary_appears_nowhere(fleet):
    """Runs last: stops the fleet, then reads everything it wrote."""
    co, live, cand, logs = fleet
    _, metrics, _ = co.http_get("/metrics")
    report = _ctl(co, "shadow", "report", "-o", "json")
    assert report.returncode == 0, report.stderr
    # A copy under way when the coordinator shuts down is cancelled and recorded, not leaked.
    _stub(co).StartShadow(
        shadow_pb2.StartShadowRequest(model=CANDIDATE, fraction=1.0, timeout_s=120), timeout=10
    )
    last = _model(build_request(prompt="long", max_tokens=1500, request_id="long-2"), LIVE)
    last.sampling.ignore_eos = True
    call = co.inference.Generate(last, timeout=60)
    next(iter(call))
    call.cancel()  # the caller leaves; its copy goes on until the coordinator stops it
    _wait(co, lambda r: r.in_flight == 1, "the copy under way", timeout_s=10)
    co.signal(signal.SIGTERM)
    assert co.wait_exit(30) == 0
    assert "Task was destroyed" not in co.stderr() and "never retrieved" not in co.stderr()
    co.stop()
    live.stop()
    cand.stop()
    query = fleetctl("audit", "query", str(co.audit_dir), "-o", "json")
    assert query.returncode == 0, query.stderr
    records = [json.loads(line) for line in query.stdout.splitlines() if line.strip()]
    ends: dict[str, int] = {}
    for x in records:
        if x.get("type") == "request" and x.get("outcome") not in ("accepted", "denied"):
            ends[x["request_id"]] = ends.get(x["request_id"], 0) + 1
    assert ends and set(ends.values()) == {1}, "every request ends in exactly one record"
    copies = [x for x in records if x.get("type") == "shadow"]
    assert len(copies) >= 8 and all(x["request_id"] in ends for x in copies)
    assert {x["outcome"] for x in copies} >= {"completed", "cancelled"}
    assert [x["outcome"] for x in copies if x["request_id"] == "long-2"] == ["cancelled"]
    assert all("quality_score" in x for x in copies if x["template"] == "soap-brief")
    assert {x["action"] for x in records if x.get("type") == "admin"} >= {
        "shadow.start",
        "shadow.stop",
        "shadow.get",
    }
    verify = fleetctl("audit", "verify", str(co.audit_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    haystack = {str(p): p.read_bytes() for p in logs.rglob("*") if p.is_file()}
    assert any(k.endswith(".db") for k in haystack) and any("audit" in k for k in haystack)
    haystack.update(metrics=metrics, report=report.stdout.encode(), audit=query.stdout.encode())
    for where, blob in haystack.items():
        for needle in (CANARY, "Marchbanks", "ZX-90210"):
            assert needle.encode() not in blob, f"{needle!r} found in {where}"
