"""The upstream node type against a real remote vLLM endpoint (CPU build) with a bearer
key and TLS: one contract with the vLLM node type, and its refusals.

One vLLM server is started for the module (as a remote endpoint would be: `--api-key`,
`--ssl-keyfile/--ssl-certfile` from a CA made here) and shared by its tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.api import common_pb2, inference_pb2
from cluster.client import build_request
from node_agent.engines.vllm_server import CHILD_ENV, VllmServer, free_port
from tests.procs import NodeProcess
from tests.vllm_support import START_TIMEOUT_S, VLLM_ARGS, VLLM_ENV

pytestmark = [pytest.mark.usefixtures("as_node_caller"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SERVED = "tiny-remote"
KEY = "sk-synthetic-upstream-key-0123456789"  # synthetic; must never appear in output


def _tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def remote(tiny_model, vllm_python, tmp_path_factory):
    """A vLLM server with a key and TLS, as the remote endpoint: (url, ca.pem, key file)."""
    import json

    directory = tmp_path_factory.mktemp("upstream")
    ca, cert, key = _tls(directory)
    key_file = directory / "key"
    key_file.write_text(KEY + "\n")
    server = VllmServer(
        python=vllm_python,
        state_dir=directory,
        extra_args=[
            *VLLM_ARGS.split(),
            "--api-key",
            KEY,
            "--ssl-keyfile",
            str(key),
            "--ssl-certfile",
            str(cert),
        ],
    )
    server.port = free_port()
    context = (
        json.loads((tiny_model / "config.json").read_text()).get("max_position_embeddings") or 32768
    )
    cmd = server.command(tiny_model, SERVED, max_model_len=int(context), max_num_seqs=16)
    url = f"https://127.0.0.1:{server.port}"
    with open(directory / "vllm.log", "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env={**os.environ, **CHILD_ENV, **VLLM_ENV},
        )
    try:
        tls = ssl.create_default_context(cafile=str(ca))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (
                f"the vLLM server exited: {(directory / 'vllm.log').read_text()[-2000:]}"
            )
            try:
                with urllib.request.urlopen(f"{url}/health", context=tls, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the vLLM server did not answer /health in time"
            time.sleep(0.5)
        yield url, ca, key_file
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _upstream_args(url: str, ca: Path, key_file: Path, *extra: str) -> tuple[str, ...]:
    return (
        "--engine",
        "upstream",
        "--upstream-url",
        url,
        "--upstream-model",
        SERVED,
        "--upstream-key-file",
        str(key_file),
        "--upstream-ca-file",
        str(ca),
        *extra,
    )


@pytest.fixture(scope="module")
def upstream_node(tiny_model, remote, tmp_path_factory):
    url, ca, key_file = remote
    proc = NodeProcess(
        tiny_model, *_upstream_args(url, ca, key_file, "--phi-allowed"), node_id="upstream-node"
    )
    with proc:
        proc.start(tmp_path_factory.mktemp("upstream-logs"))
        proc.wait_serving(120)
        yield proc
        proc.stop()
        assert KEY not in proc.stderr()


def _run(node, req):
    ids, final = [], None
    for chunk in node.inference.Generate(req, timeout=120):
        ids.extend(chunk.token_ids)
        if chunk.HasField("final"):
            final = chunk.final
    assert final is not None
    return ids, final


@pytest.mark.parametrize(
    "sampling", [dict(temperature=0.0), dict(temperature=0.9, seed=1234)], ids=["greedy", "seeded"]
)
def test_tokens_equal_the_vllm_node_type_for_the_same_request(upstream_node, vllm_node, sampling):
    req = build_request(
        prompt="Synthetic visit summary:", max_tokens=24, request_id="same-tokens", **sampling
    )
    ids, final = _run(upstream_node, req)
    want, want_final = _run(vllm_node, req)
    assert ids == want and len(ids) > 0
    assert final.finish_reason == want_final.finish_reason
    assert upstream_node.status().model.weights_digest == vllm_node.status().model.weights_digest


def test_resume_with_prefix_token_ids_continues_exactly(upstream_node):
    full, _ = _run(
        upstream_node,
        build_request(prompt="Plan:", max_tokens=20, temperature=0.0, request_id="r1"),
    )
    assert len(full) == 20
    req = build_request(prompt="Plan:", max_tokens=12, temperature=0.0, request_id="r2")
    req.prefix_token_ids.extend(full[:8])
    rest, final = _run(upstream_node, req)
    assert rest == full[8:]
    assert final.usage.prefix_tokens == 8 and final.usage.completion_tokens == 12


def test_status_names_the_engine_and_the_endpoint(upstream_node, remote):
    st = upstream_node.status()
    assert st.lifecycle == common_pb2.LIFECYCLE_READY
    assert st.model.engine == "upstream" and remote[0] in st.model.engine_version
    # --model holds the endpoint's weights: they ran here and the endpoint's tokens matched.
    assert st.model.engine_version.endswith(", weights checked")
    assert st.engine_server.url == remote[0] and st.engine_server.pid == 0


def _refused(tiny_model, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
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
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_refuses_to_start_without_phi_allowed(tiny_model, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    out = _refused(tiny_model, tmp_path, *_upstream_args("https://127.0.0.1:9", key_file, key_file))
    assert out.returncode == 2, out.stderr
    assert "--phi-allowed" in out.stderr and "BAA" in out.stderr


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_refuses_to_start_with_an_unusable_key_file(tiny_model, tmp_path, case):
    key_file, ca = tmp_path / "key", tmp_path / "ca.pem"
    ca.write_text("unused: the key file is checked first\n")
    if case == "empty":
        key_file.write_text("\n")
    out = _refused(
        tiny_model, tmp_path, *_upstream_args("https://127.0.0.1:9", ca, key_file), "--phi-allowed"
    )
    assert out.returncode == 2, out.stderr
    assert "--upstream-key-file" in out.stderr and str(key_file) in out.stderr


def test_a_wrong_key_keeps_the_node_loading_naming_the_key_file(tiny_model, remote, tmp_path):
    url, ca, _ = remote
    wrong = tmp_path / "wrong-key"
    wrong.write_text("sk-synthetic-wrong-key")
    with NodeProcess(
        tiny_model, *_upstream_args(url, ca, wrong, "--phi-allowed"), node_id="wrong-key"
    ) as proc:
        proc.start(tmp_path / "logs")
        st, _ = proc.wait_until(
            lambda s: "HTTP 401" in s.lifecycle_reason, timeout_s=30, what="a 401 reason"
        )
        assert st.lifecycle == common_pb2.LIFECYCLE_LOADING
        assert (
            str(wrong) in st.lifecycle_reason
            and "sk-synthetic-wrong-key" not in st.lifecycle_reason
        )
        proc.stop()
        assert "sk-synthetic-wrong-key" not in proc.stderr()


def test_an_unreachable_url_keeps_the_node_loading_and_retrying(tiny_model, remote, tmp_path):
    _, ca, key_file = remote
    url = f"https://127.0.0.1:{free_port()}"
    with NodeProcess(
        tiny_model, *_upstream_args(url, ca, key_file, "--phi-allowed"), node_id="unreachable"
    ) as proc:
        proc.start(tmp_path / "logs")
        st, _ = proc.wait_until(
            lambda s: "(try 2)" in s.lifecycle_reason, timeout_s=30, what="a second try"
        )
        assert st.lifecycle == common_pb2.LIFECYCLE_LOADING
        assert "cannot be reached" in st.lifecycle_reason and url in st.lifecycle_reason
        assert proc.proc.poll() is None
        proc.stop()


class Gate:
    """A plain-HTTP proxy in front of the remote endpoint that can answer completions with
    an error status instead (what a rate-limited or failing upstream does)."""

    def __init__(self, target: str, ca: Path):
        import asyncio
        import threading

        self.target, self.ca = target, ca
        self.refuse: tuple[int, dict] | None = None
        self.drop = 0  # the next `drop` completions: connection closed, nothing answered
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(30), "the gate did not start"

    def _run(self) -> None:
        import asyncio

        from aiohttp import ClientSession, TCPConnector, web

        async def handle(request: web.Request) -> web.StreamResponse:
            if self.drop and request.path == "/v1/completions":
                self.drop -= 1  # what a keep-alive ending as the request arrives looks like
                await request.read()
                request.transport.close()
                return web.Response()  # never sent: the connection is gone
            if self.refuse is not None and request.path == "/v1/completions":
                status, headers = self.refuse
                return web.json_response(
                    {"error": {"type": "SyntheticError", "message": "synthetic"}},
                    status=status,
                    headers=headers,
                )
            async with self._session.request(
                request.method,
                self.target + request.path_qs,
                headers={k: v for k, v in request.headers.items() if k != "Host"},
                data=await request.read(),
            ) as r:
                out = web.StreamResponse(
                    status=r.status,
                    headers={"Content-Type": r.headers.get("Content-Type", "application/json")},
                )
                await out.prepare(request)
                async for block in r.content.iter_any():
                    await out.write(block)
                await out.write_eof()
                return out

        async def start() -> None:
            self._session = ClientSession(
                connector=TCPConnector(ssl=ssl.create_default_context(cafile=str(self.ca)))
            )
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()

    def close(self) -> None:
        import asyncio

        async def stop() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def gated_node(tiny_model, remote, tmp_path_factory):
    url, ca, key_file = remote
    gate = Gate(url, ca)
    proc = NodeProcess(
        tiny_model,
        "--engine",
        "upstream",
        "--upstream-url",
        f"http://127.0.0.1:{gate.port}",
        "--upstream-model",
        SERVED,
        "--upstream-key-file",
        str(key_file),
        "--phi-allowed",
        node_id="gated-node",
    )
    try:
        with proc:
            proc.start(tmp_path_factory.mktemp("gated-logs"))
            proc.wait_serving(120)
            yield proc, gate, key_file
            proc.stop()
            assert KEY not in proc.stderr()
    finally:
        gate.close()


@pytest.mark.parametrize(
    "status, headers, code, words",
    [
        (
            429,
            {"Retry-After": "3"},
            "RESOURCE_EXHAUSTED",
            "rate-limiting (HTTP 429); retry after 3s",
        ),
        (503, {}, "UNAVAILABLE", "failed (HTTP 503, SyntheticError)"),
        (401, {}, "FAILED_PRECONDITION", "refused the key in"),
    ],
    ids=["429", "503", "401"],
)
def test_upstream_refusals_map_to_grpc_statuses(gated_node, status, headers, code, words):
    import grpc

    node, gate, key_file = gated_node
    ok, _ = _run(node, build_request(prompt="Plan:", max_tokens=4, request_id=f"before-{status}"))
    assert ok
    gate.refuse = (status, headers)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _run(node, build_request(prompt="Plan:", max_tokens=4, request_id=f"refused-{status}"))
    finally:
        gate.refuse = None
    assert err.value.code().name == code
    assert (
        words in err.value.details()
        and "synthetic" not in err.value.details()
        and KEY not in err.value.details()
    )
    pushback = dict(err.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert pushback == ("3000" if status == 429 else None)
    if status == 401:
        assert str(key_file) in err.value.details()
    st = node.status()
    assert words in st.engine_server.last_exit and st.lifecycle == common_pb2.LIFECYCLE_READY


def test_a_connection_closed_before_any_answer_is_tried_once_more(gated_node):
    """The endpoint closes the connection a request went out on, answering nothing (its
    keep-alive ending as a pooled connection is reused): the agent sends the request once
    more on a new connection and the caller sees nothing; a second close in a row is the
    request's failure, UNAVAILABLE, naming what happened."""
    import grpc

    node, gate, _ = gated_node
    want, _ = _run(node, build_request(prompt="Plan:", max_tokens=6, request_id="drop-ref"))
    gate.drop = 1
    ids, final = _run(node, build_request(prompt="Plan:", max_tokens=6, request_id="drop-once"))
    assert gate.drop == 0 and ids == want
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    gate.drop = 2
    try:
        with pytest.raises(grpc.RpcError) as err:
            _run(node, build_request(prompt="Plan:", max_tokens=6, request_id="drop-twice"))
    finally:
        gate.drop = 0
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "lost the connection to the upstream endpoint" in err.value.details()
    assert (
        _run(node, build_request(prompt="Plan:", max_tokens=6, request_id="drop-after"))[0] == want
    )


def _kept_loading(remote, model: Path, tmp_path: Path, words: str):
    """An upstream node on `model` in front of the endpoint: it stays LOADING with a reason
    holding `words` (a check refused the endpoint). Returns that status."""
    url, ca, key_file = remote
    with NodeProcess(
        model, *_upstream_args(url, ca, key_file, "--phi-allowed"), node_id=model.name
    ) as proc:
        proc.start(tmp_path / f"logs-{model.name}")
        st, _ = proc.wait_until(
            lambda s: words in s.lifecycle_reason, timeout_s=90, what=f"the refusal ({words})"
        )
        assert st.lifecycle == common_pb2.LIFECYCLE_LOADING
        proc.stop()
    return st


def test_the_token_check_refuses_an_endpoint_whose_tokenizer_differs(remote, tmp_path):
    """--model with another tokenizer than the endpoint's: the node stays LOADING saying so
    (a resume would splice token ids that mean other text)."""
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    other = make_tiny_model(tmp_path / "other-vocab", TinyModelSpec(vocab_size=320))
    st = _kept_loading(remote, other, tmp_path, "tokenizes text differently")
    assert "--model" in st.lifecycle_reason


def test_the_weights_check_refuses_an_endpoint_serving_other_weights(remote, tmp_path):
    """--model holds other weights (another seed) with the endpoint's tokenizer: the node's
    digest is theirs, the endpoint's greedy tokens are not theirs, so the node stays LOADING
    saying so; with --upstream-weights-check off it serves on trust and its status says so."""
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    other = make_tiny_model(tmp_path / "other-weights", TinyModelSpec(seed=7))
    st = _kept_loading(remote, other, tmp_path, "continues the check text differently")
    assert "--upstream-weights-check off" in st.lifecycle_reason
    url, ca, key_file = remote
    with NodeProcess(
        other,
        *_upstream_args(url, ca, key_file, "--phi-allowed", "--upstream-weights-check", "off"),
        node_id="weights-on-trust",
    ) as proc:
        proc.start(tmp_path / "logs-off")
        proc.wait_serving(timeout_s=90)
        st = proc.status()
        assert st.model.engine_version.endswith(", weights not checked (off)")
        proc.stop()


def test_a_killed_mlx_stream_resumes_exactly_on_the_upstream_node(
    remote, start_node, start_coordinator
):
    """An MLX node and a vllm-kind upstream node declaring the MLX node's digest, behind a
    coordinator; the MLX node is killed (SIGKILL) mid-stream. The stream completes on the
    upstream node, each token once, and its continuation is exactly what the endpoint
    draws after the MLX node's tokens (the contract's exact resume), which on the tiny
    model is also the MLX node's own uninterrupted greedy run."""
    from cluster.api import fleet_pb2, fleet_pb2_grpc
    from tests.fleet_helpers import EventWatch, collect, in_threads, note

    url, ca, key_file = remote
    mlx = start_node(node_id="mlx-source")
    digest = mlx.status().model.weights_digest
    up = start_node(
        *_upstream_args(url, ca, key_file, "--phi-allowed", "--upstream-digest", digest),
        node_id="upstream-target",
    )
    assert up.status().model.weights_digest == digest
    co = start_coordinator(nodes=[mlx.address, up.address], name="mlx-to-upstream")
    co.wait_routable(2)
    n = 1500
    req = note(3, n, request_id="mlx-to-upstream")
    req.sampling.ignore_eos = True
    fleet = fleet_pb2_grpc.FleetStub(co.channel)

    def cordon(on: bool) -> None:
        fleet.CordonNode(
            fleet_pb2.CordonNodeRequest(node_id=up.node_id, cordoned=on, reason="test"),
            timeout=10,
        )

    direct = inference_pb2.GenerateRequest()
    direct.CopyFrom(req)
    direct.request_id = "mlx-uninterrupted"
    mlx_run = collect(mlx.inference, direct)  # the MLX node's own uninterrupted greedy tokens
    assert mlx_run.error is None and len(mlx_run.ids) == n
    watch = EventWatch(co)
    cordon(True)  # the stream starts on the MLX node
    try:
        co.wait_routable(1)
        live = [None]
        results, threads = in_threads(
            lambda _: collect(co.inference, req, on_chunk=lambda s: live.__setitem__(0, s)), [0]
        )
        deadline = time.monotonic() + 60
        while live[0] is None or len(live[0].ids) < 20:
            assert time.monotonic() < deadline, f"the stream did not start: {results}"
            time.sleep(0.005)
    finally:
        cordon(False)
    co.wait_routable(2)
    mlx.proc.kill()
    threads[0].join(180)
    s = results[0]
    k = watch.wait_for(fleet_pb2.EVENT_KIND_FAILOVER, mlx.node_id, timeout_s=10).tokens_delivered
    watch.close()
    assert s.error is None, s.error
    f = s.final
    assert list(f.nodes) == [mlx.node_id, up.node_id] and f.failovers == 1
    assert f.model.engine == "upstream" and f.model.weights_digest == digest
    assert len(s.ids) == f.usage.completion_tokens == n and 20 <= k < n
    # The continuation is exactly the endpoint's greedy tokens after the MLX node's k.
    rest = build_request(
        messages=[(m.role, m.content) for m in req.chat.messages],
        max_tokens=n - k,
        temperature=0.0,
        request_id="mlx-to-upstream-rest",
    )
    rest.sampling.ignore_eos = True
    rest.prefix_token_ids.extend(s.ids[:k])
    ids, _ = _run(up, rest)
    assert ids == s.ids[k:]
    # MLX and vLLM (float32 on a CPU) draw the same greedy tokens on the tiny model, so the
    # spliced stream is also the MLX node's uninterrupted run (two engines' numerics: if a
    # change of either makes them differ, the resume above is still exact).
    assert s.ids == mlx_run.ids, f"MLX and vLLM greedy tokens part after the resume at {k}"
