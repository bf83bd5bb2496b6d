"""The vLLM node type against a real vLLM (CPU build): one contract with MLX nodes.

The tests share one vLLM node agent (conftest `vllm_node`: its server takes ~25 s to
start); the crash test runs last because it costs a server restart.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from cluster.api import common_pb2, inference_pb2
from cluster.client import build_request
from tests.test_node_limits import BAD_INPUTS
from tests.vllm_support import START_TIMEOUT_S, group_alive, long_prompt

pytestmark = [pytest.mark.usefixtures("as_node_caller"), pytest.mark.slow]

NOTE = [
    ("system", "You are a clinical documentation assistant."),
    ("user", "Write a SOAP note for a synthetic follow-up visit."),
]


def _run(node, req, timeout=120):
    ids, text, final = [], [], None
    for chunk in node.inference.Generate(req, timeout=timeout):
        ids.extend(chunk.token_ids)
        text.append(chunk.text)
        if chunk.HasField("final"):
            assert final is None
            final = chunk.final
    assert final is not None
    return ids, "".join(text), final


def _metrics(node) -> str:
    with urllib.request.urlopen(node.status().engine_server.url + "/metrics", timeout=5) as r:
        return r.read().decode()


def _vllm_counter(node, name: str) -> float:
    """A series from vLLM's own /metrics, summed over its label sets."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in _metrics(node).splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def _vllm_running(node) -> float:
    return _vllm_counter(node, "vllm:num_requests_running")


def test_status_names_the_engine_and_its_server(vllm_node):
    st = vllm_node.status()
    assert st.model.engine == "vllm"
    assert st.model.engine_version.startswith("vLLM ")
    assert st.model.weights_digest.startswith("sha256:")
    assert st.engine_server.pid > 0 and st.engine_server.url.startswith("http://127.0.0.1:")
    assert st.engine_server.restarts == 0
    assert st.capacity.max_running == 16
    assert 0.0 <= st.load.kv_cache_usage <= 1.0


def test_sixteen_concurrent_streams_complete_with_right_counts(vllm_node):
    barrier = threading.Barrier(16)
    max_tokens = [24 + 4 * i for i in range(16)]

    def one(i):
        barrier.wait()
        return _run(
            vllm_node,
            build_request(
                messages=NOTE,
                max_tokens=max_tokens[i],
                request_id=f"v-conc-{i}",
                temperature=0.7,
                seed=i,
            ),
        )

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, (ids, _text, final) in enumerate(results):
        assert final.request_id == f"v-conc-{i}" and final.node_id == "vllm-node"
        assert final.model.engine == "vllm"
        assert final.usage.completion_tokens == len(ids)
        assert final.usage.prompt_tokens > 0
        assert final.seed == i
        if final.finish_reason == inference_pb2.FINISH_REASON_LENGTH:
            assert len(ids) == max_tokens[i]
        else:
            assert (
                final.finish_reason == inference_pb2.FINISH_REASON_STOP and len(ids) < max_tokens[i]
            )
        assert (
            final.timings.time_to_first_token_ms > 0
            and final.timings.total_ms >= final.timings.time_to_first_token_ms
        )


def test_same_seed_gives_same_tokens_and_other_seeds_differ(vllm_node):
    def tokens(seed, rid):
        return _run(
            vllm_node,
            build_request(
                prompt="Assessment:", max_tokens=40, temperature=1.0, seed=seed, request_id=rid
            ),
        )[0]

    first = tokens(11, "seed-a")
    assert tokens(11, "seed-b") == first
    assert tokens(12, "seed-c") != first


def test_chat_template_and_tokens_match_an_mlx_node(vllm_node, node):
    """The agent applies the chat template and counts tokens itself, whatever the engine."""
    req = build_request(messages=NOTE, max_tokens=8, temperature=0.0, request_id="tmpl")
    _, _, mlx_final = _run(node, req)
    _, _, vllm_final = _run(vllm_node, req)
    assert vllm_final.usage.prompt_tokens == mlx_final.usage.prompt_tokens
    assert vllm_final.model.weights_digest == mlx_final.model.weights_digest  # the same files


def test_resume_with_prefix_token_ids_continues_exactly(vllm_node):
    full, full_text, final = _run(
        vllm_node,
        build_request(prompt="Plan:", max_tokens=80, temperature=0.0, request_id="resume-full"),
    )
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    req = build_request(
        prompt="Plan:", max_tokens=80 - 30, temperature=0.0, request_id="resume-rest"
    )
    req.prefix_token_ids.extend(full[:30])
    rest, _, rest_final = _run(vllm_node, req)
    assert rest == full[30:]
    assert rest_final.usage.prefix_tokens == 30 and rest_final.usage.completion_tokens == 50


def test_stop_sequence_ends_the_stream_before_it(vllm_node):
    ids, text, _ = _run(
        vllm_node,
        build_request(prompt="Plan:", max_tokens=120, temperature=0.0, request_id="stop-full"),
    )
    stop = next(
        text[i : i + 3]
        for i in range(10, len(text) - 3)
        if text[i : i + 3].isprintable() and text[i : i + 3].strip()
    )
    cut = text.index(stop)
    ids2, text2, final = _run(
        vllm_node,
        build_request(
            prompt="Plan:", max_tokens=120, temperature=0.0, stop=[stop], request_id="stop-cut"
        ),
    )
    assert final.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert text2 == text[:cut]
    assert ids2 == ids[: len(ids2)] and len(ids2) < len(ids)
    assert final.usage.completion_tokens == len(ids2)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_answered_exactly_as_an_mlx_node_answers(vllm_node, node, name):
    req, _ = BAD_INPUTS[name]
    answers = []
    for target in (node, vllm_node):
        with pytest.raises(grpc.RpcError) as err:
            _run(target, req, timeout=10)
        answers.append((err.value.code(), err.value.details().replace(target.node_id, "NODE")))
    assert answers[0] == answers[1]
    assert answers[1][0] == grpc.StatusCode.INVALID_ARGUMENT


def _engine_core(node) -> psutil.Process:
    """vLLM's engine-core process (it schedules and runs the model; the API server streams)."""
    server = psutil.Process(node.status().engine_server.pid)
    return next(
        p
        for p in server.children(recursive=True)
        if "EngineCore" in p.name() + " ".join(p.cmdline())
    )


def _start_frozen(node, request_id: str):
    """A long request that vLLM holds unfinished: its engine core is stopped (SIGSTOP) before
    the request goes out. On this tiny model vLLM generates 1900 tokens in about 0.1 s;
    frozen, the request is surely still in flight when the test acts."""
    request = build_request(
        prompt=long_prompt(node), max_tokens=1900, temperature=0.0, request_id=request_id
    )
    core = _engine_core(node)
    core.suspend()
    call = node.inference.Generate(request, timeout=120)
    chunks = iter(call)
    node.wait_until(
        lambda s: s.load.engine_sequences == 1, timeout_s=10, what="request handed to vLLM"
    )
    return call, chunks, core


def test_cancel_closes_the_stream_and_vllm_aborts_the_request(vllm_node):
    long_prompt(vllm_node)  # probed (and generated) before the count starts
    time.sleep(1.5)
    generated = _vllm_counter(vllm_node, "vllm:generation_tokens_total")
    call, chunks, core = _start_frozen(vllm_node, "cancel-me")
    try:
        call.cancel()
        st, _ = vllm_node.wait_until(
            lambda s: s.load.running == 0 and s.load.engine_sequences == 0,
            timeout_s=10,
            what="slot freed",
        )
    finally:
        core.resume()
    # Not aborted, vLLM would now generate all 1900 tokens in a fraction of a second.
    deadline = time.monotonic() + 10
    while _vllm_running(vllm_node) or _vllm_counter(vllm_node, "vllm:num_requests_waiting"):
        assert time.monotonic() < deadline, "vLLM still holds the cancelled request"
        time.sleep(0.05)
    time.sleep(1.5)  # its stats reach /metrics within a second
    assert _vllm_counter(vllm_node, "vllm:generation_tokens_total") - generated < 100, (
        "vLLM kept generating"
    )
    assert st.load.requests_cancelled_total >= 1


def test_status_follows_vllm_metrics(vllm_node):
    """Running and waiting come from the agent; decode rate, KV-cache use and prefix-cache
    hits from vLLM's /metrics (read each second). On this tiny model vLLM holds a sequence
    for only ~0.1 s, so KV-cache use is compared with /metrics, not caught above zero."""
    _, chunks, core = _start_frozen(vllm_node, "busy")
    try:
        assert vllm_node.status().load.engine_sequences == 1
    finally:
        core.resume()
    for _ in chunks:
        pass
    st, _ = vllm_node.wait_until(
        lambda s: s.load.decode_tokens_per_s > 0 and s.load.engine_sequences == 0,
        timeout_s=5,
        what="decode rate from /metrics",
    )
    time.sleep(1.5)
    assert vllm_node.status().load.kv_cache_usage == pytest.approx(
        _vllm_counter(vllm_node, "vllm:kv_cache_usage_perc")
    )


def test_the_agent_exports_the_same_metrics_as_on_mlx_nodes(vllm_node):
    """The agent's /metrics (its own monitoring port, not vLLM's loopback server): the
    node's families and vLLM's names, counted by the agent, whatever the engine."""
    from cluster.metrics import parse
    from cluster.security.identity import Role

    before = vllm_node.status().load.requests_completed_total
    done = list(
        vllm_node.inference.Generate(
            build_request(prompt="Note:", max_tokens=5, request_id="vllm-metrics"), timeout=60
        )
    )
    assert done[-1].HasField("final")
    status, body, _ = vllm_node.http_get("/metrics", "prometheus", Role.MONITOR)
    assert status == 200
    samples = parse(body.decode())
    info = [labels for name, labels in samples if name == "studiofleet_node_info"]
    assert dict(info[0])["engine"] == "vllm"
    completed = samples[("studiofleet_node_requests_total", frozenset({("outcome", "completed")}))]
    assert completed == vllm_node.status().load.requests_completed_total >= before + 1
    model = frozenset({("model_name", vllm_node.status().model.model_id)})
    assert ("vllm:num_requests_running", model) in samples and (
        "vllm:kv_cache_usage_perc",
        model,
    ) in samples
    assert (
        samples[("vllm:generation_tokens_total", model)]
        == samples[("studiofleet_node_generation_tokens_total", frozenset())]
    )


def test_server_killed_mid_stream_fails_the_request_with_the_cause_then_serves_again(vllm_node):
    """Last in the module: it restarts the server (~25 s)."""
    pid = vllm_node.status().engine_server.pid
    _, chunks, core = _start_frozen(vllm_node, "crash")
    os.kill(
        pid, signal.SIGKILL
    )  # the API server dies with the request unfinished (its engine core is stopped)
    got, final = 0, None
    for chunk in chunks:
        got += len(chunk.token_ids)
        if chunk.HasField("final"):
            final = chunk.final
    assert final is not None and final.finish_reason == inference_pb2.FINISH_REASON_ERROR
    assert f"pid {pid}" in final.message and "SIGKILL" in final.message, final.message
    assert "restarting" in final.message and final.usage.completion_tokens == got
    # The node says so (LOADING, with the cause) while its server restarts...
    st, _ = vllm_node.wait_until(
        lambda s: s.engine_server.restarts == 1, timeout_s=10, what="restart counted"
    )
    assert "SIGKILL" in st.engine_server.last_exit
    assert st.lifecycle == common_pb2.LIFECYCLE_LOADING and "SIGKILL" in st.lifecycle_reason
    with pytest.raises(grpc.RpcError) as err:
        _run(
            vllm_node,
            build_request(prompt="Plan:", max_tokens=4, request_id="while-down"),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "LOADING" in err.value.details()
    # ...then serves again on a new server; nothing of the old one is left.
    st, _ = vllm_node.wait_until(
        lambda s: s.lifecycle == common_pb2.LIFECYCLE_READY and s.engine_server.pid not in (0, pid),
        timeout_s=START_TIMEOUT_S,
        what="READY again on a new server",
    )
    assert not group_alive(pid)
    ids, _, final = _run(
        vllm_node, build_request(prompt="Plan:", max_tokens=10, request_id="after-crash")
    )
    assert final.finish_reason in (
        inference_pb2.FINISH_REASON_LENGTH,
        inference_pb2.FINISH_REASON_STOP,
    )


def test_schema_constrained_output_is_valid_for_every_seed_on_vllm(vllm_node):
    """vLLM's structured outputs keep the random tiny model's JSON valid, as the MLX grammar does."""
    import json

    import jsonschema

    from tests.test_structured_output import MIXED, _req

    def one(seed):
        return _run(vllm_node, _req(seed, json_schema=MIXED))

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(one, range(24)))
    runs.append(_run(vllm_node, _req(99, note_template="soap-brief")))
    for _ids, text, final in runs:
        assert final.finish_reason == inference_pb2.FINISH_REASON_STOP, (
            final.structured.rule,
            final.structured.path,
        )
        assert final.structured.valid, (
            final.request_id,
            final.structured.rule,
            final.structured.path,
        )
        assert json.loads(text) == json.loads(final.structured.json)
        if final.structured.format != "soap-brief":
            jsonschema.validate(json.loads(text), MIXED)
        assert final.quality.parts[0].score == 1.0
    # vLLM's grammar starts at the first generated token: a constrained resume is refused
    # with what to do, never decoded from the wrong grammar state.
    ids = runs[0][0]
    resume = _req(0, json_schema=MIXED, max_tokens=300)
    resume.prefix_token_ids[:] = ids[:5]
    with pytest.raises(grpc.RpcError) as err:
        list(vllm_node.inference.Generate(resume, timeout=60))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot resume a schema-constrained request" in err.value.details()
