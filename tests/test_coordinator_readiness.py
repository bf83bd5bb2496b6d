"""Coordinator readiness (docs/ha.md "Readiness"): ready only while its state database
answers and a node is routable; grpc.health.v1 (the Inference service) and the front door's
GET /ready say so. Real coordinator and node processes; a real PostgreSQL stopped and
started again under a stream in flight."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import INFERENCE_SERVICE
from cluster.client import build_request
from cluster.localfleet import HARNESS_APP
from cluster.security.identity import Role

SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)
FAST = ("--readiness-interval-s", "0.2", "--readiness-timeout-s", "0.5")


def ready(co) -> tuple[int, dict]:
    """GET /ready on the front door with no credentials: (status, body)."""
    context = (
        ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem"))
        if co.openai_scheme == "https"
        else None
    )
    try:
        with urllib.request.urlopen(
            f"{co.openai_scheme}://{co.openai_address}/ready", timeout=10, context=context
        ) as reply:
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
    return (
        health_pb2_grpc.HealthStub(co.channel)
        .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        .status
    )


def test_ready_only_with_a_routable_node(start_node, start_coordinator):
    node = start_node(node_id="ready-node")
    co = start_coordinator(*FAST, nodes=[node.address], name="ready-co")
    co.wait_routable(1)
    wait_health(co, INFERENCE_SERVICE, SERVING)
    assert ready(co) == (200, {"ready": True, "reason": "ready"})
    status, body, _ = co.http_get("/metrics")
    assert (
        status == 200
        and b"studiofleet_coordinator_ready 1.0" in body
        and b"studiofleet_state_store_up 1.0" in body
    )

    node.stop()  # the only node gone: not ready, but alive and administrable
    wait_health(co, INFERENCE_SERVICE, NOT_SERVING)
    assert ready(co) == (503, {"ready": False, "reason": "no_routable_node"})
    assert check(co, "") == SERVING
    status, body, _ = co.http_get("/metrics")
    assert (
        b"studiofleet_coordinator_ready 0.0" in body and b"studiofleet_state_store_up 1.0" in body
    )


def test_ready_answer_reveals_nothing_else(start_coordinator):
    co = start_coordinator(*FAST, name="lonely-co")  # no node at all
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

    stream = co.inference.Generate(
        build_request(
            prompt="Synthetic note, stream in flight.", max_tokens=48, temperature=0.0, seed=7
        ),
        timeout=60,
    )
    first = next(stream)
    node.proc.send_signal(signal.SIGSTOP)  # hold the stream in flight while the database goes
    try:
        pg_ctl(own_postgres, "-m", "fast", "-w", "stop")
        wait_health(co, INFERENCE_SERVICE, NOT_SERVING)
        assert ready(co) == (503, {"ready": False, "reason": "state_store_unreachable"})
        with pytest.raises(
            grpc.RpcError
        ) as refused:  # a new request: UNAVAILABLE, try another coordinator
            list(
                co.inference.Generate(
                    build_request(prompt="Synthetic, new.", max_tokens=4), timeout=10
                )
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "state database" in refused.value.details()
    finally:
        node.proc.send_signal(signal.SIGCONT)
    chunks = [first, *stream]  # the stream in flight finishes
    assert chunks[-1].HasField("final") and chunks[-1].final.usage.completion_tokens > 1

    pg_ctl(
        own_postgres,
        "-l",
        str(own_postgres.dir / "log"),
        "-o",
        f"-p {own_postgres.port} -k {own_postgres.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
        "-w",
        "start",
    )
    wait_health(co, INFERENCE_SERVICE, SERVING)
    assert ready(co) == (200, {"ready": True, "reason": "ready"})
    again = list(
        co.inference.Generate(build_request(prompt="Synthetic, after.", max_tokens=4), timeout=30)
    )
    assert again[-1].HasField("final")

    # The stream that ended while the database was gone: its request log row was written
    # once the database came back, or its loss is counted (and alerted:
    # StudioFleetRequestLogLosingRows); never lost without a trace.
    import sqlalchemy as sa

    rid = chunks[-1].final.request_id
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    deadline = time.monotonic() + 30
    try:
        while True:
            with engine.connect() as db:
                logged = db.execute(
                    sa.text("SELECT count(*) FROM requests WHERE request_id = :r"), {"r": rid}
                ).scalar()
            _, body, _ = co.http_get("/metrics")
            lost = next(
                float(line.split()[1])
                for line in body.decode().splitlines()
                if line.startswith("studiofleet_request_log_rows_lost_total ")
            )
            if logged == 1 or lost >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # polling the writer's outcome, with a deadline
    finally:
        engine.dispose()
    assert logged == 1 or lost >= 1, f"request {rid}: neither in the request log nor counted lost"


# -- HAProxy in front of two coordinators, as docs/ha.md configures it -----------------------

HA_DOC = Path(__file__).resolve().parent.parent / "docs" / "ha.md"


def documented_haproxy_cfg() -> str:
    """The haproxy.cfg block of docs/ha.md (the fenced block after its marker comment)."""
    text = HA_DOC.read_text()
    after = text[text.index("<!-- haproxy.cfg:") :]
    return after.split("```\n", 2)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(sock: Path) -> dict[str, tuple[str, int]]:
    """{server: (status, sessions in all)} of the coordinators backend, from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = list(csv.reader(io.StringIO(data.decode().lstrip("# "))))
    head = rows[0]
    at = {name: head.index(name) for name in ("pxname", "svname", "status", "stot")}
    return {
        r[at["svname"]]: (r[at["status"]], int(r[at["stot"]] or 0))
        for r in rows[1:]
        if len(r) > at["stot"]
        and r[at["pxname"]] == "coordinators"
        and r[at["svname"]] not in ("BACKEND", "")
    }


def wait_servers(
    sock: Path, want: dict[str, str], timeout_s: float = 30.0
) -> dict[str, tuple[str, int]]:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = servers(sock) if sock.exists() else {}
        if all(seen.get(name, ("",))[0].startswith(status) for name, status in want.items()):
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(f"HAProxy did not reach {want} in {timeout_s}s: {seen}")
        time.sleep(0.2)  # the poll interval of a readiness loop with a deadline


def complete_through(address: str, co) -> int:
    """One chat completion through the load balancer as the harness app (its certificate)."""
    context = ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem"))
    co.credentials(HARNESS_APP, Role.APP)
    context.load_cert_chain(co.tls_dir / f"{HARNESS_APP}.pem", co.tls_dir / f"{HARNESS_APP}.key")
    body = json.dumps(
        {
            "model": "tiny-qwen2",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Synthetic note through the load balancer."}],
        }
    )
    request = urllib.request.Request(
        f"https://{address}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60, context=context) as reply:
        assert json.loads(reply.read())["choices"][0]["message"]["content"] is not None
        return reply.status


def test_haproxy_routes_around_a_stopped_coordinator(tmp_path, node, start_coordinator):
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        if os.environ.get("STUDIOFLEET_REQUIRE_HAPROXY") == "1":
            pytest.fail("haproxy is not installed: run scripts/bootstrap-haproxy (as root)")
        pytest.skip("haproxy is not installed (scripts/bootstrap-haproxy)")
    a = start_coordinator(*FAST, nodes=[node.address], name="coord-1")
    b = start_coordinator(*FAST, nodes=[node.address], name="coord-2")
    for co in (a, b):
        co.wait_routable(1)
        assert co.openai_scheme == "https"
    front, sock = f"127.0.0.1:{free_port()}", tmp_path / "haproxy.sock"
    cfg = documented_haproxy_cfg()
    for documented, here in (
        ("/run/haproxy/studiofleet.sock", str(sock)),
        ("0.0.0.0:8443", front),
        ("/etc/studiofleet/ca.pem", str(a.tls_dir / "ca.pem")),
        ("coord-1.clinic.lan:7802", a.openai_address),
        ("coord-2.clinic.lan:7802", b.openai_address),
    ):
        assert documented in cfg, documented
        cfg = cfg.replace(documented, here)
    (tmp_path / "haproxy.cfg").write_text(cfg)
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    proc = subprocess.Popen(
        [haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "haproxy.log", "wb"),
    )
    try:
        wait_servers(sock, {"coord-1": "UP", "coord-2": "UP"})
        assert [complete_through(front, a) for _ in range(6)] == [200] * 6
        before = servers(sock)
        assert before["coord-1"][1] >= 3 and before["coord-2"][1] >= 3, (
            before
        )  # round robin: both served

        a.stop()
        after_stop = wait_servers(sock, {"coord-1": "DOWN", "coord-2": "UP"})
        assert [complete_through(front, b) for _ in range(4)] == [200] * 4
        now = servers(sock)
        assert (
            now["coord-2"][1] == after_stop["coord-2"][1] + 4
            and now["coord-1"][1] == after_stop["coord-1"][1]
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
