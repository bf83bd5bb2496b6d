"""The upstream node's openai kind against a real OpenAI-compatible server: a second
coordinator's OpenAI front door (over TLS, with a bearer token from `fleetctl tokens`)
in front of a real MLX node. Chat, streaming, schema-constrained notes via
`response_format`, 429 with the server's retry hint, 401 on a bad or revoked key, and
the coordinator never resuming a stream by a `remote:` digest."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
import time

import grpc
import pytest

from cluster.api import common_pb2, inference_pb2
from cluster.client import build_request
from cluster.localfleet import HARNESS_OPERATOR
from cluster.quality import notes
from tests.fleet_helpers import collect, in_threads
from tests.procs import ROOT, CoordinatorProcess, NodeProcess

pytestmark = pytest.mark.usefixtures("as_node_caller")

SERVED = "tiny-qwen2"  # the front door's model id: the tiny model's directory name
NOTE = (
    ("system", "You write clinical notes."),
    ("user", "Synthetic visit: patient Qwerty Zxcv, 61, cough for two weeks, no fever."),
)


def fleetctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.fleetctl.app", *args, "--tls-name", HARNESS_OPERATOR],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def issue(co, name: str) -> str:
    out = fleetctl("tokens", "issue", name, "--coordinator", co.address)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def front(node, tmp_path_factory):
    """The remote endpoint: a coordinator's OpenAI front door over the module's MLX node,
    one request at a time per caller (a second concurrent one gets 429), answering 503
    after 3 s when no node can take a request."""
    co = CoordinatorProcess(
        "--max-concurrent-per-caller",
        "1",
        "--queue-max-wait-s",
        "3",
        nodes=[node.address],
        name="front",
    )
    with co:
        co.start(tmp_path_factory.mktemp("front-logs"))
        co.wait_serving()
        co.wait_routable(1)
        assert co.openai_scheme == "https"
        yield co


@contextlib.contextmanager
def cordoned(front):
    """The front door's only node cordoned (no request of it can run) for the block."""
    assert fleetctl("cordon", "shared-node", "--coordinator", front.address).returncode == 0
    try:
        deadline = time.monotonic() + 30
        while any(n.routable for n in front.nodes().nodes):
            assert time.monotonic() < deadline, "the cordon did not reach the front door"
            time.sleep(0.05)
        yield
    finally:
        assert fleetctl("uncordon", "shared-node", "--coordinator", front.address).returncode == 0
        front.wait_routable(1)


def _args(co, key_file, *extra: str) -> tuple[str, ...]:
    return (
        "--engine",
        "upstream",
        "--upstream-kind",
        "openai",
        "--upstream-url",
        f"https://{co.openai_address}",
        "--upstream-model",
        SERVED,
        "--upstream-key-file",
        str(key_file),
        "--upstream-ca-file",
        str(co.tls_dir / "ca.pem"),
        *extra,
    )


@pytest.fixture(scope="module")
def upstream(front, tiny_model, tmp_path_factory):
    """An openai-kind upstream node in front of the front door: (node, key file)."""
    directory = tmp_path_factory.mktemp("openai-upstream")
    key_file = directory / "key"
    key = issue(front, "upstream-node")
    key_file.write_text(key + "\n")
    proc = NodeProcess(tiny_model, *_args(front, key_file, "--phi-allowed"), node_id="openai-node")
    with proc:
        proc.start(directory / "logs")
        proc.wait_serving(60)
        yield proc, key_file
        proc.stop()
        log = proc.stderr()
        assert key not in log and "Qwerty" not in log  # no key, no prompt in the node's log


def _run(node, req):
    chunks = list(node.inference.Generate(req, timeout=120))
    final = chunks[-1].final
    assert chunks[-1].HasField("final")
    return chunks, final


def test_chat_through_the_front_door_gives_the_mlx_nodes_text(upstream, node, front):
    proc, _ = upstream
    req = build_request(messages=NOTE, max_tokens=24, temperature=0.0, request_id="oa-chat")
    chunks, final = _run(proc, req)
    text = "".join(c.text for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    want = "".join(c.text for c in node.inference.Generate(req, timeout=60))
    assert text == want and text  # greedy on the same node behind the front door
    assert final.usage.completion_tokens == len(ids) <= 24  # counted with the local tokenizer
    assert final.model.engine == "upstream"
    assert final.model.weights_digest == f"remote:{front.openai_address}/{SERVED}"
    st = proc.status()
    assert st.lifecycle == common_pb2.LIFECYCLE_READY
    assert "upstream openai" in st.model.engine_version


def _sampled(request_id: str, **kw) -> inference_pb2.GenerateRequest:
    """A seeded sampled request that runs to max_tokens: the same text on every run."""
    req = build_request(
        messages=NOTE, max_tokens=200, temperature=1.0, seed=5, request_id=request_id, **kw
    )
    req.sampling.ignore_eos = True
    return req


def test_streams_arrive_in_pieces_and_stop_sequences_hold(upstream):
    proc, _ = upstream
    chunks, final = _run(proc, _sampled("oa-stream"))
    assert len([c for c in chunks if c.token_ids]) > 1, "the text came in one piece"
    text = "".join(c.text for c in chunks)
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == sum(len(c.token_ids) for c in chunks) <= 200
    # A stop sequence from the middle of that text: the node cuts before it.
    at = len(text) // 2
    while not text[at : at + 4].strip() or text.index(text[at : at + 4]) != at:
        at += 1
    chunks, final = _run(proc, _sampled("oa-stop", stop=[text[at : at + 4]]))
    assert "".join(c.text for c in chunks) == text[:at]
    assert final.finish_reason == inference_pb2.FINISH_REASON_STOP


def test_a_schema_constrained_note_goes_as_response_format(upstream):
    """The endpoint enforces the schema (its node's grammar, here): a random model sampling
    at temperature 1 gives valid JSON only if the constraint reached it."""
    import jsonschema

    from tests.test_structured_output import MIXED, _req

    proc, _ = upstream
    for req in (_req(3, json_schema=MIXED), _req(99, note_template="soap-brief")):
        chunks, final = _run(proc, req)
        text = "".join(c.text for c in chunks)
        assert final.structured.valid, (final.structured.rule, final.structured.path)
        assert json.loads(final.structured.json) == json.loads(text)
    jsonschema.validate(json.loads(text), notes.template_spec("soap-brief").schema)
    assert final.structured.format == "soap-brief" and final.quality.parts


def test_prefix_token_ids_are_refused(upstream):
    proc, _ = upstream
    req = build_request(messages=NOTE, max_tokens=4, request_id="oa-prefix")
    req.prefix_token_ids.extend([5, 6, 7])
    with pytest.raises(grpc.RpcError) as err:
        _run(proc, req)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "prefix_token_ids" in err.value.details()


def test_a_429_from_the_endpoint_is_resource_exhausted_with_its_retry_hint(upstream, front):
    """The front door lets a caller run one request at a time. With its only node cordoned,
    a request sent with the node's token waits in the front door's queue, holding that
    caller's slot: the node's own request is then the caller's second, answered 429."""
    import threading

    import httpx2

    from tests.test_metrics import scrape, value

    proc, key_file = upstream
    body = {"model": SERVED, "messages": [{"role": r, "content": c} for r, c in NOTE]}
    tls = ssl.create_default_context(cafile=str(front.tls_dir / "ca.pem"))
    held: list = []

    def hold() -> None:
        with httpx2.Client(verify=tls, timeout=60) as http:
            held.append(
                http.post(
                    front.openai_base_url + "/chat/completions",
                    json={**body, "max_tokens": 4},
                    headers={"Authorization": f"Bearer {key_file.read_text().strip()}"},
                )
            )

    waiting = threading.Thread(target=hold)
    with cordoned(front):
        waiting.start()
        deadline = time.monotonic() + 30
        while value(scrape(front), "studiofleet_requests_queued") < 1:
            assert time.monotonic() < deadline, "the held request never queued"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            _run(proc, build_request(messages=NOTE, max_tokens=4, request_id="oa-429"))
    waiting.join(60)
    assert held and held[0].status_code in (200, 503)  # ran once the node was back, or gave up
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = err.value.details()
    assert "rate-limiting (HTTP 429); retry after 0.5s" in details, details
    assert dict(err.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "500"
    st = proc.status()
    assert "HTTP 429" in st.engine_server.last_exit and st.lifecycle == common_pb2.LIFECYCLE_READY
    ok, _ = _run(proc, build_request(messages=NOTE, max_tokens=4, request_id="oa-after-429"))
    assert ok


def test_a_5xx_from_the_endpoint_is_unavailable_without_its_text(upstream, front):
    """No node behind the front door can take the request: it answers 503 after its queue
    wait; the node ends the call UNAVAILABLE (the coordinator's passive health counts it)."""
    proc, _ = upstream
    with cordoned(front):
        with pytest.raises(grpc.RpcError) as err:
            _run(proc, build_request(messages=NOTE, max_tokens=4, request_id="oa-503"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details()
    assert (
        "the upstream endpoint failed (HTTP 503" in details and "retry on another node" in details
    )
    assert "READY" not in details  # the endpoint's own message is never quoted
    assert "HTTP 503" in proc.status().engine_server.last_exit


def test_a_revoked_key_is_a_401_naming_the_key_file_and_a_new_key_is_picked_up(upstream, front):
    proc, key_file = upstream
    old = key_file.read_text().strip()
    token_id = old.split(".")[0]
    assert fleetctl("tokens", "revoke", token_id, "--coordinator", front.address).returncode == 0
    with pytest.raises(grpc.RpcError) as err:
        _run(proc, build_request(messages=NOTE, max_tokens=4, request_id="oa-401"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "HTTP 401" in err.value.details() and str(key_file) in err.value.details()
    assert old not in err.value.details()
    key_file.write_text(issue(front, "upstream-node-2") + "\n")  # read again after a 401
    ok, final = _run(proc, build_request(messages=NOTE, max_tokens=4, request_id="oa-new-key"))
    assert (
        final.usage.completion_tokens > 0 and proc.status().lifecycle == common_pb2.LIFECYCLE_READY
    )


def test_a_bad_key_file_keeps_the_node_loading_until_it_is_fixed(front, tiny_model, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sft_notatoken.synthetic-wrong-secret\n")
    with NodeProcess(
        tiny_model, *_args(front, key_file, "--phi-allowed"), node_id="oa-bad-key"
    ) as proc:
        proc.start(tmp_path / "logs")
        st, _ = proc.wait_until(
            lambda s: "HTTP 401" in s.lifecycle_reason, timeout_s=30, what="a 401 reason"
        )
        assert st.lifecycle == common_pb2.LIFECYCLE_LOADING
        assert str(key_file) in st.lifecycle_reason
        assert "synthetic-wrong-secret" not in st.lifecycle_reason
        key_file.write_text(issue(front, "fixed-node") + "\n")
        proc.wait_serving(60)  # the file is read again on the next try
        proc.stop()
        assert "synthetic-wrong-secret" not in proc.stderr()


def test_refuses_a_declared_digest(tiny_model, tmp_path, front):
    key_file = tmp_path / "key"
    key_file.write_text("sft_x.synthetic\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.main",
            "--model",
            str(tiny_model),
            "--listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--state-dir",
            str(tmp_path / "state"),
            *_args(front, key_file, "--phi-allowed"),
            "--upstream-digest",
            "sha256:" + "0" * 64,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--upstream-digest" in out.stderr and "remote:" in out.stderr


def test_a_stream_on_a_remote_digest_is_never_resumed_by_digest(
    front, tiny_model, tmp_path, start_coordinator
):
    """Three openai-kind nodes in front of one endpoint share their remote: digest. One is
    killed mid-stream: without allow_restart the stream ends ABORTED although two nodes
    with its digest are left (a hosted API cannot continue token ids); with it, a second
    kill starts the stream over on the last node."""
    nodes = []
    try:
        for i in range(3):
            key_file = tmp_path / f"key{i}"
            key_file.write_text(issue(front, f"trio-{i}") + "\n")
            nodes.append(
                NodeProcess(
                    tiny_model, *_args(front, key_file, "--phi-allowed"), node_id=f"oa-trio-{i}"
                )
            )
            nodes[-1].start(tmp_path / f"logs{i}")
        for proc in nodes:
            proc.wait_serving(60)
        co = start_coordinator(nodes=[n.address for n in nodes], name="over-remote")
        co.wait_routable(3)
        alive = list(nodes)
        for allow in (False, True):
            s, victim = _kill_mid_stream(co, alive, allow)
            alive.remove(victim)
            if not allow:
                assert s.error is not None and s.error.code() == grpc.StatusCode.ABORTED
                assert "allow_restart" in s.error.details(), s.error.details()
                assert "prefix_token_ids" not in s.error.details()  # no resume was tried
                assert "came from a hosted API (remote:" in s.error.details()
                co.wait_routable(2)
            else:
                assert s.error is None, s.error
                assert s.final.restarts == 1 and list(s.final.nodes)[-1] == alive[0].node_id
    finally:
        for proc in nodes:
            proc.stop()


def _kill_mid_stream(co, nodes, allow: bool):
    live = [None]
    req = build_request(
        messages=NOTE, max_tokens=1500, request_id=f"remote-{allow}", allow_restart=allow
    )
    req.sampling.ignore_eos = True  # sent on to the endpoint: the stream runs to the kill
    results, threads = in_threads(
        lambda _: collect(co.inference, req, on_chunk=lambda s: live.__setitem__(0, s)), [0]
    )
    deadline = time.monotonic() + 60
    while live[0] is None or len(live[0].ids) < 10:
        assert time.monotonic() < deadline, f"the stream did not start: {results[0]}"
        time.sleep(0.01)
    busy = [n.status.node_id for n in co.nodes().nodes if n.in_flight]
    victim = next(n for n in nodes if n.node_id in busy)
    victim.proc.kill()
    threads[0].join(120)
    return results[0], victim


# -- the text-to-tokens reader, without sockets ------------------------------------------


@pytest.fixture(scope="module")
def codec(tiny_model):
    from mlx_lm.utils import load_tokenizer

    from node_agent.engines.upstream_openai import codec

    return codec(load_tokenizer(tiny_model))


@pytest.mark.parametrize("spans", [True, False], ids=["offsets", "decoded-prefix"])
def test_streamed_text_becomes_ids_that_decode_to_it(codec, spans):
    import random

    from node_agent.engines.upstream_openai import TextTokens

    encode, decode, offsets = codec
    rng = random.Random(7)
    for _ in range(50):
        text = decode([rng.randrange(0, 500) for _ in range(80)])
        tokens, ids, at, early = TextTokens(encode, decode, offsets if spans else None), [], 0, 0
        while at < len(text):
            n = rng.randint(1, 6)
            got = tokens.feed(text[at : at + n])
            ids, at = ids + got, at + n
            early += len(got) if at < len(text) else 0
        ids += tokens.flush()
        assert decode(ids) == decode(encode(text))  # the text, up to the tokenizer's normalization
        assert early > 0  # sent as it came, not all at the end


def test_the_reader_cuts_at_max_tokens_and_names_no_text(codec):
    from node_agent.engine import EventKind
    from node_agent.engines.upstream_openai import TextReader, TextTokens

    def chunk(content=None, finish=None):
        return {"choices": [{"delta": {"content": content}, "finish_reason": finish}]}

    reader = TextReader(TextTokens(*codec), max_tokens=5)
    events = []
    for word in ["Synthetic", " assessment", " and", " plan", " text", " more", " words"]:
        got, done, failure = reader.read(chunk(word))
        events += got
        if done:
            break
    assert done and failure is None and reader.cut
    assert [e.finish for e in events][-1] == "length" and len(events) == 5
    assert all(e.kind is EventKind.TOKEN for e in events)

    reader = TextReader(TextTokens(*codec), max_tokens=50)
    assert reader.read({"choices": [], "usage": {"completion_tokens": 3}}) == ([], False, None)
    got, done, _ = reader.read(chunk("Plan: rest.", "stop"))
    assert done and got[-1].finish == "stop" and not reader.cut
    _, done, failure = TextReader(TextTokens(*codec), 50).read(chunk(None, "content_filter"))
    assert done and failure == "the upstream endpoint ended the request (content_filter)"
    _, done, failure = TextReader(TextTokens(*codec), 50).read(
        {"error": {"type": "BadRequestError", "message": "synthetic text echoed back"}}
    )
    assert done and failure == "the upstream endpoint failed the request, BadRequestError"
