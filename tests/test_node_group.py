"""Node groups (docs/node-groups.md): two real `fleet-node` ranks sharing one tiny model over
mlx.distributed's ring backend on loopback, compared token for token with a single node
(tensor and pipeline; greedy, seeded, schema-constrained), activated as one, and a stopped
rank detected within the deadline; the settings and the mDNS TXT. Failures under load:
tests/test_node_group_failures.py."""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import inference_pb2, node_pb2, node_pb2_grpc
from node_agent.group import GROUP_FAILED_EXIT_CODE
from tests.fleet_helpers import collect, in_threads, note
from tests.group_helpers import TIMEOUT_S, make_group_model, start_group, wait_failed
from tests.procs import NodeProcess


@pytest.fixture(scope="module")
def group_model(tmp_path_factory) -> Path:
    return make_group_model(tmp_path_factory.mktemp("models") / "tiny-group")


def streams(stub, count: int, max_tokens: int, tag: str, **kw) -> list:
    out, threads = in_threads(
        lambda i: collect(stub, note(i, max_tokens, request_id=f"{tag}-{i}", **kw), 120),
        list(range(count)),
    )
    for t in threads:
        t.join(timeout=150)
    return out


def assert_same_tokens(group_streams, single_streams) -> None:
    for g, s in zip(group_streams, single_streams):
        assert g.error is None and s.error is None, (g.error, s.error)
        assert g.final.finish_reason == s.final.finish_reason != inference_pb2.FINISH_REASON_ERROR
        assert g.ids and g.ids == s.ids


SCHEMA = {"type": "object", "properties": {"plan": {"type": "string"}}, "required": ["plan"]}
# Greedy, seeded sampling, and schema-constrained (every rank applies the same mask).
SAMPLINGS = ({}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}, {"json_schema": SCHEMA})


@pytest.fixture(scope="module")
def reference(group_model, tmp_path_factory):
    """What a single node generates for 8 concurrent notes, greedy and seeded; its digest."""
    with NodeProcess(group_model, node_id="single-reference") as single:
        single.start(tmp_path_factory.mktemp("reference-logs"))
        single.wait_serving()
        want = [
            streams(single.inference, 8, 12, f"ref-{i}", **kw) for i, kw in enumerate(SAMPLINGS)
        ]
        return want, single.status().model.weights_digest


def check_parity_with_single(stack, model, logs, mode, reference):
    rank0, rank1 = start_group(stack, model, logs, mode)
    want, single_digest = reference
    for i, kw in enumerate(SAMPLINGS):
        assert_same_tokens(streams(rank0.inference, 8, 12, f"g-{mode}-{i}", **kw), want[i])
    st = rank0.status()
    assert st.group.size == 2 and st.group.mode == mode and st.group.backend == "ring"
    assert [r.health for r in st.group.ranks] == ["ok", "ok"]
    assert st.group.ranks[1].hostname and st.group.ranks[1].memory_total_bytes > 0
    # The group's digest is the model's plus the layout: never the single node's.
    assert st.model.weights_digest != single_digest
    # Rank 1 serves health and status only: NOT_SERVING, and inference is refused.
    health = health_pb2_grpc.HealthStub(rank1.channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    refused = collect(rank1.inference, note(0, 4, request_id="to-rank-1"), 30)
    assert refused.error is not None or (
        refused.final.finish_reason == inference_pb2.FINISH_REASON_ERROR
    )
    return rank0, rank1


@pytest.mark.allow_blocking("drives node processes")
def test_tensor_group_matches_a_single_node_and_activates_as_one(group_model, tmp_path, reference):
    with ExitStack() as stack:
        rank0, rank1 = check_parity_with_single(
            stack, group_model, tmp_path / "logs", "tensor", reference
        )
        check_activation(rank0, rank1, tmp_path)
        # Rank 0 shutting down ends the group: the other rank leaves for its service manager.
        rank0.signal(signal.SIGTERM)
        assert rank0.wait_exit(timeout_s=30) == 0
        assert rank1.wait_exit(timeout_s=20) == GROUP_FAILED_EXIT_CODE


@pytest.mark.slow
@pytest.mark.allow_blocking("drives node processes")
def test_pipeline_group_matches_a_single_node_and_a_stopped_rank_fails_it(
    group_model, tmp_path, reference
):
    """Same tokens in pipeline mode; then rank 1 stops answering (SIGSTOP): rank 0 fails the
    group within the deadline, and rank 1, resumed, finds rank 0 gone and leaves too."""
    with ExitStack() as stack:
        rank0, rank1 = check_parity_with_single(
            stack, group_model, tmp_path / "logs", "pipeline", reference
        )
        rank1.signal(signal.SIGSTOP)
        try:
            reason, waited = wait_failed(rank0, TIMEOUT_S + 10)
            assert "rank 1 (127.0.0.1:" in reason, reason
            assert waited < TIMEOUT_S + 3, waited
            assert rank0.wait_exit(timeout_s=20) == GROUP_FAILED_EXIT_CODE
        finally:
            rank1.signal(signal.SIGCONT)
        try:
            assert rank1.wait_exit(timeout_s=TIMEOUT_S + 20) == GROUP_FAILED_EXIT_CODE
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 1 still runs: {rank1.stderr()[-2000:]}")


def wait_op(node, call, timeout_s: float = 90.0):
    """Re-issue an operation (same id: returns its record) until it is no longer running."""
    running = node_pb2.OPERATION_STATE_RUNNING
    call()
    node.wait_until(lambda st: call().operation.state != running, timeout_s, "operation end")
    return call()


def check_activation(rank0, rank1, tmp_path) -> None:
    """Staging on rank 0 stages on every rank; a rank without its copy refuses activation
    (named) and nothing switches; with every copy, activation switches the whole group."""
    import shutil

    from cluster.digest import weights_digest
    from cluster.tinymodel import TinyModelSpec, make_tiny_model
    from node_agent.group import GroupSpec, layout_digest

    v2 = make_tiny_model(tmp_path / "v2", TinyModelSpec(num_key_value_heads=2, seed=7))
    new = weights_digest(v2)
    old = rank0.status().model.weights_digest
    stubs = [node_pb2_grpc.NodeStub(r.channel) for r in (rank0, rank1)]

    def stage(i: int):
        request = node_pb2.StageModelRequest(
            operation_id=f"stage-{i}", source_path=str(v2), version="v2", expected_digest=new
        )
        return wait_op((rank0, rank1)[i], lambda: stubs[i].StageModel(request, timeout=5))

    def activate(op: str):
        request = node_pb2.ActivateRequest(operation_id=op, weights_digest=new)
        return wait_op(rank0, lambda: stubs[0].Activate(request, timeout=5))

    assert stage(0).operation.state == node_pb2.OPERATION_STATE_DONE
    staged = node_pb2.STAGE_STATE_STAGED
    rank1.wait_until(
        lambda st: any(m.weights_digest == new and m.state == staged for m in st.staged),
        60,
        "rank 1 staged what rank 0 was told to stage",
    )
    shutil.rmtree(rank1.state_dir / "models" / new[7:])  # as if rank 1 had lost its copy
    drain = node_pb2.DrainRequest(operation_id="drain")
    wait_op(rank0, lambda: stubs[0].Drain(drain, timeout=5))
    refused = activate("activate-1")
    assert refused.operation.state == node_pb2.OPERATION_STATE_FAILED
    assert "rank 1 (127.0.0.1:" in refused.operation.message, refused.operation.message
    assert "has no copy" in refused.operation.message
    st = rank0.status()
    assert st.model.weights_digest == old and [r.health for r in st.group.ranks] == ["ok"] * 2
    assert stage(1).operation.state == node_pb2.OPERATION_STATE_DONE
    drain = node_pb2.DrainRequest(operation_id="drain-2")
    wait_op(rank0, lambda: stubs[0].Drain(drain, timeout=5))
    done = activate("activate-2")
    assert done.operation.state == node_pb2.OPERATION_STATE_DONE, done.operation.message
    spec = GroupSpec(("a:1", "b:1"), 0, "ring", "tensor", 10.0)
    assert done.status.model.weights_digest == layout_digest(new, spec)
    assert done.status.group.model_digest == new
    uncordon = node_pb2.CordonRequest(operation_id="uncordon", cordoned=False)
    stubs[0].Cordon(uncordon, timeout=5)
    s = collect(rank0.inference, note(0, 8, request_id="on-v2"), 60)
    assert s.final is not None and s.final.finish_reason != inference_pb2.FINISH_REASON_ERROR


def test_group_settings_are_checked():
    from pydantic import ValidationError

    from cluster.config import NodeSettings

    ok = NodeSettings(model_path=Path("m"), group="10.0.0.1:7790, 10.0.0.2:7790", rank=1)
    assert ok.group == ("10.0.0.1:7790", "10.0.0.2:7790") and ok.rank == 1
    for kw, words in (
        ({"group": "10.0.0.1:7790"}, "two or more"),
        ({"group": "10.0.0.1,10.0.0.2:1"}, "--group: expected HOST:PORT"),
        ({"group": "a:1,b:0"}, "needs a real port"),
        ({"group": "a:1,a:1"}, "twice"),
        ({"group": "a:1,b:1", "rank": 2}, "--rank 2 is outside"),
        ({"rank": 1}, "--rank needs --group"),
        ({"group": "a:1,b:1", "engine": "vllm"}, "--group needs --engine mlx"),
        ({"group": "a:1,b:1", "group_backend": "nccl"}, "group_backend"),
        ({"group": "a:1,b:1", "group_timeout_s": 0.5}, "group_timeout_s"),
    ):
        with pytest.raises(ValidationError, match=words):
            NodeSettings(model_path=Path("m"), **kw)


def test_the_cli_refuses_a_backend_this_mlx_lacks(tmp_path):
    from node_agent.group import backend_problem

    assert backend_problem("ring") is None
    problem = backend_problem("mpi")
    if problem is None:
        pytest.skip("this MLX build has MPI")
    assert "--group-backend mpi" in problem and "ring" in problem
    run = subprocess.run(
        [sys.executable, "-m", "node_agent.main", "--model", str(tmp_path), "--plaintext"]
        + ["--group", "127.0.0.1:1,127.0.0.1:2", "--group-backend", "mpi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "--group-backend mpi" in run.stderr, run.stderr


def test_only_a_group_announces_its_shape():
    from cluster.mdns import Advert

    single = Advert(node_id="n1")
    assert "group" not in single.txt()
    group = Advert(node_id="g0", group_size=2, group_mode="tensor", group_backend="ring")
    txt = group.txt()
    assert (txt["group"], txt["group_mode"], txt["group_backend"]) == ("2", "tensor", "ring")
    back = Advert.from_txt({k.encode(): v.encode() for k, v in txt.items()})
    assert (back.group_size, back.group_mode, back.group_backend) == (2, "tensor", "ring")
