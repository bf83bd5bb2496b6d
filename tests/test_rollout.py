"""Rolling updates through a real coordinator over three real node agents (loopback,
separate processes, mTLS): under load, with failures, and across a coordinator crash."""

from __future__ import annotations

import sys
import threading
import time

import grpc
import pytest
from typer.testing import CliRunner

from cluster.api import common_pb2, fleet_pb2, fleet_pb2_grpc
from cluster.digest import weights_digest
from cluster.fleetctl.app import app
from tests.fleet_helpers import EventWatch, collect, note

K = fleet_pb2
NODES = ("roll-a", "roll-b", "roll-c")


@pytest.fixture(scope="module")
def new_model(tmp_path_factory):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2-v2", TinyModelSpec(seed=7)
    )


@pytest.fixture
def three_nodes(start_node):
    return [start_node(node_id=n, wait=False) for n in NODES]


def fleet_with(start_coordinator, nodes, *args):
    for n in nodes:
        n.wait_serving()
    co = start_coordinator(*args, nodes=[n.address for n in nodes])
    co.wait_routable(len(nodes))
    return co


def fleetctl(co, *args: str):
    """fleetctl in-process, as the harness's operator."""
    return CliRunner().invoke(app, [*args, "--coordinator", co.address, "--tls-name", "operator"])


def rollout(co, rollout_id: str = "") -> fleet_pb2.Rollout:
    return fleet_pb2_grpc.FleetStub(co.channel).GetRollout(
        fleet_pb2.GetRolloutRequest(rollout_id=rollout_id), timeout=5
    )


def wait_rollout(co, rollout_id: str, timeout_s: float = 180.0) -> fleet_pb2.Rollout:
    """Follow the event stream until the rollout's terminal event, then read the rollout."""
    watch = EventWatch(co)
    try:
        watch.wait_until(
            lambda e: (
                e.kind == K.EVENT_KIND_ROLLOUT
                and e.rollout_id == rollout_id
                and e.step in ("succeeded", "failed", "abort")
            ),
            timeout_s,
            f"end of rollout {rollout_id}",
        )
    finally:
        watch.close()
    return rollout(co, rollout_id)


class Load:
    """Callers sending notes through the coordinator in a loop, and a sampler of how many
    nodes are routable, until stopped."""

    def __init__(self, co, callers: int = 4):
        self.co = co
        self.stop = threading.Event()
        self.results = []
        self._served = threading.Condition()
        self.min_routable = 99
        self._threads = [
            threading.Thread(target=self._call, args=(i,), daemon=True) for i in range(callers)
        ]
        self._threads.append(threading.Thread(target=self._sample, daemon=True))
        for t in self._threads:
            t.start()

    def _call(self, caller: int) -> None:
        i = 0
        while not self.stop.is_set():
            s = collect(
                self.co.inference,
                note(1000 * caller + i, 24, request_id=f"load-{caller}-{i}"),
                timeout_s=60,
            )
            with self._served:
                self.results.append(s)
                self._served.notify_all()
            i += 1

    def wait_served(self, count: int, timeout_s: float = 60.0) -> None:
        """Until `count` requests have ended: traffic is flowing before the test acts."""
        with self._served:
            assert self._served.wait_for(lambda: len(self.results) >= count, timeout=timeout_s), (
                f"only {len(self.results)} of {count} requests ended in {timeout_s}s"
            )

    def _sample(self) -> None:
        channel = self.co.dial()
        stub = fleet_pb2_grpc.FleetStub(channel)
        while not self.stop.is_set():
            listing = stub.ListNodes(fleet_pb2.ListNodesRequest(), timeout=5)
            self.min_routable = min(self.min_routable, sum(n.routable for n in listing.nodes))
            time.sleep(0.02)
        channel.close()

    def finish(self) -> list:
        self.stop.set()
        for t in self._threads:
            t.join(90)
        return self.results


def test_rolling_update_under_load_fails_no_request(three_nodes, start_coordinator, new_model):
    co = fleet_with(start_coordinator, three_nodes)
    new = weights_digest(new_model)
    load = Load(co)
    load.wait_served(8)  # traffic is flowing before the rollout starts
    out = fleetctl(
        co,
        "rollout",
        "start",
        "--model",
        str(new_model),
        "--version",
        "v2",
        "--rollout-id",
        "r-load",
        "--wait",
    )
    results = load.finish()
    assert out.exit_code == 0, out.output
    failed = [
        (s.request.request_id, s.error.code().name, s.error.details()) for s in results if s.error
    ]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
    assert len(results) > 20
    assert load.min_routable >= len(NODES) - 1, (
        f"only {load.min_routable} nodes were serving at one point"
    )
    print(f"rolling update: {len(results)} requests, 0 failed, least routable {load.min_routable}")
    r = rollout(co, "r-load")
    assert r.state == K.ROLLOUT_STATE_SUCCEEDED and [n.step for n in r.nodes] == ["done"] * 3
    for n in three_nodes:
        st = n.status()
        assert st.model.weights_digest == new and st.model.version == "v2" and not st.cordoned
    steps = [(e.node_id, e.step) for e in _history(co) if e.kind == K.EVENT_KIND_ROLLOUT]
    for node in NODES:
        seen = [s for n, s in steps if n == node]
        assert seen[:1] == ["stage"] and seen[-1] == "done", seen
        assert {"stage", "drain", "activate", "gate", "done"} <= set(seen), seen
    status = fleetctl(co, "rollout", "status", "r-load")
    assert status.exit_code == 0 and "succeeded (3/3 nodes done)" in status.output
    audited = _audited(co, "rollout.node", 3)
    assert {(a["node_id"], a["outcome"], a["to_digest"]) for a in audited} == {
        (n, "done", new) for n in NODES
    }
    assert all(a["caller"] == "operator" for a in audited + _audited(co, "rollout.start", 1))


def _audited(co, action: str, count: int, timeout_s: float = 10.0) -> list[dict]:
    """The audit records of `action` once `count` are on disk (records go in group commits)."""
    from cluster.audit.query import query

    deadline = time.monotonic() + timeout_s
    while len(found := list(query(co.audit_dir, action=action))) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} {action} audit records"
        time.sleep(0.05)
    return found


def _history(co) -> list:
    channel = co.dial()
    try:
        call = fleet_pb2_grpc.FleetStub(channel).WatchEvents(
            fleet_pb2.WatchEventsRequest(replay=True), timeout=1
        )
        events = []
        try:
            for e in call:
                events.append(e)
        except grpc.RpcError:
            pass
        return events
    finally:
        channel.close()


def test_a_bad_digest_or_a_failed_gate_stops_the_rollout_and_puts_the_node_back(
    three_nodes, start_coordinator, new_model, tiny_model
):
    fail_b = f"{sys.executable} -c \"import os, sys; sys.exit(3 if os.environ['NODE_ID'] == 'roll-b' else 0)\""
    co = fleet_with(start_coordinator, three_nodes, "--rollout-gate-command", fail_b)
    old, new = weights_digest(tiny_model), weights_digest(new_model)

    out = fleetctl(
        co,
        "rollout",
        "start",
        "--model",
        str(new_model),
        "--shared-path",
        "--digest",
        "sha256:" + "ab" * 32,
        "--rollout-id",
        "r-digest",
        "--wait",
    )
    assert out.exit_code == 7, out.output
    r = rollout(co, "r-digest")
    assert r.state == K.ROLLOUT_STATE_FAILED and [n.step for n in r.nodes] == [
        "failed",
        "pending",
        "pending",
    ]
    assert new[:19] in r.nodes[0].message, "the error names the digest the files really have"
    for n in three_nodes:
        st = n.status()
        assert (
            st.model.weights_digest == old
            and not st.cordoned
            and st.lifecycle == common_pb2.LIFECYCLE_READY
        )

    out = fleetctl(
        co, "rollout", "start", "--model", str(new_model), "--rollout-id", "r-gate", "--wait"
    )
    assert out.exit_code == 7, out.output
    r = rollout(co, "r-gate")
    assert [n.step for n in r.nodes] == ["done", "rolled_back", "pending"], r
    assert "command gate: gate command exited with 3" in r.nodes[1].message
    a, b, c = (n.status() for n in three_nodes)
    assert a.model.weights_digest == new
    assert (
        b.model.weights_digest == old
        and not b.cordoned
        and b.lifecycle == common_pb2.LIFECYCLE_READY
    )
    assert c.model.weights_digest == old and not any(o.kind == "activate" for o in c.operations)
    co.wait_routable(3)
    assert collect(co.inference, note(1, 8)).error is None


def test_a_restarted_coordinator_resumes_the_rollout_without_redoing_finished_nodes(
    three_nodes, start_coordinator, new_model, tmp_path
):
    co = fleet_with(start_coordinator, three_nodes)
    new = weights_digest(new_model)
    # A long request on roll-b (sent to the node directly) holds its drain open, so the
    # coordinator is killed while roll-b is mid-rollout, after roll-a finished.
    holder = threading.Thread(
        target=lambda: collect(three_nodes[1].inference, note(0, 1800)), daemon=True
    )
    holder.start()
    three_nodes[1].wait_until(
        lambda st: st.load.running == 1, timeout_s=30, what="a long request on roll-b"
    )
    watch = EventWatch(co)
    fleet_pb2_grpc.FleetStub(co.channel).StartRollout(
        fleet_pb2.StartRolloutRequest(
            target=fleet_pb2.RolloutTarget(model_path=str(new_model), version="v2"),
            rollout_id="r-crash",
        ),
        timeout=60,
    )
    _wait_step(watch, "roll-a", "done")
    _wait_step(watch, "roll-b", "drain")
    watch.close()
    before = rollout(co, "r-crash")
    assert [n.step for n in before.nodes] == ["done", "drain", "pending"], before
    killed_at = time.time()
    co.restart(tmp_path / "logs", kill=True)
    co.wait_serving()
    r = wait_rollout(co, "r-crash")
    assert r.state == K.ROLLOUT_STATE_SUCCEEDED, r
    holder.join(60)
    for n in three_nodes:
        assert n.status().model.weights_digest == new
    a = three_nodes[0].status()
    assert all(o.started_unix_s < killed_at for o in a.operations), (
        f"node roll-a was touched again after the restart: {a.operations}"
    )
    b = three_nodes[1].status()
    assert sum(o.kind == "drain" for o in b.operations) == 1, (
        "the drain under way was not started twice"
    )


class KeepAlive:
    """Stands in for launchd's KeepAlive / systemd's Restart=always (neither can run in a
    test): starts a node agent again, on its address, whenever it exits with code 75."""

    def __init__(self, nodes, log_dir):
        self.restarts: list[str] = []
        self._stop = False
        self._threads = [
            threading.Thread(target=self._watch, args=(n, log_dir), daemon=True) for n in nodes
        ]
        for t in self._threads:
            t.start()

    def _watch(self, node, log_dir) -> None:
        while not self._stop:
            proc = node.proc
            code = proc.wait()
            if self._stop or code != 75:
                return
            self.restarts.append(node.node_id)
            node.restart(log_dir)

    def close(self) -> None:
        self._stop = True


def test_a_release_restart_rolls_through_the_fleet_without_failing_a_request(
    three_nodes, start_coordinator, tmp_path
):
    co = fleet_with(start_coordinator, three_nodes)
    pids = [n.proc.pid for n in three_nodes]
    keepalive = KeepAlive(three_nodes, tmp_path / "logs")
    load = Load(co)
    try:
        out = fleetctl(co, "rollout", "start", "--restart", "--rollout-id", "r-release", "--wait")
        results = load.finish()
    finally:
        keepalive.close()
    assert out.exit_code == 0, out.output
    assert sorted(keepalive.restarts) == sorted(NODES)
    assert [n.proc.pid for n in three_nodes] != pids
    failed = [(s.request.request_id, s.error.details()) for s in results if s.error]
    assert not failed, failed[:3]
    assert load.min_routable >= 2
    for n in three_nodes:
        st = n.status()
        assert st.lifecycle == common_pb2.LIFECYCLE_READY and not st.cordoned and st.uptime_s < 120


def _hold(node, max_tokens: int = 1800) -> threading.Thread:
    """A long request sent to `node` directly: it holds that node's drain open for a while."""
    t = threading.Thread(target=lambda: collect(node.inference, note(0, max_tokens)), daemon=True)
    t.start()
    node.wait_until(
        lambda st: st.load.running >= 1, timeout_s=30, what=f"a long request on {node.node_id}"
    )
    return t


def test_pause_resume_and_abort(three_nodes, start_coordinator, new_model, tiny_model):
    co = fleet_with(start_coordinator, three_nodes)
    stub = fleet_pb2_grpc.FleetStub(co.channel)
    holder = _hold(three_nodes[0])
    watch = EventWatch(co)
    stub.StartRollout(
        fleet_pb2.StartRolloutRequest(
            target=fleet_pb2.RolloutTarget(model_path=str(new_model)), rollout_id="r-pause"
        ),
        timeout=60,
    )
    _wait_step(watch, "roll-a", "drain")
    paused = fleetctl(co, "rollout", "pause", "r-pause")
    assert paused.exit_code == 0 and "paused" in paused.output
    _wait_step(watch, "roll-a", "done")  # the node step under way finishes
    holder.join(60)
    r = rollout(co, "r-pause")
    assert r.state == K.ROLLOUT_STATE_PAUSED and [n.step for n in r.nodes] == [
        "done",
        "pending",
        "pending",
    ]
    assert fleetctl(co, "rollout", "pause", "r-pause").exit_code == 2, (
        "pausing a paused rollout is refused"
    )
    assert fleetctl(co, "rollout", "resume").exit_code == 0
    assert wait_rollout(co, "r-pause").state == K.ROLLOUT_STATE_SUCCEEDED

    holder = _hold(three_nodes[0])
    stub.StartRollout(
        fleet_pb2.StartRolloutRequest(
            target=fleet_pb2.RolloutTarget(model_path=str(tiny_model)), rollout_id="r-abort"
        ),
        timeout=60,
    )
    _wait_step(watch, "roll-a", "drain", after="r-abort")
    assert fleetctl(co, "rollout", "abort").exit_code == 0
    out = fleetctl(co, "rollout", "status", "r-abort", "--watch")
    assert out.exit_code == 8, out.output
    _wait_step(watch, "roll-a", "done", after="r-abort")  # the node step under way still finishes
    watch.close()
    r = rollout(co, "r-abort")
    assert [n.step for n in r.nodes] == ["done", "pending", "pending"]
    assert three_nodes[1].status().model.weights_digest == weights_digest(new_model), (
        "untouched after the abort"
    )
    holder.join(60)


def test_a_standby_coordinator_on_the_same_database_takes_over_when_the_lease_expires(
    three_nodes, start_coordinator, new_model
):
    co = fleet_with(start_coordinator, three_nodes)
    holder = _hold(three_nodes[0])
    watch = EventWatch(co)
    fleet_pb2_grpc.FleetStub(co.channel).StartRollout(
        fleet_pb2.StartRolloutRequest(
            target=fleet_pb2.RolloutTarget(model_path=str(new_model)), rollout_id="r-standby"
        ),
        timeout=60,
    )
    _wait_step(watch, "roll-a", "drain")
    watch.close()
    standby = start_coordinator(
        "--state-db",
        str(co.state_db),
        "--coordinator-id",
        "standby",
        nodes=[n.address for n in three_nodes],
        name="standby",
    )
    refused = fleetctl(standby, "rollout", "start", "--model", str(new_model))
    assert refused.exit_code == 2 and "rollout r-standby is running" in refused.output
    assert rollout(standby, "r-standby").owner.startswith("coordinator@"), (
        "the lease holder: cert@host/instance"
    )
    co.proc.kill()
    co.wait_exit(10)
    r = wait_rollout(standby, "r-standby", timeout_s=120)  # after the 15 s lease runs out
    assert r.state == K.ROLLOUT_STATE_SUCCEEDED and r.owner.startswith("standby@"), r
    holder.join(60)


def _wait_step(
    watch: EventWatch, node_id: str, step: str, timeout_s: float = 120.0, after: str = ""
):
    """The first rollout event with this node and step (of rollout `after` only, when given)."""
    return watch.wait_until(
        lambda e: (
            e.kind == K.EVENT_KIND_ROLLOUT
            and e.node_id == node_id
            and e.step == step
            and (not after or e.rollout_id == after)
        ),
        timeout_s,
        f"{step} step for {node_id}",
    )
