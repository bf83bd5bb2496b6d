"""Issue 19 #8, #12, #16: every caller string has a length cap (coordinator and node), any
failure to check a request is INVALID_ARGUMENT / 400 with an audit record, and a new JSON
schema is compiled off the coordinator's event loop."""

from __future__ import annotations

import json
import sqlite3
import ssl
import subprocess
import sys
import threading
import time

import grpc
import httpx2
import psutil
import pytest

from cluster.api import inference_pb2
from cluster.audit import query
from cluster.client import build_request
from cluster.localfleet import HARNESS_OPERATOR
from cluster.quality.notes import MAX_SCHEMA_BYTES
from cluster.quality.prompts import MAX_VARIABLE_CHARS
from cluster.validation import (
    MAX_DIGEST_LEN,
    MAX_MESSAGES,
    MAX_MODEL_ID_LEN,
    MAX_NAME_LEN,
    MAX_REQUEST_ID_LEN,
    MAX_SESSION_KEY_LEN,
    MAX_STOP_LEN,
    MAX_TEXT_CHARS,
    MAX_VARIABLES,
)
from tests.fleet_helpers import collect, serving_coordinator
from tests.procs import ROOT

M = "tiny-qwen2"
Q = "Q"  # the filler of every over-long value: no message may contain a run of it


@pytest.fixture(scope="module")
def co(node, tmp_path_factory):
    with serving_coordinator(node, tmp_path_factory.mktemp("limits-logs"), "limits") as proc:
        yield proc


def issue_token(co, name: str) -> str:
    """An app API token from `fleetctl tokens issue` (the operator's certificate)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.fleetctl.app",
            "tokens",
            "issue",
            name,
            "--coordinator",
            co.address,
            "--tls-name",
            HARNESS_OPERATOR,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _template(name="soap-note", version="", variables=None):
    return build_request(
        template=name,
        template_version=version,
        variables={"transcript": "Synthetic visit."} if variables is None else variables,
    )


def _over(cap: int) -> str:
    return Q * (cap + 1)


# (the field a message must name, its cap, a request with that field one past its cap)
OVER = [
    (
        "request_id",
        MAX_REQUEST_ID_LEN,
        lambda: build_request(prompt="hi", max_tokens=2, request_id=_over(MAX_REQUEST_ID_LEN)),
    ),
    (
        "model",
        MAX_MODEL_ID_LEN,
        lambda: _with(build_request(prompt="hi", max_tokens=2), model=_over(MAX_MODEL_ID_LEN)),
    ),
    (
        "require_weights_digest",
        MAX_DIGEST_LEN,
        lambda: _with(
            build_request(prompt="hi", max_tokens=2), require_weights_digest=_over(MAX_DIGEST_LEN)
        ),
    ),
    (
        "session_key",
        MAX_SESSION_KEY_LEN,
        lambda: build_request(prompt="hi", max_tokens=2, session_key=_over(MAX_SESSION_KEY_LEN)),
    ),
    ("prompt", MAX_TEXT_CHARS, lambda: build_request(prompt=_over(MAX_TEXT_CHARS), max_tokens=2)),
    (
        "chat.messages' contents",
        MAX_TEXT_CHARS,
        lambda: build_request(messages=[("user", Q * (MAX_TEXT_CHARS // 2 + 1))] * 2, max_tokens=2),
    ),
    (
        "chat.messages",
        MAX_MESSAGES,
        lambda: build_request(messages=[("user", "hi")] * (MAX_MESSAGES + 1), max_tokens=2),
    ),
    (
        "template.name",
        MAX_NAME_LEN,
        lambda: _template(name=Q * (1 << 20)),
    ),  # the 1 MiB name of the report
    ("template.version", MAX_NAME_LEN, lambda: _template(version=_over(MAX_NAME_LEN))),
    (
        "template.variables",
        MAX_VARIABLES,
        lambda: _template(variables={f"v{i}": "x" for i in range(MAX_VARIABLES + 1)}),
    ),
    (
        "template.variables key #1",
        MAX_NAME_LEN,
        lambda: _template(variables={_over(MAX_NAME_LEN): "x"}),
    ),
    (
        "template.variables value #1",
        MAX_VARIABLE_CHARS,
        lambda: _template(variables={"transcript": _over(MAX_VARIABLE_CHARS)}),
    ),
    (
        "output_format.note_template",
        MAX_NAME_LEN,
        lambda: build_request(prompt="hi", max_tokens=2, note_template=_over(MAX_NAME_LEN)),
    ),
    (
        "output_format.json_schema",
        MAX_SCHEMA_BYTES // 1024,
        lambda: build_request(
            prompt="hi",
            max_tokens=2,
            json_schema=json.dumps({"description": _over(MAX_SCHEMA_BYTES)}),
        ),
    ),
    (
        "stop[0]",
        MAX_STOP_LEN,
        lambda: build_request(prompt="hi", max_tokens=2, stop=[_over(MAX_STOP_LEN)]),
    ),
]


def _with(req: inference_pb2.GenerateRequest, **fields) -> inference_pb2.GenerateRequest:
    for k, v in fields.items():
        setattr(req, k, v)
    return req


def _refused_naming(stream, field: str, cap: int) -> None:
    assert stream.error is not None, f"{field}: served"
    assert stream.error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, stream.error)
    details = stream.error.details()
    assert field in details and str(cap) in details, (field, details)
    assert Q * 8 not in details, f"{field}: the value is echoed: {details[:200]}"


@pytest.mark.parametrize("field, cap, make", OVER, ids=[o[0] for o in OVER])
def test_every_string_field_has_a_cap_on_the_coordinator(co, field, cap, make):
    _refused_naming(collect(co.inference, make(), timeout_s=30), field, cap)


@pytest.mark.usefixtures("as_node_caller")
@pytest.mark.parametrize("field, cap, make", OVER, ids=[o[0] for o in OVER])
def test_every_string_field_has_a_cap_on_the_node(node, field, cap, make):
    _refused_naming(collect(node.inference, make(), timeout_s=30), field, cap)


def test_huge_template_names_cost_no_log_or_database_space(co, node):
    """The report's 3 MiB template names: ten 1 MiB ones add almost nothing to the
    coordinator's log or database, and the request log's template column says `unknown`."""
    before = co.stderr_path.stat().st_size
    for i in range(10):
        req = _template(name=Q * (1 << 20))
        req.request_id = f"huge-name-{i}"
        assert (
            collect(co.inference, req, timeout_s=30).error.code()
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    unknown = _template(name="no-such-template")
    unknown.request_id = "unknown-name"
    assert (
        collect(co.inference, unknown, timeout_s=30).error.code()
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    known = _template(version="qwen2/v99")
    known.request_id = "unknown-version"
    assert (
        collect(co.inference, known, timeout_s=30).error.code() == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert co.stderr_path.stat().st_size - before < 64 * 1024
    deadline = time.monotonic() + 10
    while True:  # the request log writes on its own thread
        with sqlite3.connect(f"file:{co.state_db}?mode=ro", uri=True) as db:
            rows = dict(
                db.execute(
                    "SELECT request_id, template FROM requests WHERE request_id IN "
                    "('huge-name-9', 'unknown-name', 'unknown-version')"
                ).fetchall()
            )
            biggest = db.execute("SELECT max(length(template)) FROM requests").fetchone()[0] or 0
        if len(rows) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows == {
        "huge-name-9": "unknown",
        "unknown-name": "unknown",
        "unknown-version": "soap-note@unknown",
    }
    assert biggest <= 2 * MAX_NAME_LEN + 1


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_a_deeply_nested_schema_is_invalid_argument_and_audited(co, node):
    """900 levels: readable by json (and the front door's body parser), but jsonschema's
    recursion used to escape validation as UNKNOWN (HTTP 500) with no audit record."""
    deep = json.dumps(_nested(450))  # 900 JSON levels
    s = collect(
        co.inference,
        build_request(prompt="hi", max_tokens=2, json_schema=deep, request_id="deep-grpc"),
        timeout_s=30,
    )
    assert s.error is not None and s.error.code() == grpc.StatusCode.INVALID_ARGUMENT, s.error
    assert "nested" in s.error.details()
    key = issue_token(co, "deep-app")
    body = {
        "model": M,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "deep", "schema": _nested(450)},
        },
    }
    with httpx2.Client(
        verify=ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem")), timeout=60
    ) as http:
        r = http.post(
            co.openai_base_url + "/chat/completions",
            content=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {key}",
                "X-Request-Id": "deep-http",
            },
        )
    assert r.status_code == 400, r.text
    assert "nested" in r.json()["error"]["message"]
    for rid in ("deep-grpc", "deep-http"):
        [rec] = [r for r in query(co.audit_dir, request_id=rid)]
        assert (rec["outcome"], rec["code"]) == ("rejected", "INVALID_ARGUMENT"), rec


def _big_schema(tag: int) -> str:
    """~58 KiB of valid schema, distinct per tag (no cache hit): ~0.4 s of checking."""
    props = {
        f"f{tag}_{i}": {"type": "string", "maxLength": 50, "pattern": "^[a-z]+$"}
        for i in range(780)
    }
    text = json.dumps({"type": "object", "properties": props, "required": list(props)[:20]})
    assert len(text) < MAX_SCHEMA_BYTES
    return text


def test_schema_compilation_does_not_block_the_coordinators_event_loop(co):
    """Six new ~58 KiB schemas (~0.4 s of checking each) are checked by the schema worker, a
    child process: the coordinator's own process (its event loop) spends a fraction of that
    CPU time, where checking on the loop cost it all. CPU time, not latency: a loaded test
    machine slows every wall clock."""
    coordinator = psutil.Process(co.proc.pid)

    def cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def workers() -> dict[int, psutil.Process]:
        return {
            c.pid: c
            for c in coordinator.children()
            if "cluster.quality.schema_child" in c.cmdline()
        }

    schemas = [_big_schema(int(time.time() * 1000) % 10**6 * 10 + i) for i in range(6)]
    before = {pid: cpu(w) for pid, w in workers().items()}
    own_before = cpu(coordinator)
    results = []
    threads = [
        threading.Thread(
            target=lambda s=s: results.append(
                collect(
                    co.inference,
                    build_request(prompt="hi", max_tokens=2, json_schema=s),
                    timeout_s=60,
                )
            )
        )
        for s in schemas
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    own = cpu(coordinator) - own_before
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    now = workers()
    assert now, "no schema worker process: the schemas were checked inside the coordinator"
    checking = sum(cpu(w) - before.get(pid, 0.0) for pid, w in now.items())
    assert checking > 1.0, f"the worker spent only {checking:.2f} s checking six new schemas"
    assert own < checking / 3, (
        f"the coordinator spent {own:.2f} s of CPU, the schema worker {checking:.2f} s"
    )


def test_a_schema_check_past_its_time_limit_is_killed():
    """The time limit is real: the schema worker (a child process) is killed, and the next
    schema gets a fresh worker."""
    import asyncio

    from cluster.quality.schema_worker import CheckTimeout, SchemaChecker

    async def run():
        checker = SchemaChecker(timeout_s=30)
        assert await checker.check('{"type": "object"}') == ""  # the worker started, and answers
        worker = checker._proc
        checker.timeout_s = 0.05
        with pytest.raises(CheckTimeout):
            await checker.check(_big_schema(1))  # ~0.4 s of checking
        assert await asyncio.wait_for(worker.wait(), 5) != 0  # killed, not left running
        checker.timeout_s = 30
        assert "not a valid JSON Schema" in await checker.check('{"type": "strin"}')
        assert checker._proc is not worker
        await checker.aclose()

    asyncio.run(run())
