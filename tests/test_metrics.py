"""Prometheus /metrics on the coordinator and the node agent, and the JSON log lines:
real daemons, a real HTTPS monitoring port with the fleet's certificates, parsed with
prometheus_client's own text parser (docs/monitoring.md)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from cluster.api import inference_pb2
from cluster.client import build_request
from cluster.localfleet import HARNESS_NODE_CALLER
from cluster.metrics import parse
from cluster.security.identity import Role
from tests.fleet_helpers import collect, serving_coordinator
from tests.procs import CoordinatorProcess

MARK = "Zebulon-Quartz-7741"  # synthetic "PHI" that must never appear in metrics or logs


@pytest.fixture(scope="module")
def coordinator(node, tmp_path_factory):
    with serving_coordinator(
        node, tmp_path_factory.mktemp("metrics-logs"), "metrics-coordinator"
    ) as proc:
        yield proc


def scrape(daemon, name: str = "operator", role: Role = Role.OPERATOR) -> dict:
    """{(sample name, frozenset(labels)): value} from the daemon's /metrics."""
    status, body, headers = daemon.http_get("/metrics", name, role)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(body.decode())


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_requests_are_counted_once_by_outcome_with_their_latencies(coordinator, node):
    before_c, before_n = scrape(coordinator), scrape(node)
    streams = [
        collect(
            coordinator.inference,
            build_request(
                prompt=f"Note {i}:", max_tokens=12, temperature=0.0, request_id=f"metrics-{i}"
            ),
        )
        for i in range(3)
    ]
    assert all(s.final is not None for s in streams)
    bad = collect(
        coordinator.inference, build_request(prompt="x", max_tokens=10**6, request_id="metrics-bad")
    )
    assert bad.error is not None and bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    after_c, after_n = scrape(coordinator), scrape(node)
    tokens = sum(len(s.ids) for s in streams)

    def grew(after, before, name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert (
        grew(after_c, before_c, "studiofleet_requests_total", outcome="completed", code="OK") == 3
    )
    assert (
        grew(
            after_c,
            before_c,
            "studiofleet_requests_total",
            outcome="rejected",
            code="INVALID_ARGUMENT",
        )
        == 1
    )
    assert grew(after_c, before_c, "studiofleet_request_ttft_seconds_count") == 3
    assert grew(after_c, before_c, "studiofleet_request_duration_seconds_count") == 4
    assert grew(after_c, before_c, "studiofleet_request_queue_seconds_count") == 3
    assert grew(after_c, before_c, "studiofleet_generation_tokens_total") == tokens
    # One inter-token observation per token after each request's first.
    assert grew(after_c, before_c, "studiofleet_request_inter_token_seconds_count") == tokens - 3
    assert grew(after_c, before_c, "studiofleet_prompt_tokens_total") == sum(
        s.final.usage.prompt_tokens for s in streams
    )
    assert value(after_c, "studiofleet_nodes_routable") == 1
    assert value(after_c, "studiofleet_node_lifecycle", node=node.node_id, state="READY") == 1
    assert value(after_c, "studiofleet_node_health", node=node.node_id, verdict="HEALTHY") == 1
    assert value(after_c, "studiofleet_audit_enabled") == 1
    assert grew(after_c, before_c, "studiofleet_audit_records_total") >= 4
    assert (
        value(after_c, "studiofleet_requests_running")
        == value(after_c, "studiofleet_requests_queued")
        == 0
    )
    # The node saw the three that reached it (the bad one never left the coordinator).
    assert grew(after_n, before_n, "studiofleet_node_requests_total", outcome="completed") == 3
    assert grew(after_n, before_n, "studiofleet_node_generation_tokens_total") == tokens
    assert value(after_n, "studiofleet_node_state", state="READY") == 1
    assert total(after_n, "process_resident_memory_bytes") > 0
    assert value(after_n, "studiofleet_host_memory_bytes", kind="total") > 0


def test_nodes_export_the_series_names_vllm_dashboards_read(node):
    collect(
        node.inference,
        build_request(prompt="Note:", max_tokens=6, temperature=0.0, request_id="vllm-names"),
    )
    s = scrape(node)
    model = {"model_name": node.status().model.model_id}
    for gauge in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert (gauge, frozenset(model.items())) in s, gauge
    # The same observations under both names, not a second count.
    assert value(s, "vllm:generation_tokens_total", **model) == total(
        s, "studiofleet_node_generation_tokens_total"
    )
    assert (
        value(s, "vllm:time_to_first_token_seconds_count", **model)
        == total(s, "studiofleet_node_request_ttft_seconds_count")
        > 0
    )
    assert value(s, "vllm:e2e_request_latency_seconds_bucket", le="+Inf", **model) == total(
        s, "studiofleet_node_request_duration_seconds_count"
    )


def test_the_monitoring_port_has_the_same_rules_as_grpc(coordinator, node):
    """No certificate: 401 saying how to get one; a role not in the table: 403 naming the
    roles allowed; `monitor` (Prometheus) and operators may read metrics."""
    status, body, _ = coordinator.http_get("/metrics", None)
    assert status == 401 and b"client certificate" in body
    status, body, _ = coordinator.http_get("/metrics", "app", Role.APP)
    assert status == 403 and b"allowed: monitor, operator" in body
    assert coordinator.http_get("/metrics", "prometheus", Role.MONITOR)[0] == 200
    assert coordinator.http_get("/api/snapshot", "prometheus", Role.MONITOR)[0] == 403
    assert node.http_get("/metrics", HARNESS_NODE_CALLER, Role.COORDINATOR)[0] == 200
    assert node.http_get("/metrics", "prometheus", Role.MONITOR)[0] == 200
    assert node.http_get("/metrics", "app", Role.APP)[0] == 403
    assert node.http_get("/metrics", None)[0] == 401
    assert node.http_get("/nothing-here", "prometheus", Role.MONITOR)[0] == 403  # default deny
    _, _, headers = node.http_get("/metrics", "prometheus", Role.MONITOR)
    assert (
        headers["Cache-Control"] == "no-store"
        and "default-src 'self'" in headers["Content-Security-Policy"]
    )


def test_content_never_reaches_metrics_or_logs_and_logs_are_json_lines(coordinator, node):
    s = collect(
        coordinator.inference,
        build_request(
            messages=[("user", f"Synthetic patient {MARK} reports a cough.")],
            max_tokens=8,
            request_id="json-log-check",
        ),
    )
    assert s.final is not None
    for daemon in (coordinator, node):
        status, body, _ = daemon.http_get("/metrics")
        assert status == 200 and MARK.encode() not in body
    for daemon in (coordinator, node):
        logs = daemon.stderr()
        assert MARK not in logs
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        assert lines and all(
            {"ts", "level", "logger", "event", "msg"} <= set(line) for line in lines
        )
        ends = [
            line
            for line in lines
            if line["event"] == "request.end" and line.get("request_id") == "json-log-check"
        ]
        assert len(ends) == 1, f"one request.end line per request on {daemon.name}"
        assert ends[0]["outcome"] == "completed"
        if daemon is coordinator:
            assert ends[0]["node_id"] == node.node_id and ends[0]["caller"] == "app/app"
        else:
            assert ends[0]["node_id"] == node.node_id and ends[0]["completion_tokens"] == len(s.ids)


def test_a_coordinator_can_run_without_metrics_or_a_monitoring_port(node, tmp_path):
    with CoordinatorProcess("--no-metrics", nodes=[node.address], name="no-metrics") as quiet:
        quiet.start(tmp_path)
        quiet.wait_serving()
        assert quiet.http_address and quiet.http_get("/metrics")[0] == 404
    with CoordinatorProcess("--http-listen", "off", nodes=[node.address], name="no-http") as none:
        none.start(tmp_path)
        none.wait_serving()
        assert none.http_address == ""
        r = collect(none.inference, build_request(prompt="x", max_tokens=3, request_id="no-http"))
        assert r.final is not None and r.final.finish_reason in (
            inference_pb2.FINISH_REASON_LENGTH,
            inference_pb2.FINISH_REASON_STOP,
        )


def test_dashboard_links_work_once_and_sessions_idle_out():
    """HIPAA automatic logoff: a session ends after the idle timeout or its maximum age;
    a login link works once and only for a minute (in memory; in the state database:
    tests/test_state_sessions.py runs the same checks on SQLite and PostgreSQL)."""
    from tests.test_state_sessions import links_and_sessions

    asyncio.run(links_and_sessions(None))


def test_a_monitoring_port_in_use_is_a_clear_start_error(node, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = CoordinatorProcess(
            "--http-listen", f"127.0.0.1:{port}", nodes=[node.address], name="clash"
        )
        with pytest.raises(RuntimeError, match="exited before listening") as err:
            proc.start(tmp_path)
        assert f"cannot open the monitoring port 127.0.0.1:{port}" in str(err.value)
        assert "--http-listen" in str(err.value) and "Traceback" not in str(err.value)
        assert proc.proc.wait(10) == 1
