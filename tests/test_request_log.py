"""The coordinator's request log: real SQLite files, and `fleetctl requests` against a
real coordinator and node (docs/monitoring.md)."""

from __future__ import annotations

import json
import sqlite3

import grpc
import pytest

from cluster.api import fleet_pb2
from cluster.client import build_request
from coordinator.request_log import QUEUE_MAX, RequestLog
from coordinator.request_summary import RequestSummary
from tests.fleet_helpers import collect
from tests.procs import CoordinatorProcess
from tests.test_fleetctl import fleetctl

MARK = "Ottoline-Brackwater-5521"  # synthetic "PHI": must never reach the log's file


def summary(
    i: int,
    *,
    ended: float,
    outcome: str = "completed",
    code: str = "OK",
    ttft: float = 0.2,
    tokens: int = 11,
    caller: str = "app/notes-app",
    duration: float = 1.0,
) -> RequestSummary:
    return RequestSummary(
        request_id=f"r-{i}",
        caller=caller,
        priority="interactive",
        started_at=ended - duration,
        ended_at=ended,
        outcome=outcome,
        code=code,
        duration_s=duration,
        queue_s=0.01,
        ttft_s=ttft if outcome == "completed" else None,
        decode_s=0.5,
        prompt_tokens=30,
        completion_tokens=tokens if outcome == "completed" else 0,
        nodes=["mac-01", "mac-02"],
        failovers=1 if i == 3 else 0,
        finish_reason="length" if outcome == "completed" else "",
    )


def ask(**kw) -> fleet_pb2.ListRequestsRequest:
    return fleet_pb2.ListRequestsRequest(**kw)


@pytest.fixture
def clock():
    return [1_800_000_000.0]


@pytest.fixture
def log(tmp_path, clock):
    rl = RequestLog(tmp_path / "state.db", retention_days=30, clock=lambda: clock[0])
    yield rl
    rl.close()


def test_rows_are_written_with_every_field_and_no_content_column(log, clock, tmp_path):
    for i in range(5):
        log.record(summary(i, ended=clock[0] - 10 + i))
    reply = log.list_reply(ask(since_s=3600), slow_ttft_ms=2000, slow_latency_ms=60000)
    assert reply.matched == 5 and [r.request_id for r in reply.requests] == [
        f"r-{i}" for i in (4, 3, 2, 1, 0)
    ]
    r = reply.requests[1]
    assert (r.caller, r.outcome, r.code, r.nodes, r.failovers) == (
        "app/notes-app",
        "completed",
        "OK",
        ["mac-01", "mac-02"],
        1,
    )
    assert (r.queue_ms, r.ttft_ms, r.decode_ms, r.latency_ms) == (10.0, 200.0, 500.0, 1000.0)
    assert (r.prompt_tokens, r.completion_tokens, r.finish_reason, r.priority) == (
        30,
        11,
        "length",
        "interactive",
    )
    assert not r.HasField("quality_score")
    log.close()
    columns = {
        row[1]
        for row in sqlite3.connect(tmp_path / "state.db").execute("PRAGMA table_info(requests)")
    }
    assert not columns & {"prompt", "completion", "text", "messages"}
    assert (
        sqlite3.connect(tmp_path / "state.db")
        .execute("SELECT count(*) FROM requests")
        .fetchone()[0]
        == 5
    )


def test_filters_since_slow_failed_caller_and_limit(log, clock):
    now = clock[0]
    log.record(summary(1, ended=now - 7200))  # too old for 1h
    log.record(summary(2, ended=now - 60, ttft=3.5))  # slow first token
    log.record(summary(3, ended=now - 50, duration=90.0))  # slow overall
    log.record(summary(4, ended=now - 40, outcome="failed", code="UNAVAILABLE"))
    log.record(
        summary(5, ended=now - 30, outcome="rejected", code="INVALID_ARGUMENT", caller="app/other")
    )
    log.record(summary(6, ended=now - 20))
    q = lambda **kw: log.list_reply(ask(**kw), slow_ttft_ms=2000, slow_latency_ms=60000)  # noqa: E731
    ids = lambda reply: [r.request_id for r in reply.requests]  # noqa: E731
    assert ids(q(since_s=3600)) == ["r-6", "r-5", "r-4", "r-3", "r-2"]
    assert q(since_s=3 * 3600).matched == 6
    assert ids(q(since_s=3600, slow_only=True)) == ["r-3", "r-2"]
    # The fleet's failures and the caller's own rejections are kept apart (issue 20): a 400 is no error.
    assert ids(q(since_s=3600, failed_only=True)) == ["r-4"]
    assert ids(q(since_s=3600, rejected_only=True)) == ["r-5"]
    assert (
        ids(q(since_s=3600, caller="other")) == ids(q(since_s=3600, caller="app/other")) == ["r-5"]
    )
    assert (
        q(since_s=3600, caller="oth_r").matched == q(since_s=3600, caller="OTHER").matched == 0
    )  # exact
    limited = q(since_s=3600, limit=2)
    assert ids(limited) == ["r-6", "r-5"] and limited.matched == 5
    assert limited.slow_ttft_ms == 2000 and limited.retention_days == 30


def test_retention_deletes_old_rows_when_the_log_opens(tmp_path, clock):
    first = RequestLog(tmp_path / "s.db", retention_days=1, clock=lambda: clock[0])
    first.record(summary(1, ended=clock[0] - 3 * 86400))
    first.record(summary(2, ended=clock[0] - 600))
    first.close()
    again = RequestLog(tmp_path / "s.db", retention_days=1, clock=lambda: clock[0])
    try:
        # Gone when the constructor returns, before the writer thread's first turn: the
        # file itself no longer has the row, and neither does the first query.
        rows = (
            sqlite3.connect(tmp_path / "s.db").execute("SELECT request_id FROM requests").fetchall()
        )
        assert rows == [("r-2",)]
        reply = again.list_reply(ask(since_s=10 * 86400), slow_ttft_ms=1, slow_latency_ms=1)
        assert [r.request_id for r in reply.requests] == ["r-2"]
    finally:
        again.close()


def test_a_query_waits_only_for_rows_recorded_before_it(log, clock):
    """Steady traffic cannot hold a query up: flush() waits for the rows recorded before
    it, not for a queue that keeps filling (the writer is held to make it deterministic)."""
    import threading

    original, first, release = log._insert, threading.Event(), threading.Event()
    calls = []

    def held(db, batch):
        calls.append(len(batch))
        (first if len(calls) == 1 else release).wait(10)
        original(db, batch)

    log._insert = held
    log.record(summary(1, ended=clock[0]))
    while not calls:  # the writer took r-1 alone and is holding it
        release.wait(0.01)
    done = []
    waiter = threading.Thread(target=lambda: done.append(log.flush(5.0)))
    waiter.start()
    for i in range(2, 5):  # recorded after the query began: never committed during this test
        log.record(summary(i, ended=clock[0]))
    first.set()
    waiter.join(5)
    release.set()
    assert done == [True]


def test_the_writer_survives_an_unexpected_error(log, clock):
    def broken(db):
        raise RuntimeError("a bug in the hourly retention pass")

    log._prune = broken
    clock[0] += 2 * 3600  # the hourly prune is due, and raises after the insert
    log.record(summary(1, ended=clock[0]))
    assert log.flush(5.0)
    log.record(summary(2, ended=clock[0]))
    reply = log.list_reply(ask(since_s=600), slow_ttft_ms=1, slow_latency_ms=1)
    assert sorted(r.request_id for r in reply.requests) == ["r-1", "r-2"]
    assert log._writer.is_alive()


def test_traffic_buckets_cover_the_window_with_percentiles(log, clock):
    now = clock[0]
    for i in range(20):  # one minute: 20 requests, TTFT 0.1 .. 2.0 s, one failure
        log.record(
            summary(
                i,
                ended=now - 30,
                ttft=0.1 * (i + 1),
                outcome="failed" if i == 19 else "completed",
                code="UNAVAILABLE" if i == 19 else "OK",
            )
        )
    log.record(summary(20, ended=now - 30, outcome="rejected", code="INVALID_ARGUMENT", tokens=0))
    traffic = log.traffic_reply(3600, 60)
    assert traffic.bucket_s == 60 and len(traffic.buckets) == 60
    assert [b.start for b in traffic.buckets] == sorted(b.start for b in traffic.buckets)
    busy = [b for b in traffic.buckets if b.requests]
    assert (
        len(busy) == 1
        and busy[0].requests == 21
        and busy[0].errors == 1
        and busy[0].tokens == 19 * 11
    )
    assert busy[0].rejected == 1  # the caller's bad request, counted apart from the fleet's failure
    assert busy[0].ttft_p50_ms == pytest.approx(1000.0) and busy[0].ttft_p95_ms == pytest.approx(
        1800.0
    )
    assert busy[0].itl_p50_ms == pytest.approx(50.0)  # 0.5 s decode over 10 gaps
    assert traffic.tokens_per_s == pytest.approx(19 * 11 / 60)


def test_record_never_raises_and_counts_what_it_drops(log, clock, monkeypatch):
    import coordinator.request_log as module

    log.close()
    log.record(summary(1, ended=clock[0]))
    assert log.dropped == 1
    full = RequestLog(log.path, retention_days=30, clock=lambda: clock[0])
    try:
        monkeypatch.setattr(
            full._queue, "put_nowait", lambda row: (_ for _ in ()).throw(module.queue.Full())
        )
        for i in range(3):
            full.record(summary(i, ended=clock[0]))
        assert full.dropped == 3 and QUEUE_MAX > 0
        assert full.flush(1.0)  # nothing pending: the dropped rows are not waited for
    finally:
        full.close()


@pytest.fixture(scope="module")
def coordinator(node, tmp_path_factory):
    proc = CoordinatorProcess(
        nodes=[node.address],
        name="requests-coordinator",
        env={"STUDIOFLEET_COORDINATOR_SLOW_TTFT_MS": "0.001"},
    )
    with proc:
        proc.start(tmp_path_factory.mktemp("request-log"))
        proc.wait_routable(1)
        yield proc


def test_fleetctl_requests_lists_what_the_coordinator_served(coordinator, node):
    done = collect(
        coordinator.inference,
        build_request(
            messages=[("user", f"Synthetic patient {MARK}: note.")],
            max_tokens=9,
            temperature=0.0,
            request_id="log-ok",
        ),
    )
    assert done.final is not None
    bad = collect(
        coordinator.inference, build_request(prompt=MARK, max_tokens=10**6, request_id="log-bad")
    )
    assert bad.error is not None and bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    base = ("-c", coordinator.address, "--tls-name", "operator")

    out = fleetctl("requests", *base, "--since", "1h", "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = {r["request_id"]: r for r in json.loads(out.stdout)["requests"]}
    ok, rejected = rows["log-ok"], rows["log-bad"]
    assert (ok["outcome"], ok["code"], ok["caller"], ok["nodes"]) == (
        "completed",
        "OK",
        "app/app",
        [node.node_id],
    )
    assert (
        ok["completion_tokens"] == len(done.ids)
        and ok["ttft_ms"] > 0
        and ok["latency_ms"] >= ok["ttft_ms"]
    )
    assert ok["prompt_tokens"] == done.final.usage.prompt_tokens
    assert (rejected["outcome"], rejected["code"], rejected["nodes"]) == (
        "rejected",
        "INVALID_ARGUMENT",
        [],
    )

    # The caller's own bad request is a rejection, not one of the fleet's failures (issue 20).
    failed = json.loads(fleetctl("requests", *base, "--failed", "-o", "json").stdout)["requests"]
    assert [r["request_id"] for r in failed] == []
    rejections = json.loads(fleetctl("requests", *base, "--rejected", "-o", "json").stdout)[
        "requests"
    ]
    assert [r["request_id"] for r in rejections] == ["log-bad"]
    slow = json.loads(
        fleetctl("requests", *base, "--slow", "-o", "json").stdout
    )  # threshold 0.001 ms here
    assert "log-ok" in [r["request_id"] for r in slow["requests"]] and slow["slow_ttft_ms"] == 0.001
    table = fleetctl("requests", *base)
    assert table.returncode == 0 and "log-ok" in table.stdout and "INVALID_ARGUMENT" in table.stdout
    assert fleetctl("requests", *base, "--since", "yesterday").returncode == 2
    denied = fleetctl("requests", "-c", coordinator.address, "--tls-name", "app")
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr

    coordinator.stop()  # SIGTERM: the last rows are committed before the coordinator exits
    data = coordinator.state_db.read_bytes() + b"".join(
        p.read_bytes() for p in coordinator.state_db.parent.glob(coordinator.state_db.name + "*")
    )
    assert MARK.encode() not in data and b"log-ok" in data
