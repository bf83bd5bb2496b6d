"""The audit chain through a real coordinator: what a record holds, that it is down before
the caller sees the end, that a crash loses none of them, and that no PHI gets anywhere."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import sys
import threading
import time

import grpc

from cluster.audit import query, verify
from cluster.audit.keys import default_key_dir
from cluster.client import FleetClient, build_request
from cluster.client.errors import FleetError
from cluster.security.identity import Role
from coordinator.audit_trail import canonical_input
from tests.fleet_helpers import collect, in_threads, note
from tests.procs import CoordinatorProcess


def _records(co, **kw) -> list[dict]:
    return list(query(co.audit_dir, **kw))


def _digest(co, data: bytes) -> str:
    key = (default_key_dir(co.audit_dir) / "hmac.key").read_bytes()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def test_a_request_record_names_who_what_where_and_how_it_ended(start_node, start_coordinator):
    a, b = start_node(node_id="aud-a"), start_node(node_id="aud-b")
    co = start_coordinator(nodes=[a.address, b.address])
    co.wait_routable(2)
    req = note(1, 6, request_id="aud-1")
    s = collect(co.inference, req)
    assert s.final is not None
    [rec] = _records(co, request_id="aud-1")
    assert rec["type"] == "request" and rec["action"] == "inference.generate"
    assert (rec["caller"], rec["role"]) == ("app", "app") and rec["peer"].startswith(
        "ipv4:127.0.0.1"
    )
    assert (rec["outcome"], rec["code"], rec["finish_reason"]) == ("completed", "OK", "length")
    assert rec["completion_tokens"] == 6 and rec["prompt_tokens"] == s.final.usage.prompt_tokens
    assert rec["nodes"] == [
        {"node": s.final.node_id, "model": "tiny-qwen2", "digest": s.final.model.weights_digest}
    ]
    assert rec["latency_ms"] > 0 and rec["time"]
    # Keyed digests an auditor holding the key can recompute; never a bare hash.
    assert rec["prompt_digest"].endswith(_digest(co, canonical_input(req)))
    assert rec["completion_digest"].endswith(_digest(co, s.text.encode()))
    assert hashlib.sha256(s.text.encode()).hexdigest() not in json.dumps(rec)
    # Refusals are records too: bad input, and a caller without the role.
    bad = collect(co.inference, build_request(prompt="x", max_tokens=0, request_id="aud-bad"))
    assert bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    [rej] = _records(co, request_id="aud-bad")
    assert (rej["outcome"], rej["code"]) == ("rejected", "INVALID_ARGUMENT")
    with co.dial("operator", Role.OPERATOR) as ch:
        from cluster.api import inference_pb2_grpc

        assert (
            collect(inference_pb2_grpc.InferenceStub(ch), note(2, 2)).error.code()
            == grpc.StatusCode.PERMISSION_DENIED
        )
    denied = [r for r in _records(co, caller="operator") if r.get("outcome") == "denied"]
    assert denied and denied[0]["code"] == "PERMISSION_DENIED"
    assert any(r["action"] == "fleet.list_nodes" for r in _records(co, caller="operator"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "audit",
            "query",
            str(co.audit_dir),
            "--request-id",
            "aud-1",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and json.loads(out.stdout.splitlines()[0])["request_id"] == "aud-1"
    co.stop()  # a clean stop writes a final checkpoint
    report = verify(co.audit_dir)
    assert report.ok and report.checkpoints >= 1, report


def test_a_failover_is_recorded_with_every_hop(start_node, start_coordinator):
    nodes = [start_node(node_id=f"hop-{i}") for i in range(2)]
    co = start_coordinator(nodes=[n.address for n in nodes])
    co.wait_routable(2)
    live = {}

    def run(i):
        return collect(
            co.inference,
            note(i, 200, request_id=f"hop-req-{i}"),
            on_chunk=lambda s, i=i: live.__setitem__(i, s),
        )

    results, threads = in_threads(run, list(range(4)))
    deadline = time.monotonic() + 30
    while len(live) < 4 or any(len(s.ids) < 5 for s in live.values()):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim = next(n for n in nodes if any(s.final is None for s in live.values()))
    victim.proc.send_signal(signal.SIGKILL)
    for t in threads:
        t.join(120)
    moved = [r for r in results if r.final is not None and r.final.failovers]
    assert moved, "no stream was on the killed node"
    for s in moved:
        [rec] = _records(co, request_id=s.request.request_id)
        assert rec["failovers"] == s.final.failovers and [h["node"] for h in rec["nodes"]] == list(
            s.final.nodes
        )
        assert rec["outcome"] == "completed" and rec["completion_tokens"] == 200


def test_sigkill_during_200_requests_loses_no_acknowledged_record(start_node, tmp_path):
    nodes = [start_node("--max-running", "16", node_id=f"crash-{i}") for i in range(2)]
    audit = tmp_path / "audit"
    co = CoordinatorProcess(nodes=[n.address for n in nodes], name="crash-co", audit_dir=audit)
    co.start(tmp_path / "logs")
    co.wait_routable(2)
    finished: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    with FleetClient(
        co.address, max_attempts=1, server_name="crash-co.coordinator.studiofleet"
    ) as client:

        def one(i):
            try:
                r = client.generate(
                    note(i, 8, request_id=f"crash-{i:03d}", temperature=0.7), timeout_s=60
                )
            except FleetError:
                return
            with lock:
                finished.append(r.request_id)  # the final chunk reached this caller
                if len(finished) >= 80:
                    enough.set()

        results, threads = in_threads(
            lambda chunk: [one(i) for i in chunk], [range(k, 200, 16) for k in range(16)]
        )
        assert enough.wait(120), f"only {len(finished)} requests finished"
        co.proc.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(120)
    co.proc.wait(10)
    acknowledged = set(finished)
    assert 80 <= len(acknowledged) < 200
    report = verify(audit)
    assert report.ok, report.first_bad
    recorded = {
        r["request_id"] for r in query(audit, type_="request") if r.get("outcome") == "completed"
    }
    assert acknowledged <= recorded, f"missing records: {sorted(acknowledged - recorded)[:5]}"
    # The coordinator comes back on the same chain: recovered, linked, verifying.
    again = CoordinatorProcess(nodes=[n.address for n in nodes], name="crash-co", audit_dir=audit)
    with again:
        again.start(tmp_path / "logs2")
        again.wait_routable(2)
        assert collect(again.inference, note(999, 2)).final is not None
    after = verify(audit)
    assert after.ok and not after.warnings and after.records > report.records


CANARY = "Zelda Quixbottom DOB 1911-02-29 MRN QX-4471"


def test_a_canary_phi_string_appears_nowhere(start_node, start_coordinator, tmp_path):
    """100 requests carry a synthetic patient name in every content field, good and bad,
    some through a failover. Afterwards no log, event, status, audit record or error
    message the product wrote contains it."""
    nodes = [start_node(node_id=f"canary-{i}") for i in range(2)]
    co = start_coordinator(nodes=[n.address for n in nodes])
    co.wait_routable(2)
    good = [
        build_request(
            messages=[("system", f"Patient {CANARY}."), ("user", f"Note for {CANARY}, visit {i}.")],
            max_tokens=6,
            request_id=f"can-{i}",
            stop=[f"{CANARY[:10]}"],
            session_key=CANARY,
        )
        for i in range(50)
    ]
    good += [
        build_request(prompt=f"{CANARY} raw {i}", max_tokens=6, request_id=f"can-raw-{i}")
        for i in range(20)
    ]
    bad = [
        build_request(messages=[(CANARY, "hello")], max_tokens=5, request_id="can-bad-role"),
        build_request(prompt=CANARY, max_tokens=0, request_id="can-bad-max"),
        build_request(prompt=CANARY, max_tokens=5, stop=[CANARY * 20], request_id="can-bad-stop"),
        build_request(prompt=CANARY, max_tokens=5, stop=[CANARY] * 50, request_id="can-bad-stops"),
        build_request(prompt=CANARY * 400, max_tokens=5, request_id="can-bad-long"),
        build_request(prompt=CANARY, max_tokens=5, temperature=-1.0, request_id="can-bad-temp"),
        build_request(
            prompt=CANARY, max_tokens=5, request_id=CANARY
        ),  # not an id: refused, not echoed
        build_request(prompt=CANARY, max_tokens=5, request_id="can-bad-prefix"),
    ]
    bad[-1].prefix_token_ids.extend([7, 10**6])  # outside the vocabulary
    bad = (bad * 3)[:20]
    errors: list[str] = []
    for r in good + bad:
        s = collect(co.inference, r)
        if s.error is not None:
            errors.append(
                f"{s.error.code().name}: {s.error.details()} {s.error.debug_error_string()}"
            )
    assert len(errors) >= 20
    # Ten more, with the node serving them killed mid-stream (failover).
    live = {}
    fo = [
        build_request(
            messages=[("user", f"{CANARY} long note {i}")],
            max_tokens=150,
            temperature=0.0,
            request_id=f"can-fo-{i}",
        )
        for i in range(10)
    ]
    results, threads = in_threads(
        lambda r: collect(
            co.inference, r, on_chunk=lambda s: live.__setitem__(s.request.request_id, s)
        ),
        fo,
    )
    deadline = time.monotonic() + 30
    while len(live) < 10 or any(len(s.ids) < 3 for s in live.values()):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    nodes[0].proc.send_signal(signal.SIGKILL)
    for t in threads:
        t.join(120)
    for s in results:
        if s.error is not None:
            errors.append(f"{s.error.code().name}: {s.error.details()}")
    assert any(s.final is not None and s.final.failovers for s in results)
    admin = {}
    for cmd in (["events", "-o", "json"], ["nodes", "-o", "json"]):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "cluster.fleetctl.app",
                *cmd,
                "-c",
                co.address,
                "--tls-name",
                "operator",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        admin[f"fleetctl {cmd[0]}"] = out.stdout.encode()
    assert b"failover" in admin["fleetctl events"].lower()
    co.stop()
    for n in nodes:
        n.stop()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    haystack = {str(p): p.read_bytes() for p in written if "model" not in p.parts}
    haystack["client errors"] = "\n".join(errors).encode()
    haystack.update(admin)
    listing = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "audit",
            "query",
            str(co.audit_dir),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    haystack["audit query"] = listing.stdout.encode()
    assert listing.stdout.count('"request"') >= 100
    needles = [CANARY, CANARY[:10], "Quixbottom", CANARY.lower()]
    for where, blob in haystack.items():
        text = blob.decode("utf-8", "replace")
        for needle in needles:
            assert needle not in text, f"{needle!r} found in {where}"
    assert len(haystack) >= 6  # node and coordinator logs, audit files, errors, query output
