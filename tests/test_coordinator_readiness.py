"""Coordinator readiness (docs/ha.md "Readiness"): ready only while its state database
answers and a node is routable; grpc.health.v1 (the Inference service) and the front door's
GET /ready say so. Real coordinator and node processes; a real PostgreSQL stopped and
started again under a stream in flight."""

from __future__ import annotations

import json
import signal
import ssl
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import INFERENCE_SERVICE
from cluster.client import build_request

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FAST = ("--readiness-interval-s", "0.2", "--readiness-timeout-s", "0.5")


def ready(co) -> tuple[int, dict]:
    """GET /ready on the front door with no credentials: (status, body)."""
    context = ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem")) if co.openai_scheme == "https" else None
    try:
        with urllib.request.urlopen(f"{co.openai_scheme}://{co.openai_address}/ready", timeout=10,
                                    context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_health(co, service: str, status, timeout_s: float = 20.0) -> None:
    """Follow the health Watch of `service` until it reports `status` (no polling)."""
    stub = health_pb2_grpc.HealthStub(co.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    try:
        for reply in watch:
            if reply.status == status:
                return
    finally:
        watch.cancel()


def check(co, service: str = INFERENCE_SERVICE):
    return health_pb2_grpc.HealthStub(co.channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_ready_only_with_a_routable_node(start_node, start_coordinator):
    node = start_node(node_id="ready-node")
    co = start_coordinator(*FAST, nodes=[node.address], name="ready-co")
    co.wait_routable(1)
    wait_health(co, INFERENCE_SERVICE, SERVING)
    assert ready(co) == (200, {"ready": True, "reason": "ready"})
    status, body, _ = co.http_get("/metrics")
    assert status == 200 and b"studiofleet_coordinator_ready 1.0" in body and b"studiofleet_state_store_up 1.0" in body

    node.stop()   # the only node gone: not ready, but alive and administrable
    wait_health(co, INFERENCE_SERVICE, NOT_SERVING)
    assert ready(co) == (503, {"ready": False, "reason": "no_routable_node"})
    assert check(co, "") == SERVING
    status, body, _ = co.http_get("/metrics")
    assert b"studiofleet_coordinator_ready 0.0" in body and b"studiofleet_state_store_up 1.0" in body


def test_ready_answer_reveals_nothing_else(start_coordinator):
    co = start_coordinator(*FAST, name="lonely-co")   # no node at all
    status, body = ready(co)
    assert (status, body) == (503, {"ready": False, "reason": "no_routable_node"})
    assert check(co) == NOT_SERVING and check(co, "") == SERVING


@pytest.fixture
def own_postgres():
    """A PostgreSQL of this test's own, so stopping it touches no other test."""
    from tests.pg import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL 15+ is not installed (scripts/bootstrap-postgres)")
    with PostgresCluster(bindir) as cluster:
        yield cluster


def pg_ctl(cluster, *args: str) -> None:
    out = cluster._run(str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data), *args, check=False)
    assert out.returncode == 0, out.stderr


def test_database_lost_then_back(own_postgres, start_node, start_coordinator):
    url = own_postgres.database()
    node = start_node(node_id="db-node")
    co = start_coordinator(*FAST, "--state-url", url, nodes=[node.address], name="db-co")
    co.wait_routable(1)
    wait_health(co, INFERENCE_SERVICE, SERVING)

    stream = co.inference.Generate(build_request(prompt="Synthetic note, stream in flight.", max_tokens=48,
                                                 temperature=0.0, seed=7), timeout=60)
    first = next(stream)
    node.proc.send_signal(signal.SIGSTOP)   # hold the stream in flight while the database goes
    try:
        pg_ctl(own_postgres, "-m", "fast", "-w", "stop")
        wait_health(co, INFERENCE_SERVICE, NOT_SERVING)
        assert ready(co) == (503, {"ready": False, "reason": "state_store_unreachable"})
        with pytest.raises(grpc.RpcError) as refused:   # a new request: UNAVAILABLE, try another coordinator
            list(co.inference.Generate(build_request(prompt="Synthetic, new.", max_tokens=4), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "state database" in refused.value.details()
    finally:
        node.proc.send_signal(signal.SIGCONT)
    chunks = [first, *stream]   # the stream in flight finishes
    assert chunks[-1].HasField("final") and chunks[-1].final.usage.completion_tokens > 1

    pg_ctl(own_postgres, "-l", str(own_postgres.dir / "log"), "-o",
           f"-p {own_postgres.port} -k {own_postgres.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "-w", "start")
    wait_health(co, INFERENCE_SERVICE, SERVING)
    assert ready(co) == (200, {"ready": True, "reason": "ready"})
    again = list(co.inference.Generate(build_request(prompt="Synthetic, after.", max_tokens=4), timeout=30))
    assert again[-1].HasField("final")
