"""Issue 19 #7: no caller-supplied value is ever echoed. A canary goes into every field of
every interface (each gRPC GenerateRequest field, metadata, every front-door JSON field and
header, JSON schemas, template names and versions, variable keys, model names), valid and
invalid; afterwards no log, audit record, request-log row, metric or error message holds it.
(X-Request-Id is the HTTP ports' part of the issue, tested with them.)"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys

import grpc
import httpx2

from cluster.api import inference_pb2, inference_pb2_grpc
from cluster.client import build_request
from cluster.localfleet import HARNESS_NODE_CALLER, HARNESS_OPERATOR
from cluster.security.identity import Role
from tests.adversarial.test_validation_limits import issue_token
from tests.procs import ROOT

CANARY = "Quixbottom Farnsworthy-Zebulon"  # a synthetic patient name
TOKEN = "QuixbottomFarnsworthy"  # ... and one that passes an id's alphabet
WORD = "Quixbottom"  # ... and the parts a message might keep
NEEDLES = (CANARY, WORD, WORD.lower(), WORD.upper(), "Farnsworthy", "Zebulon")
M = "tiny-qwen2"


def _req(**kw) -> inference_pb2.GenerateRequest:
    kw.setdefault("max_tokens", 3)
    if not any(k in kw for k in ("prompt", "messages", "template")):
        kw["prompt"] = "Synthetic visit."
    return build_request(**kw)


def _set(req: inference_pb2.GenerateRequest, **fields) -> inference_pb2.GenerateRequest:
    for k, v in fields.items():
        setattr(req, k, v)
    return req


def _schemas() -> list[str]:
    """The canary everywhere a schema can carry text, in valid and invalid schemas."""
    c = CANARY
    obj = {"type": "object", "properties": {c: {"type": "string", "maxLength": 5}}, "required": [c]}
    return [
        json.dumps(s)
        for s in (
            obj,  # a property name (valid)
            {"type": "string", "description": c, "title": c},  # annotations (valid)
            {"type": "string", "enum": [c]},
            {"const": c},  # values (valid)
            {"type": c},
            {"type": "object", "properties": {c: {"type": "strin"}}},  # meta-schema errors
            {"type": "string", "pattern": f"{c}(("},
            {"type": "string", "pattern": f"(?<={c})x"},  # regex errors
            {"type": "string", "format": c},  # an unknown format
            {"$ref": f"#/$defs/{c}"},
            {"type": "object", "properties": {"a": {"$ref": f"#/{c}"}}},  # bad refs
            {"type": "string", "minLength": c},
            {"type": "integer", "minimum": 5, "maximum": 1, "description": c},
            {c: {c: c}},  # unknown keywords
        )
    ] + [
        f'{{"{c}": ',
        json.dumps(c),
        json.dumps([c]),  # not JSON / not an object
        '{"type":"array","items":' * 40 + json.dumps({"enum": [c]}) + "}" * 40,
        '{"type":"array","items":' * 400 + json.dumps({"enum": [c]}) + "}" * 400,
    ]  # nested too deep


def grpc_requests() -> list[tuple[inference_pb2.GenerateRequest, tuple]]:
    """(request, metadata): the canary in each field in turn, the rest of the request valid."""
    c = CANARY
    reqs = [
        _req(request_id=c),
        _req(request_id=c * 20),
        _set(_req(), model=c),
        _set(_req(), model=c * 20),
        _set(_req(), require_weights_digest=c),
        _set(_req(), require_weights_digest="sha256:" + c),
        _set(_req(), require_weights_digest="sha256:" + TOKEN),
        _set(_req(), model=TOKEN),
        _req(messages=[(TOKEN, "hello")]),
        _req(template=TOKEN, variables={"transcript": "x"}),
        _req(
            template="soap-note", template_version="qwen2/" + TOKEN, variables={"transcript": "x"}
        ),
        _req(template="soap-note", variables={TOKEN: "x"}),
        _req(note_template=TOKEN),
        _req(json_schema=json.dumps({"type": "string", "format": TOKEN})),
        _req(json_schema=json.dumps({"type": "object", "properties": {TOKEN: {"type": "strin"}}})),
        _req(session_key=c),
        _req(session_key=c * 20),
        _req(prompt=c),
        _req(prompt=c * 40_000),
        _req(messages=[(c, "hello")]),
        _req(messages=[("user", c)]),
        _req(messages=[("system", c), ("user", c)]),
        _req(stop=[c[:20]]),
        _req(stop=[c * 4]),
        _req(stop=[c[:20]] * 40),
        _req(template=c, variables={"transcript": "x"}),
        _req(template=c * 500, variables={"transcript": "x"}),
        _req(template="soap-note", template_version=c, variables={"transcript": "x"}),
        _req(template="soap-note", template_version="qwen2/" + c, variables={"transcript": "x"}),
        _req(template="soap-note", template_version=c + "/v1", variables={"transcript": "x"}),
        _req(template="soap-note", variables={c: "x"}),
        _req(template="soap-note", variables={"transcript": "x", c: "y"}),
        _req(template="soap-note", variables={c * 10: "x"}),
        _req(template="soap-note", variables={"transcript": c}),
        _req(template="soap-note", variables={"transcript": "  "}, session_key=c),
        _req(note_template=c),
        _req(note_template=c * 10),
        _req(prompt=c, max_tokens=0),
        _req(prompt=c, temperature=-1.0, request_id="ok-id"),
    ]
    reqs += [_req(json_schema=s) for s in _schemas()]
    out = [(r, ()) for r in reqs]
    out.append((_req(), (("x-canary", c), ("x-" + WORD.lower(), "1"))))  # metadata keys and values
    return out


def http_calls(key: str) -> list[tuple[str, str, object, dict]]:
    """(method, path, body, headers) with the canary in each field and header in turn."""
    c = CANARY
    auth = {"Authorization": f"Bearer {key}"}

    def chat(**kw):
        return {
            "model": M,
            "messages": [{"role": "user", "content": "Synthetic visit."}],
            "max_tokens": 3,
            **kw,
        }

    bodies = [
        chat(model=c),
        chat(model=c * 20),
        chat(**{c: 1}),
        chat(**{c * 10: c}),
        chat(temprature=c),
        chat(messages=[{"role": c, "content": "x"}]),
        chat(messages=[{"role": "user", "content": c}]),
        chat(messages=[{"role": "user", "content": [{"type": c, "text": c}]}]),
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": c}]}]),
        chat(messages=[{"role": "user", "content": c, c: c}]),
        chat(messages=[c]),
        chat(messages=c),
        chat(stop=c[:20]),
        chat(stop=[c * 4]),
        chat(stop=c * 1),
        chat(prompt_cache_key=c),
        chat(prompt_cache_key=c * 20),
        chat(user=c),
        chat(metadata={c: c}),
        chat(seed=c),
        chat(temperature=c),
        chat(max_tokens=c),
        chat(n=c),
        chat(stream=c),
        chat(stream=True, stream_options={c: True}),
        chat(stream_options=c),
        chat(service_tier=c),
        chat(response_format=c),
        chat(response_format={"type": c}),
        chat(response_format={"type": "json_schema", "json_schema": {"name": c}}),
        chat(response_format={"type": "json_schema", "json_schema": {"name": c, "schema": c}}),
        chat(tools=[{"type": "function", "function": {"name": c}}]),
        chat(logit_bias={c: 1}),
        chat(max_tokens=3, max_completion_tokens=c),
        chat(model=TOKEN),
        chat(**{TOKEN: 1}),
        chat(messages=[{"role": TOKEN, "content": "x"}]),
        chat(response_format={"type": TOKEN}),
        chat(service_tier=TOKEN),
    ]
    bodies += [
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": c, "schema": json.loads(s)},
            }
        )
        for s in _schemas()
        if s.startswith("{") and s.endswith("}") and s.count("{") < 50
    ]
    calls = [("POST", "/chat/completions", b, auth) for b in bodies]
    for body in (
        {"model": M, "prompt": c, "max_tokens": 3},
        {"model": M, "prompt": [c, c], "max_tokens": 3},
        {"model": c, "prompt": "x"},
        {"model": M, "prompt": "x", "messages": c, "suffix": c},
        {"model": M, "prompt": "x", "echo": c},
    ):
        calls.append(("POST", "/completions", body, auth))
    raw = f'{{"model": "{c}", "messages": [{{"role": "user", "content": "{c}'.encode()  # not JSON
    calls += [
        ("POST", "/chat/completions", raw, auth),
        (
            "POST",
            "/chat/completions",
            chat(),
            {**auth, "User-Agent": c, "X-Canary": c, c.replace(" ", "-"): c},
        ),
        ("POST", "/chat/completions", chat(), {"Authorization": f"Bearer {c}"}),
        (
            "POST",
            "/chat/completions",
            chat(),
            {"Authorization": f"Bearer sft_{c.replace(' ', '_')}"},
        ),
        ("POST", "/chat/completions", chat(), {"Authorization": c}),
        ("POST", "/chat/completions", chat(), {**auth, "Content-Type": c}),
        ("GET", f"/models/{c}", None, auth),
        ("GET", f"/models/{c}", None, {}),
        ("GET", f"/models/{TOKEN}", None, auth),
        ("POST", "/chat/completions", chat(), {"Authorization": TOKEN}),
        ("GET", f"/{c}", None, auth),
        ("POST", f"/chat/{c}", chat(), auth),
        ("GET", f"/models?{c}={c}", None, auth),
    ]
    return calls


def test_a_canary_in_every_field_of_every_interface_appears_nowhere(
    node, start_coordinator, tmp_path
):
    co = start_coordinator(nodes=[node.address])
    co.wait_routable(1)
    key = issue_token(co, "canary-app")
    answers: list[str] = []  # what callers were told: errors and (for HTTP) whole answers
    node_stub = inference_pb2_grpc.InferenceStub(node.dial(HARNESS_NODE_CALLER, Role.COORDINATOR))
    outcomes = {"ok": 0, "refused": 0}
    for req, metadata in grpc_requests():
        for stub in (co.inference, node_stub):
            try:
                for _chunk in stub.Generate(req, timeout=60, metadata=metadata or None):
                    pass
                outcomes["ok"] += 1
            except grpc.RpcError as err:
                assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), err
                outcomes["refused"] += 1
                answers.append(f"{err.code().name}: {err.details()} {err.debug_error_string()}")
    assert outcomes["ok"] >= 10 and outcomes["refused"] >= 40, outcomes
    statuses = []
    context = ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem"))
    with httpx2.Client(verify=context, timeout=60) as http:
        for method, path, body, headers in http_calls(key):
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            r = http.request(
                method,
                co.openai_base_url + path,
                content=data,
                headers={"Content-Type": "application/json", **headers},
            )
            assert r.status_code < 500, (path, r.status_code, r.text[:300])
            statuses.append(r.status_code)
            answers.append(f"{r.status_code} {r.headers} {r.text}")
    assert statuses.count(200) >= 3 and sum(s in (400, 401, 404) for s in statuses) >= 30, statuses
    status, metrics, _ = co.http_get("/metrics")
    assert status == 200
    haystack = {"answers": "\n".join(answers).encode(), "/metrics": metrics}
    for cmd in (
        ["audit", "query", str(co.audit_dir), "-o", "json"],
        ["requests", "-c", co.address, "--tls-name", HARNESS_OPERATOR, "-o", "json"],
        ["events", "-c", co.address, "--tls-name", HARNESS_OPERATOR, "-o", "json"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "cluster.fleetctl.app", *cmd],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        haystack[f"fleetctl {cmd[0]}"] = out.stdout.encode()
    assert haystack["fleetctl audit"].count(b'"request"') >= 60
    co.stop()  # its last log lines, audit records and request-log rows are on disk
    haystack.update({str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()})
    haystack[str(node.stderr_path)] = node.stderr_path.read_bytes()
    assert len(haystack) >= 8  # logs, audit files, the state database, answers, metrics, listings
    for where, blob in haystack.items():
        text = blob.decode("utf-8", "replace")
        for needle in NEEDLES:
            assert needle not in text, f"{needle!r} found in {where}: ...{_around(text, needle)}..."


def _around(text: str, needle: str) -> str:
    i = text.index(needle)
    return text[max(0, i - 200) : i + 100]
