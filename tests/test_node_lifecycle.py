"""Start-up, health, reflection and SIGTERM on real fleet-node processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cluster.api import common_pb2, inference_pb2
from cluster.client import build_request
from tests.procs import ROOT

PROTO_ROOT = ROOT / "proto"
PROTO = PROTO_ROOT / "studiofleet" / "v1" / "inference.proto"

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_health_serving_only_after_warm_up(start_node):
    # A long warm-up generation keeps the node in WARMING long enough to observe.
    node = start_node(
        node_id="slow-warm", wait=False, env={"STUDIOFLEET_NODE_WARMUP_TOKENS": "1500"}
    )
    seen = []
    for resp in node.health_watch(timeout_s=60):
        st = node.status()
        seen.append((resp.status, st.lifecycle))
        if resp.status == SERVING:
            break
        # Not serving yet: the node says why, and refuses work with UNAVAILABLE.
        assert st.lifecycle in (
            common_pb2.LIFECYCLE_STARTING,
            common_pb2.LIFECYCLE_LOADING,
            common_pb2.LIFECYCLE_WARMING,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(node.inference.Generate(build_request(prompt="Plan:", max_tokens=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "slow-warm" in err.value.details()
    assert seen[0][0] != SERVING, "health must start NOT_SERVING"
    assert seen[-1] == (SERVING, common_pb2.LIFECYCLE_READY)
    st = node.status()
    assert st.lifecycle == common_pb2.LIFECYCLE_READY
    assert st.load.requests_accepted_total == 0, "the warm-up is not counted as traffic"


def test_reflection_lists_the_services(node):
    db = ProtoReflectionDescriptorDatabase(node.channel)
    services = set(db.get_services())
    assert {"studiofleet.v1.Inference", "studiofleet.v1.Node", "grpc.health.v1.Health"} <= services
    method = db.FindFileContainingSymbol("studiofleet.v1.Inference")
    assert method.name == "studiofleet/v1/inference.proto"


def _grpcurl():
    exe = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("grpcurl is not installed (dev extra on Linux x86-64 only)")
    return exe


def test_grpcurl_lists_and_calls_through_reflection(node, fleet_ca):
    """A generic gRPC client over mTLS: reflection as an operator, Generate as a coordinator."""
    exe = _grpcurl()

    def as_(name):
        return [
            "-cacert",
            str(fleet_ca / "ca.pem"),
            "-cert",
            str(fleet_ca / f"{name}.pem"),
            "-key",
            str(fleet_ca / f"{name}.key"),
            "-servername",
            "shared-node.node.studiofleet",
        ]

    listed = subprocess.run(
        [exe, *as_("operator"), node.address, "list"], capture_output=True, text=True, timeout=30
    )
    assert listed.returncode == 0, listed.stderr
    assert {"studiofleet.v1.Inference", "studiofleet.v1.Node"} <= set(listed.stdout.split())
    body = json.dumps({"prompt": "Plan:", "maxTokens": 5, "requestId": "from-grpcurl"})
    generate = [node.address, "studiofleet.v1.Inference/Generate"]
    called = subprocess.run(
        [
            exe,
            *as_("harness-coordinator"),
            "-d",
            body,
            "-proto",
            str(PROTO),
            "-import-path",
            str(PROTO_ROOT),
            *generate,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert called.returncode == 0, called.stderr
    assert '"requestId": "from-grpcurl"' in called.stdout  # -proto prints JSON names
    bad = subprocess.run(
        [
            exe,
            *as_("harness-coordinator"),
            "-d",
            '{"prompt": "x"}',
            "-proto",
            str(PROTO),
            "-import-path",
            str(PROTO_ROOT),
            *generate,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "InvalidArgument" in bad.stderr and "max_tokens must be between" in bad.stderr
    # Reflection is an operator's tool: an app certificate is refused, by name.
    denied = subprocess.run(
        [exe, *as_("app"), node.address, "list"], capture_output=True, text=True, timeout=30
    )
    assert (
        denied.returncode != 0
        and "PermissionDenied" in denied.stderr
        and "app/app" in denied.stderr
    )


def test_sigterm_lets_in_flight_requests_finish(start_node):
    node = start_node("--shutdown-grace-s", "30", node_id="graceful")
    started = threading.Barrier(5)

    def one(i):
        call = node.inference.Generate(
            build_request(prompt=f"Note {i}:", max_tokens=300, request_id=f"inflight-{i}"),
            timeout=60,
        )
        chunks = [next(call)]
        started.wait()
        chunks.extend(call)
        return chunks

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        started.wait()
        node.signal(signal.SIGTERM)
        results = [f.result(timeout=60) for f in futures]
    for chunks in results:
        final = chunks[-1].final
        assert final.finish_reason in (
            inference_pb2.FINISH_REASON_LENGTH,
            inference_pb2.FINISH_REASON_STOP,
        )
        assert final.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert node.wait_exit(30) == 0, node.stderr()
    assert "shutting down: 4 requests in flight" in node.stderr()


def test_sigterm_refuses_new_work_while_draining(start_node):
    node = start_node("--shutdown-grace-s", "30", node_id="draining")
    call = node.inference.Generate(
        build_request(prompt="Long:", max_tokens=1500, request_id="keeps-going"), timeout=60
    )
    next(call)
    node.signal(signal.SIGTERM)
    watch = node.health_watch(timeout_s=10)
    assert any(r.status != SERVING for r in watch), "health leaves SERVING on SIGTERM"
    with pytest.raises(grpc.RpcError) as err:
        list(node.inference.Generate(build_request(prompt="New:", max_tokens=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in err.value.details()
    rest = list(call)
    assert rest[-1].HasField("final")
    assert node.wait_exit(30) == 0, node.stderr()


def test_sigterm_past_grace_ends_the_rest_with_a_cancelled_final_chunk(start_node):
    node = start_node("--shutdown-grace-s", "0.5", node_id="impatient")
    calls = [
        node.inference.Generate(
            build_request(prompt=f"Long {i}:", max_tokens=2000, request_id=f"cut-{i}"), timeout=60
        )
        for i in range(3)
    ]
    firsts = [next(call) for call in calls]
    node.signal(signal.SIGTERM)
    node.wait_until(
        lambda s: s.lifecycle == common_pb2.LIFECYCLE_DRAINING, what="DRAINING after SIGTERM"
    )
    for first, call in zip(firsts, calls):
        chunks = [first, *call]
        final = chunks[-1].final
        assert final.finish_reason == inference_pb2.FINISH_REASON_CANCELLED
        assert "grace period of 0.5s expired" in final.message
        assert "resume it on another node with prefix_token_ids" in final.message
        streamed = sum(len(c.token_ids) for c in chunks)
        assert 0 < streamed == final.usage.completion_tokens < 2000
    assert node.wait_exit(30) == 0, node.stderr()
    logs = node.stderr()
    assert logs.count("outcome=cancelled") == 3
    assert "DRAINING -> DRAINED" in logs


def test_second_sigterm_skips_the_grace(start_node):
    node = start_node("--shutdown-grace-s", "60", node_id="twice")
    call = node.inference.Generate(
        build_request(prompt="Long:", max_tokens=2000, request_id="cut"), timeout=60
    )
    next(call)
    node.signal(signal.SIGTERM)
    node.wait_until(lambda s: s.lifecycle == common_pb2.LIFECYCLE_DRAINING, what="draining")
    node.signal(signal.SIGTERM)
    final = list(call)[-1].final
    assert final.finish_reason == inference_pb2.FINISH_REASON_CANCELLED
    assert "second SIGTERM" in final.message
    assert node.wait_exit(30) == 0, node.stderr()


def test_bad_model_path_exits_with_a_clear_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "node_agent.main",
            "--model",
            str(tmp_path / "missing"),
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr and "make-tiny" in proc.stderr


def test_unloadable_model_reports_failed(start_node, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2"}')
    node = start_node(node_id="broken", model=broken, wait=False)
    st, _ = node.wait_until(
        lambda s: s.lifecycle == common_pb2.LIFECYCLE_FAILED,
        timeout_s=30,
        what="FAILED after a bad load",
    )
    assert "model load failed" in st.lifecycle_reason
    check = node.health_watch(timeout_s=5)
    assert next(check).status != SERVING
    check.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(node.inference.Generate(build_request(prompt="x", max_tokens=2), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "FAILED" in err.value.details()


def test_status_carries_the_hardware_and_model_facts_a_profile_records(node, tiny_model):
    """fleetctl profile writes these into a capacity profile (docs/capacity.md)."""
    import json

    from node_agent.engine import stored_parameters
    from node_agent.telemetry import CHIP

    st = node.status()
    assert st.chip == CHIP and st.chip and st.cpu_cores >= 1
    config = json.loads((tiny_model / "config.json").read_text())
    assert "quantization" not in config and st.model.quantization == ""
    # Unquantized, the loaded model's parameter count equals what its files store.
    assert st.model.parameters == stored_parameters(tiny_model) > 0
