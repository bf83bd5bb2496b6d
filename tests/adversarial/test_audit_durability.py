"""Issue 19 #2, #6, #17: nothing leaves the coordinator before its audit record is durable.

A request's `accepted` record is down before its first token; a failure status leaves after
its record; an admin call is recorded before it acts or answers; a HEAD that cannot be
written fails the batch; while the audit log cannot be written the coordinator refuses work
with UNAVAILABLE naming the cause, says so on /metrics, and recovers on its own. Real
coordinator and node processes; the full disk is a real tmpfs filled to the last page.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from cluster.api import fleet_pb2, fleet_pb2_grpc
from cluster.audit import query, verify
from cluster.audit.chain import AuditWriteError, default_key_dir
from cluster.metrics import parse
from cluster.security.identity import Role
from coordinator.audit_trail import canonical_input
from tests.audit_helpers import open_log, records
from tests.fleet_helpers import collect, note, serving_coordinator
from tests.procs import CoordinatorProcess

pytestmark = pytest.mark.timeout(120)


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def _gauge(co, name: str) -> float:
    status, body, _ = co.http_get("/metrics", "prometheus", Role.MONITOR)
    assert status == 200, body
    return parse(body.decode())[(name, frozenset())]


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs: a disk that really fills up (the tests run as root)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> Path:
    """Fill the file system to its last byte; the filler is removed to free it again."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_a_head_write_failure_fails_the_batch_and_the_writer_recovers_on_its_own(tmp_path):
    directory = tmp_path / "audit"
    log = open_log(directory)
    try:
        log.submit({"type": "request", "request_id": "before"}).result(10)
        (
            directory / "HEAD.tmp"
        ).mkdir()  # HEAD can no longer be replaced (root ignores permissions)
        with pytest.raises(AuditWriteError, match="HEAD"):
            log.submit({"type": "request", "request_id": "uncovered"}).result(10)
        assert "HEAD" in log.failing and log.stats.write_errors >= 1
        report = verify(directory)  # nothing was left beyond HEAD that could be cut undetected
        assert report.ok and not report.warnings, report
        assert "uncovered" not in [r.get("request_id") for r in query(directory)]
        (directory / "HEAD.tmp").rmdir()
        _wait(lambda: not log.failing, 10, "the writer did not retry on its own")
        log.submit({"type": "request", "request_id": "after"}).result(10)
    finally:
        log.close()
    report = verify(directory)
    assert report.ok and not report.warnings, report
    assert [r.get("request_id") for r in query(directory, type_="request")] == ["before", "after"]


def test_query_shows_a_requests_accepted_and_end_records_as_one(tmp_path):
    directory = tmp_path / "audit"
    base = {"type": "request", "action": "inference.generate", "caller": "app", "coordinator": "c1"}
    log = open_log(directory)
    try:
        log.submit({**base, "request_id": "done", "outcome": "accepted"}).result(10)
        log.submit({**base, "request_id": "killed", "outcome": "accepted"}).result(10)
        log.submit({**base, "request_id": "done", "outcome": "completed", "code": "OK"}).result(10)
    finally:
        log.close()
    log = open_log(directory)  # the writer that left `killed` open is gone
    log.close()
    raw = [(r["request_id"], r["outcome"]) for r in query(directory, type_="request", merge=False)]
    assert raw == [("done", "accepted"), ("killed", "accepted"), ("done", "completed")]
    [done] = query(directory, request_id="done")
    assert (
        done["outcome"] == "completed"
        and done["accepted_seq"] < done["seq"]
        and done["accepted_time"]
    )
    [killed] = query(directory, request_id="killed")
    assert killed["outcome"] == "accepted"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "audit",
            "query",
            str(directory),
            "--request-id",
            "done",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1, out


def test_a_full_audit_disk_lets_no_token_out_and_the_coordinator_refuses_until_it_recovers(
    node, tmpfs
):
    audit_dir = tmpfs / "audit"
    co = CoordinatorProcess("--audit-dir", str(audit_dir), nodes=[node.address], name="full-disk")
    with co:
        co.start(tmpfs.parent / "logs")
        co.wait_serving()
        co.wait_routable(1)
        ok = collect(co.inference, note(1, 4, request_id="full-ok"))
        assert ok.final is not None, ok.error
        # Two records, linked by request id: accepted (who, what, where, prompt digest) first.
        accepted, end = [r for r in records(audit_dir) if r.get("request_id") == "full-ok"]
        assert (accepted["outcome"], end["outcome"]) == ("accepted", "completed")
        assert accepted["seq"] < end["seq"] and accepted["nodes"][0]["node"] == ok.final.node_id
        assert accepted["caller"] == "app" and accepted["prompt_digest"] == end["prompt_digest"]

        filler = _fill(tmpfs)
        first = collect(co.inference, note(2, 40, request_id="full-1"))
        assert first.error is not None and first.error.code() == grpc.StatusCode.UNAVAILABLE, (
            first.error
        )
        assert not first.ids and not first.text, "tokens left before their audit record was durable"
        assert "No space left on device" in first.error.details()
        # Now refused at once, naming the cause; /metrics says so; admin calls do not act.
        second = collect(co.inference, note(3, 40, request_id="full-2"))
        assert second.error.code() == grpc.StatusCode.UNAVAILABLE and not second.ids
        assert "cannot write its audit log" in second.error.details()
        assert "No space left on device" in second.error.details()
        assert _gauge(co, "studiofleet_audit_writer_failing") == 1.0
        with co.dial("operator", Role.OPERATOR) as channel:
            _cordon_is_refused(fleet_pb2_grpc.FleetStub(channel), node)

        filler.unlink()  # the writer retries on its own; requests are taken again
        _wait(
            lambda: _gauge(co, "studiofleet_audit_writer_failing") == 0.0,
            15,
            "the audit writer did not recover",
        )
        again = collect(co.inference, note(4, 4, request_id="full-again"))
        assert again.final is not None, again.error
        co.stop()
    report = verify(audit_dir)
    assert report.ok and not report.warnings, report
    delivered = {r["request_id"] for r in records(audit_dir) if r.get("outcome") == "accepted"}
    assert delivered == {"full-ok", "full-again"}


def _cordon_is_refused(admin, node) -> None:
    try:
        with pytest.raises(grpc.RpcError) as cordon:
            admin.CordonNode(
                fleet_pb2.CordonNodeRequest(
                    node_id=node.node_id, cordoned=True, reason="disk test"
                ),
                timeout=10,
            )
        assert cordon.value.code() == grpc.StatusCode.UNAVAILABLE, cordon.value
        assert "audit record could not be written" in cordon.value.details()
        assert not node.status().cordoned, "the cordon acted without a durable record"
    finally:
        if node.status().cordoned:
            admin.CordonNode(
                fleet_pb2.CordonNodeRequest(node_id=node.node_id, cordoned=False), timeout=10
            )


def test_a_coordinator_killed_mid_stream_leaves_the_accepted_record(node, tmp_path):
    co = CoordinatorProcess(nodes=[node.address], name="killed-mid-stream")
    with co:
        co.start(tmp_path / "logs")
        co.wait_serving()
        co.wait_routable(1)
        req = note(5, 1500, request_id="killed-1")
        s = collect(co.inference, req, on_chunk=lambda s: s.ids and co.signal(signal.SIGKILL))
        assert s.ids and s.error is not None, "the stream was not cut"
        co.wait_exit(10)
    [rec] = query(co.audit_dir, request_id="killed-1")
    assert rec["outcome"] == "accepted" and (rec["caller"], rec["role"]) == ("app", "app")
    assert rec["nodes"][0]["node"] == node.node_id and rec["nodes"][0]["digest"]
    key = (default_key_dir(co.audit_dir) / "hmac.key").read_bytes()
    assert rec["prompt_digest"].endswith(
        hmac.new(key, canonical_input(req), hashlib.sha256).hexdigest()
    )
    assert verify(co.audit_dir).ok


@pytest.fixture(scope="module")
def coordinator(node, tmp_path_factory):
    with serving_coordinator(node, tmp_path_factory.mktemp("abort-logs"), "abort-order") as co:
        yield co


def test_a_failure_status_leaves_only_after_its_audit_record(coordinator):
    for i in range(10):
        rid = f"abort-{i}"
        req = note(10 + i, 4, request_id=rid)
        req.model = "no-such-model"  # READY nodes serve another: UNAVAILABLE from the relay's abort
        s = collect(coordinator.inference, req)
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error
        found = list(query(coordinator.audit_dir, request_id=rid))  # at once: no waiting
        assert [(r["outcome"], r["code"]) for r in found] == [("failed", "UNAVAILABLE")], (i, found)


def test_admin_records_are_durable_before_the_reply_and_get_rollout_is_audited(coordinator):
    with coordinator.dial("operator", Role.OPERATOR) as channel:
        _admin_calls(fleet_pb2_grpc.FleetStub(channel), coordinator)


def _admin_calls(admin, coordinator) -> None:
    listed = lambda: len(list(query(coordinator.audit_dir, action="fleet.list_nodes")))  # noqa: E731
    for _ in range(5):
        before = listed()
        admin.ListNodes(fleet_pb2.ListNodesRequest(), timeout=10)
        assert listed() == before + 1  # at once: the record was down before the reply
    with pytest.raises(grpc.RpcError):
        admin.GetRollout(fleet_pb2.GetRolloutRequest(rollout_id="r-none"), timeout=10)
    [rec] = query(coordinator.audit_dir, action="rollout.get")
    assert rec["caller"] == "operator" and rec["rollout_id"] == "r-none" and rec["code"] != "OK"
    reply = admin.CordonNode(
        fleet_pb2.CordonNodeRequest(
            node_id=coordinator_node(coordinator), cordoned=False, reason="audit test"
        ),
        timeout=10,
    )
    [op] = query(coordinator.audit_dir, action="node.uncordon")
    assert (
        op["outcome"] == "ok" and op["accepted_seq"] < op["seq"] and reply.node_id == op["node_id"]
    )


def coordinator_node(co) -> str:
    return next(n.status.node_id for n in co.nodes().nodes if n.routable)
