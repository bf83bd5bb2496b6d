"""The HTTPS ports under attack (issue 19: findings 3, 5, 13, 18 and the X-Request-Id part
of 7): unauthenticated floods, slow and idle clients, an unattended dashboard tab and
forged request ids, against a real coordinator (monitoring port + OpenAI front door) with
its limits lowered by flags. Each client binds its own loopback source address (127.0.0.x),
so the per-source limits of one test do not touch another's."""

from __future__ import annotations

import http.client
import json
import os
import resource
import select
import socket
import ssl
import time

import pytest

from cluster.api import inference_pb2_grpc
from cluster.audit import query
from cluster.client import build_request
from cluster.security.identity import Role
from tests.fleet_helpers import collect
from tests.procs import ROOT, CoordinatorProcess

WINDOW_S, BURST, LIMIT = 2.0, 3, 6
HEADER_S = IDLE_S = 1.0
HANDSHAKE_S = 4.0
MAX_CONN, MAX_UNAUTH = 24, 8  # per port; one source may hold half the unauthenticated
DASHBOARD_IDLE_S = 2.0
SLACK_S = 2.0  # a loaded two-core machine


@pytest.fixture(scope="module")
def co(node, tmp_path_factory):
    proc = CoordinatorProcess(
        "--http-denial-window-s",
        str(WINDOW_S),
        "--http-denial-burst",
        str(BURST),
        "--http-unauthenticated-per-window",
        str(LIMIT),
        "--http-header-timeout-s",
        str(HEADER_S),
        "--http-idle-timeout-s",
        str(IDLE_S),
        "--http-handshake-timeout-s",
        str(HANDSHAKE_S),
        "--http-body-timeout-s",
        "1",
        "--http-max-connections",
        str(MAX_CONN),
        "--http-max-unauthenticated",
        str(MAX_UNAUTH),
        nodes=[node.address],
        name="ports",
        env={"STUDIOFLEET_COORDINATOR_DASHBOARD_IDLE_TIMEOUT_S": str(DASHBOARD_IDLE_S)},
    )
    with proc:
        proc.start(tmp_path_factory.mktemp("ports-logs"))
        proc.wait_serving()
        proc.wait_routable(1)
        proc.credentials("app", Role.APP)
        proc.credentials("operator", Role.OPERATOR)
        yield proc


def tls(co, name: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem"))
    if name:
        ctx.load_cert_chain(co.tls_dir / f"{name}.pem", co.tls_dir / f"{name}.key")
    return ctx


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def request(
    co,
    address: str,
    method: str,
    path: str,
    *,
    source: str,
    name: str | None = None,
    body: bytes | None = None,
    headers: dict | None = None,
) -> tuple[int, dict, bytes]:
    host, port = split(address)
    conn = http.client.HTTPSConnection(
        host, port, context=tls(co, name), source_address=(source, 0), timeout=10
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def closed(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes `sock` within `within_s` (reading whatever it sends)."""
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


def count_closed(socks: list, within_s: float) -> int:
    """How many of `socks` the server closes within `within_s` (all waited on together)."""
    left, shut = set(socks), 0
    deadline = time.monotonic() + within_s
    while left and (wait := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select(list(left), [], [], wait)
        for s in readable:
            left.discard(s)
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data:
                left.add(s)  # bytes, not the end: keep waiting
            else:
                shut += 1
    return shut


def denials(co, source: str) -> list[dict]:
    return [
        r
        for r in query(co.audit_dir)
        if r.get("outcome") == "denied" and r.get("peer", "").startswith(f"http:{source}")
    ]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout_s}s")
        time.sleep(0.05)


# -- finding 3: denials carry the peer, are aggregated per source, and are rate limited ----


@pytest.mark.parametrize(
    "port,path,source", [("http", "/metrics", "127.0.0.11"), ("api", "/v1/models", "127.0.0.12")]
)
def test_unauthenticated_floods_are_aggregated_per_source_and_answered_429(co, port, path, source):
    address = co.http_address if port == "http" else co.openai_address
    sent = 4 * LIMIT
    answers = [request(co, address, "GET", path, source=source) for _ in range(sent)]
    statuses = [a[0] for a in answers]
    assert statuses == [401] * LIMIT + [429] * (sent - LIMIT), statuses
    wait = int(answers[-1][1]["Retry-After"])
    assert 1 <= wait <= WINDOW_S + 1
    # A valid credential from the same address still works (the limit is on attempts without one).
    assert request(co, address, "GET", path, source=source, name="operator")[0] == 200

    # At most BURST records one by one (with the peer's address), then one per kind when the
    # window ends, with the count: every attempt accounted for, and far fewer records.
    records = wait_for(
        lambda: (rs := denials(co, source)) and sum(r.get("count", 1) for r in rs) == sent and rs,
        WINDOW_S * 3 + SLACK_S,
        "the window's aggregate records",
    )
    single = [r for r in records if "count" not in r]
    grouped = [r for r in records if "count" in r]
    assert len(single) == BURST and all(r["peer"].startswith(f"http:{source}:") for r in single)
    assert {(r["code"], r["count"]) for r in grouped} == {
        ("UNAUTHENTICATED", LIMIT - BURST),
        ("RESOURCE_EXHAUSTED", sent - LIMIT),
    }
    assert all(r["peer"] == f"http:{source}" and r["window_s"] == WINDOW_S for r in grouped)
    # After the window the address may try again (and is told 401, not 429).
    assert request(co, address, "GET", path, source=source)[0] == 401


# -- finding 5: slow and idle clients are closed, the caps hold, gRPC keeps serving -------


def test_idle_and_slow_header_connections_are_closed_on_both_ports(co):
    for address in (co.http_address, co.openai_address):
        host, port = split(address)
        idle = tls(co).wrap_socket(
            socket.create_connection((host, port), source_address=("127.0.0.41", 0)),
            server_hostname=host,
        )
        start = time.monotonic()
        assert closed(idle, HEADER_S + SLACK_S), (
            f"{address}: an idle connection after the handshake stays open"
        )
        assert time.monotonic() - start >= HEADER_S * 0.8

        slow = tls(co).wrap_socket(
            socket.create_connection((host, port), source_address=("127.0.0.42", 0)),
            server_hostname=host,
        )
        line = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200
        start, cut = time.monotonic(), False
        for byte in line:  # one header byte every 0.2 s: never a whole header
            try:
                slow.sendall(bytes([byte]))
            except (ConnectionError, ssl.SSLError, OSError):
                cut = True
                break
            if closed(slow, 0.2):
                cut = True
                break
            if time.monotonic() - start > HEADER_S + SLACK_S:
                break
        assert cut, f"{address}: a header sent a byte at a time is never cut off"

        # A kept-alive connection is closed after IDLE_S without a next request.
        conn = http.client.HTTPSConnection(
            host, port, context=tls(co, "operator"), source_address=("127.0.0.43", 0), timeout=10
        )
        conn.request("GET", "/metrics" if address == co.http_address else "/v1/models")
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 200 and not reply.will_close
        assert closed(conn.sock, IDLE_S + SLACK_S), (
            f"{address}: an idle kept-alive connection stays open"
        )
        conn.close()


def test_connection_caps_hold_and_grpc_serves_through_a_flood_at_a_low_file_limit(co):
    if not hasattr(resource, "prlimit"):
        pytest.skip("needs Linux prlimit to lower the coordinator's file limit")
    pid = co.proc.pid
    host, port = split(co.http_address)

    # One source holds at most half the unauthenticated slots; the rest are closed at once.
    socks = {
        src: [socket.create_connection((host, port), source_address=(src, 0)) for _ in range(10)]
        for src in ("127.0.0.21", "127.0.0.22")
    }
    try:
        for src, held in socks.items():
            assert count_closed(held, 0.5) == 10 - MAX_UNAUTH // 2, (
                f"{src}: the per-source share did not hold"
            )
        # Both sources together fill the port's unauthenticated cap: a third is refused.
        third = socket.create_connection((host, port), source_address=("127.0.0.23", 0))
        assert count_closed([third], 1.0) == 1, "a connection over the unauthenticated cap was kept"
        third.close()
    finally:
        for held in socks.values():
            for s in held:
                s.close()

    # With the file limit lowered near what the coordinator already holds, a flood of idle
    # connections to both HTTP ports does not starve the gRPC port.
    nofile = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 48, nofile[1]))
    flood = []
    try:
        for address in (co.http_address, co.openai_address):
            h, p = split(address)
            for i in range(150):
                try:
                    flood.append(
                        socket.create_connection(
                            (h, p), source_address=(f"127.0.1.{i % 50 + 1}", 0), timeout=5
                        )
                    )
                except OSError:
                    pass  # the backlog is full: the kernel refuses; nothing reached the process
        channel = co.dial("app", Role.APP)  # a new connection to the gRPC port, under the flood
        try:
            out = collect(
                inference_pb2_grpc.InferenceStub(channel),
                build_request(prompt="Note:", max_tokens=4, request_id="under-http-flood"),
                timeout_s=30,
            )
            assert out.final is not None and out.final.usage.completion_tokens > 0
        finally:
            channel.close()
        assert len(os.listdir(f"/proc/{pid}/fd")) <= in_use + 2 * MAX_UNAUTH + 10
    finally:
        for s in flood:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, nofile)
    # Once the flood is gone, an authorised HTTPS request gets through again.
    wait_for(lambda: _ok(co), HANDSHAKE_S + SLACK_S, "an HTTPS request after the flood")


def _ok(co) -> bool:
    try:
        return (
            request(co, co.http_address, "GET", "/metrics", source="127.0.0.24", name="operator")[0]
            == 200
        )
    except (ConnectionError, ssl.SSLError, OSError):
        return False


def test_a_body_that_never_arrives_gets_408(co):
    status, headers, body = request(
        co,
        co.openai_address,
        "POST",
        "/v1/chat/completions",
        source="127.0.0.44",
        name="app",
        body=b'{"model"',
        headers={"Content-Length": "500", "Content-Type": "application/json"},
    )
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"


# -- finding 13: the dashboard's background poll does not keep a session alive -----------


def test_background_polls_do_not_extend_a_dashboard_session(co):
    from tests.test_dashboard import link

    def session(url: str) -> str:
        status, _, headers = co.http_get(
            url.split(co.http_address, 1)[1], None, follow_redirects=False
        )
        assert status == 303
        return headers["Set-Cookie"].split(";", 1)[0]

    links = link(co), link(co)  # (fleetctl takes a while: both links first, then both sessions)
    start = time.monotonic()
    polled, used = session(links[0]), session(links[1])
    while time.monotonic() - start < DASHBOARD_IDLE_S + SLACK_S:
        background = co.http_get(
            "/api/snapshot", None, headers={"Cookie": polled, "X-StudioFleet-Background": "1"}
        )
        active = co.http_get("/api/snapshot", None, headers={"Cookie": used})
        assert active[0] == 200, "a user's requests keep the session"
        if background[0] == 401:
            break
        time.sleep(0.25)  # the dashboard's poll period, shortened
    else:
        raise AssertionError("background polls kept an unattended dashboard session alive")
    assert time.monotonic() - start >= DASHBOARD_IDLE_S * 0.8
    js = (ROOT / "coordinator" / "static" / "dashboard.js").read_text()
    assert '"X-StudioFleet-Background"' in js and '"1"' in js


# -- findings 18 and 7: X-Request-Id is checked before any use ---------------------------


@pytest.mark.parametrize("raw", ["has space", "a=b", "caf\u00e9-\u00fc", "x" * 200])
def test_invalid_request_ids_are_refused_audited_and_never_echoed(co, raw):
    host, port = split(co.openai_address)
    conn = http.client.HTTPSConnection(
        host, port, context=tls(co, "app"), source_address=("127.0.0.45", 0), timeout=10
    )
    body = json.dumps(
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("X-Request-Id", raw.encode("utf-8"))
    conn.endheaders(body)
    reply = conn.getresponse()
    answer = reply.read()
    conn.close()
    assert reply.status == 400 and json.loads(answer)["error"]["param"] == "X-Request-Id"
    rid = reply.getheader("X-Request-Id")
    assert rid and rid.startswith("req-") and rid in json.loads(answer)["error"]["message"]
    record = wait_for(
        lambda: [r for r in query(co.audit_dir, request_id=rid)], 5, "the refusal's audit record"
    )
    assert record[0]["outcome"] == "rejected" and record[0]["code"] == "INVALID_ARGUMENT"
    needle = raw.encode("utf-8")
    everything = co.stderr().encode() + b"".join(
        p.read_bytes() for p in co.audit_dir.glob("*") if p.is_file()
    )
    everything += b"".join(p.read_bytes() for p in co.state_db.parent.glob(co.state_db.name + "*"))
    assert needle not in everything and raw.encode("unicode_escape") not in everything
