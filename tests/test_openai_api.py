"""The OpenAI-compatible front door, driven by the official `openai` SDK (sync, async,
streaming) and raw HTTP, over TLS with tokens from `fleetctl tokens`, against a real
coordinator and real node agents in their own processes."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time

import grpc
import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.audit import query
from cluster.client import FleetClient
from cluster.localfleet import HARNESS_OPERATOR
from tests.procs import ROOT

M = "tiny-qwen2"  # the model id: the tiny model's directory name
SECRET_NOTE = (
    "Synthetic patient Zyxwv Qutsr, 54, follow-up for hypertension."  # must never reach a log
)


def fleetctl(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "cluster.fleetctl.app", *args, "--tls-name", HARNESS_OPERATOR],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def issue(co, name: str, *extra: str) -> str:
    out = fleetctl("tokens", "issue", name, "--coordinator", co.address, *extra)
    assert out.returncode == 0, out.stderr
    assert "shown only now" in out.stderr
    return out.stdout.strip()


def tls(co) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(co.tls_dir / "ca.pem"))


def sdk(co, key: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=co.openai_base_url,
        api_key=key,
        http_client=openai.DefaultHttpx2Client(verify=tls(co)),
        **kw,
    )


def post(co, path: str, body, key: str = "", headers=None) -> httpx2.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx2.Client(verify=tls(co), timeout=60) as http:
        return http.post(
            co.openai_base_url + path,
            content=data,
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {key}"} if key else {}),
                **(headers or {}),
            },
        )


@pytest.fixture(scope="module")
def front(node, tmp_path_factory):
    """A coordinator over the module's node, and an app token from fleetctl."""
    from tests.procs import CoordinatorProcess

    co = CoordinatorProcess(nodes=[node.address], name="front")
    with co:
        co.start(tmp_path_factory.mktemp("front-logs"))
        co.wait_serving()
        co.wait_routable(1)
        assert co.openai_scheme == "https"
        co.key = issue(co, "notes-app")
        yield co


def chat(model: str, **kw) -> dict:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "You write clinical notes."},
            {"role": "user", "content": SECRET_NOTE},
        ],
        **kw,
    }


def test_sdk_chat_completions_and_models_take_the_grpc_path(front):
    client = sdk(front, front.key)
    models = client.models.list()
    assert [m.id for m in models.data] == [M]
    assert models.data[0].model_extra["studiofleet"]["ready"] == 1
    assert client.models.retrieve(M).id == M

    r = client.chat.completions.create(**chat(M, max_tokens=24, seed=11, temperature=0.7))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert (
        r.choices[0].finish_reason in ("length", "stop")
        and r.choices[0].message.role == "assistant"
    )
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint.startswith("fp_")
    facts = r.model_extra["studiofleet"]
    assert facts["nodes"] == ["shared-node"] and facts["seed"] == 11

    # The same request over gRPC (same seed, same node) gives the same text: one path.
    with FleetClient(front.address) as grpc_client:
        same = grpc_client.generate(
            messages=[("system", "You write clinical notes."), ("user", SECRET_NOTE)],
            max_tokens=24,
            seed=11,
            temperature=0.7,
        )
    assert same.text == r.choices[0].message.content

    # max_completion_tokens, stop, and the legacy completions endpoint.
    r2 = client.chat.completions.create(**chat(M, max_completion_tokens=5))
    assert r2.usage.completion_tokens <= 5
    c = client.completions.create(model=M, prompt="Assessment:", max_tokens=8, seed=2)
    assert c.object == "text_completion" and c.usage.completion_tokens <= 8 and c.choices[0].text

    # Audited and logged like any request, as the token's holder, with no content.
    rid = facts["request_id"]
    records = list(query(front.audit_dir, request_id=rid))
    assert records and records[-1]["caller"] == "notes-app" and records[-1]["role"] == "app"
    assert "token=sft_" in records[-1]["peer"]
    logs = front.stderr() + "".join(p.read_text() for p in front.audit_dir.glob("*") if p.is_file())
    assert "Zyxwv" not in logs and front.key.split(".")[1] not in logs
    ends = [
        json.loads(line)
        for line in front.stderr().splitlines()
        if f'"request_id": "{rid}"' in line and '"request.end"' in line
    ]
    assert (
        len(ends) == 1
        and ends[0]["outcome"] == "completed"
        and "outcome=completed" in ends[0]["msg"]
    )


def test_sdk_streams_sync_and_async_with_usage_last(front):
    client = sdk(front, front.key)
    whole = client.chat.completions.create(**chat(M, max_tokens=30, seed=5, temperature=0.9))
    stream = client.chat.completions.create(
        **chat(M, max_tokens=30, seed=5, temperature=0.9),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(
            base_url=front.openai_base_url,
            api_key=front.key,
            http_client=openai.DefaultAsyncHttpx2Client(verify=tls(front)),
        )

        async def one(i: int) -> str:
            if i % 2:
                r = await aclient.chat.completions.create(**chat(M, max_tokens=12, seed=i))
                return r.choices[0].message.content
            s = await aclient.completions.create(
                model=M, prompt=f"Plan {i}:", max_tokens=12, seed=i, stream=True
            )
            return "".join([c.choices[0].text async for c in s if c.choices])

        try:
            return await asyncio.gather(*(one(i) for i in range(6)))
        finally:
            await aclient.close()

    texts = asyncio.run(run())
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)


def test_response_format_maps_onto_structured_output(front):
    client = sdk(front, front.key)
    schema = {
        "type": "object",
        "properties": {"urgent": {"type": "boolean"}},
        "required": ["urgent"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        **chat(M, max_tokens=20),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "triage", "schema": schema, "strict": True},
        },
    )
    assert isinstance(json.loads(r.choices[0].message.content)["urgent"], bool)
    facts = r.model_extra["studiofleet"]
    assert facts["structured"]["valid"] is True and facts["structured"]["format"].startswith(
        "json_schema:"
    )
    assert 0 <= facts["quality"]["total"] <= 1

    # A note template shipped with StudioFleet, by name: its schema and quality score.
    note = client.chat.completions.create(
        **chat(M, max_tokens=40),
        response_format={"type": "json_schema", "json_schema": {"name": "soap-brief"}},
    )
    assert note.model_extra["studiofleet"]["structured"]["format"] == "soap-brief"

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            **chat(M, max_tokens=5),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}},
            },
        )
    assert "schema" in bad.value.message


def test_bad_requests_get_clear_4xx_and_leave_the_server_serving(front):
    key = front.key
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (
            chat(M, temprature=0.3),
            400,
            "Unrecognized request argument supplied (the body's key #3)",
        ),
        (chat(M, n=3), 400, "n must be 1"),
        (
            chat(M, tools=[{"type": "function", "function": {"name": "f"}}]),
            400,
            "tools is not supported",
        ),
        (chat(M, temperature=7), 400, "temperature must be"),
        (chat(M, max_tokens=0), 400, "max_tokens must be"),
        (chat(M, max_tokens=5, max_completion_tokens=6), 400, "not both"),
        (chat(M, stop=[1, 2]), 400, "stop must be"),
        (chat(M, seed=-1), 400, "seed must be"),
        (chat(M, stream_options={"include_usage": True}), 400, "only allowed with stream"),
        ({"model": M, "messages": [{"role": "tool", "content": "x"}]}, 400, "role must be"),
        (
            {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "text part",
        ),
        ({"model": M, "messages": []}, 400, "messages must be"),
        (chat("gpt-4o"), 404, "does not exist"),
        (b"x" * ((4 << 20) + 1), 413, "larger than"),
        (
            b'{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "\\udc80"}]}',
            400,
            "surrogate",
        ),
    ]
    for body, status, words in cases:
        r = post(front, "/chat/completions", body, key)
        assert r.status_code == status, (words, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["type"], (words, err)
        assert "Zyxwv" not in r.text
    bad_id = post(
        front,
        "/chat/completions",
        chat(M, max_tokens=2),
        key,
        headers={"X-Request-Id": "no spaces"},
    )
    assert bad_id.status_code == 400 and "X-Request-Id" in bad_id.json()["error"]["message"]
    assert bad_id.headers["X-Request-Id"].startswith("req-")  # an invalid id is never echoed
    odd_id = post(
        front,
        "/chat/completions",
        chat(M, max_tokens=2),
        key,
        headers={"X-Request-Id": "ü".encode()},
    )
    assert odd_id.status_code == 400 and "X-Request-Id" in odd_id.json()["error"]["message"]
    refused = post(
        front,
        "/chat/completions",
        chat("gpt-4o", max_tokens=2),
        key,
        headers={"X-Request-Id": "refused-1"},
    )
    assert refused.status_code == 404 and refused.headers["X-Request-Id"] == "refused-1"
    record = [r for r in query(front.audit_dir, request_id="refused-1")]
    assert [(r["outcome"], r["code"], r["caller"]) for r in record] == [
        ("rejected", "NOT_FOUND", "notes-app")
    ]
    assert post(front, "/embeddings", {"model": M}, key).status_code == 404
    with httpx2.Client(verify=tls(front)) as http:
        assert (
            http.get(
                front.openai_base_url + "/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
            ).status_code
            == 405
        )
    ok = post(
        front,
        "/chat/completions",
        chat(M, max_tokens=3),
        key,
        headers={"X-Request-Id": "after-bad-input"},
    )
    assert ok.status_code == 200 and ok.headers["X-Request-Id"] == "after-bad-input"


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = [
    "messages",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "response_format",
    "max_tokens",
    "max_completion_tokens",
    "stream_options",
    "logprobs",
    "service_tier",
    "prompt_cache_key",
    "user",
]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4))
def test_fuzzed_bodies_never_reach_a_5xx(front, fields):
    body = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **fields}
    r = post(front, "/chat/completions", body, front.key)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"]


def test_tokens_roles_revocation_and_client_certificates(front):
    anon = post(front, "/chat/completions", chat(M, max_tokens=2))
    assert anon.status_code == 401 and "fleetctl tokens issue" in anon.json()["error"]["message"]
    assert anon.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        sdk(front, "sk-not-ours").chat.completions.create(**chat(M, max_tokens=2))
    forged = front.key[:-4] + "AAAA"
    assert post(front, "/chat/completions", chat(M, max_tokens=2), forged).status_code == 401

    monitor = issue(front, "scraper", "--role", "monitor", "--ttl", "1h")
    assert sdk(front, monitor).models.list().data[0].id == M
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk(front, monitor).chat.completions.create(**chat(M, max_tokens=2))
    assert "allowed: app" in denied.value.message

    temp = issue(front, "short-lived")
    assert (
        sdk(front, temp).chat.completions.create(**chat(M, max_tokens=2)).usage.completion_tokens
        >= 1
    )
    listed = fleetctl("tokens", "list", "--coordinator", front.address, "-o", "json")
    token_id = next(t["id"] for t in json.loads(listed.stdout) if t["name"] == "short-lived")
    assert temp not in listed.stdout and temp.split(".")[1] not in listed.stdout
    revoked = fleetctl(
        "tokens", "revoke", token_id, "--coordinator", front.address, "--reason", "rotated"
    )
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError) as gone:
        sdk(front, temp, max_retries=0).chat.completions.create(**chat(M, max_tokens=2))
    assert "revoked" in gone.value.message
    assert (
        fleetctl(
            "tokens", "issue", "x", "--role", "operator", "--coordinator", front.address
        ).returncode
        == 2
    )
    # Refusals are in the audit chain; issue and revoke are admin records; no secret anywhere.
    actions = [r.get("action") for r in query(front.audit_dir)]
    assert (
        "token.issue" in actions
        and "token.revoke" in actions
        and "http /v1/chat/completions" in actions
    )
    assert temp.split(".")[1] not in "".join(
        p.read_text() for p in front.audit_dir.glob("*") if p.is_file()
    )

    # An app's client certificate works without a token.
    ctx = tls(front)
    ctx.load_cert_chain(front.tls_dir / "app.pem", front.tls_dir / "app.key")
    with httpx2.Client(verify=ctx) as http:
        r = http.post(
            front.openai_base_url + "/completions",
            json={"model": M, "prompt": "S:", "max_tokens": 2},
        )
    assert r.status_code == 200, r.text


def test_a_client_that_disconnects_cancels_generation_on_the_node(front, node):
    before = node.status().load.requests_cancelled_total
    with httpx2.Client(verify=tls(front), timeout=60) as http:
        with http.stream(
            "POST",
            front.openai_base_url + "/chat/completions",
            json=chat(M, max_tokens=1500, stream=True),
            headers={"Authorization": f"Bearer {front.key}"},
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6))]
            assert any(line.startswith("data: ") for line in got)
    st_, _ = node.wait_until(
        lambda s: s.load.requests_cancelled_total > before and s.load.running == 0,
        timeout_s=10,
        what="the node cancelled the abandoned stream",
    )
    assert st_.load.requests_cancelled_total == before + 1


def test_busy_and_unavailable_answers_carry_their_status(node, start_coordinator):
    co = start_coordinator(
        "--max-concurrent-per-caller", "1", nodes=[node.address], name="front-busy"
    )
    co.wait_routable(1)
    key = issue(co, "busy-app")
    client = sdk(co, key, max_retries=0)
    hold = client.chat.completions.create(**chat(M, max_tokens=1500), stream=True)
    next(iter(hold))  # the first chunk: the caller's one slot is taken
    try:
        r = post(co, "/chat/completions", chat(M, max_tokens=2), key)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert r.headers["Retry-After"] == "1" and r.headers["retry-after-ms"] == "500"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**chat(M, max_tokens=2))
    finally:
        hold.close()
    # A cordoned fleet: the model is known, no node can take it -> 503 after the queue wait.
    assert (
        fleetctl(
            "cordon", "shared-node", "--coordinator", co.address, "--reason", "test"
        ).returncode
        == 0
    )
    try:
        co503 = start_coordinator(
            "--queue-max-wait-s", "0.5", nodes=[node.address], name="front503"
        )
        key503 = issue(co503, "app503")
        with httpx2.Client(verify=tls(co503)) as http:
            for _ in range(200):  # until the coordinator has read the node's status (cordoned)
                if http.get(
                    co503.openai_base_url + "/models", headers={"Authorization": f"Bearer {key503}"}
                ).json()["data"]:
                    break
                time.sleep(0.05)
        r = post(co503, "/chat/completions", chat(M, max_tokens=2), key503)
        assert r.status_code == 503 and "no READY node" in r.json()["error"]["message"], r.text
    finally:
        assert fleetctl("uncordon", "shared-node", "--coordinator", co.address).returncode == 0


def test_a_stream_whose_node_is_killed_completes_through_the_sdk(start_node, start_coordinator):
    nodes = [start_node(node_id=f"oa{i}") for i in range(2)]
    co = start_coordinator(nodes=[n.address for n in nodes], name="front-failover")
    co.wait_routable(2)
    client = sdk(co, issue(co, "failover-app"))
    body = chat(M, max_tokens=300, temperature=0)
    stream = client.chat.completions.create(**body, stream=True)
    text, victim, last = [], None, None
    for chunk in stream:
        last = chunk
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if victim is None and len(text) >= 10:
            busy = [n.status.node_id for n in co.nodes().nodes if n.in_flight]
            victim = next(n for n in nodes if n.node_id in busy)
            victim.proc.kill()
    facts = last.model_extra["studiofleet"]
    assert last.choices[0].finish_reason == "length" and facts["failovers"] == 1
    assert facts["nodes"][0] == victim.node_id and facts["nodes"][-1] != victim.node_id
    again = client.chat.completions.create(**body)  # uninterrupted, on the survivor
    assert "".join(text) == again.choices[0].message.content
    assert again.usage.completion_tokens == 300


def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_work(node, start_coordinator):
    co = start_coordinator(nodes=[node.address], name="front-stop")
    co.wait_routable(1)
    key = issue(co, "stop-app")
    stream = sdk(co, key, max_retries=0).chat.completions.create(
        **chat(M, max_tokens=400, temperature=0), stream=True
    )
    chunks = [next(iter(stream))]
    co.signal(signal.SIGTERM)
    chunks.extend(stream)  # the grace (30 s) covers it
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["studiofleet"]["nodes"] == ["shared-node"]
    assert co.wait_exit(30) == 0
    with pytest.raises(openai.APIConnectionError):
        sdk(co, key, max_retries=0).models.list()


def test_the_model_named_picks_the_nodes_that_serve_it(
    node, start_node, start_coordinator, tmp_path
):
    from cluster.client import build_request
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    other = start_node(
        node_id="other-model", model=make_tiny_model(tmp_path / "other-tiny", TinyModelSpec(seed=7))
    )
    co = start_coordinator(nodes=[node.address, other.address], name="front-models")
    co.wait_routable(2)
    client = sdk(co, issue(co, "models-app"))
    assert sorted(m.id for m in client.models.list().data) == ["other-tiny", M]
    for model, node_id in ((M, "shared-node"), ("other-tiny", "other-model")) * 3:
        r = client.chat.completions.create(**chat(model, max_tokens=2))
        assert r.model == model and r.model_extra["studiofleet"]["nodes"] == [node_id]
    # A node asked for a model it does not serve refuses (the coordinator routes around that).
    wrong = build_request(prompt="x", max_tokens=2)
    wrong.model = M
    with pytest.raises(grpc.RpcError) as refused:
        list(other.inference.Generate(wrong, timeout=30))
    assert (
        refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "serves model 'other-tiny'" in refused.value.details()
    )
