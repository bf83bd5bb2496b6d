"""Node groups (docs/node-groups.md): two real `fleet-node` ranks sharing one tiny model over
mlx.distributed's ring backend on loopback, compared token for token with a single node, and
failing as one unit when a rank dies or stops answering."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, closing
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from cluster.api import common_pb2, inference_pb2, node_pb2, node_pb2_grpc
from cluster.fleetctl.nodes_cmd import fleet_table
from node_agent.group import GROUP_FAILED_EXIT_CODE
from tests.fleet_helpers import collect, in_threads, note
from tests.procs import NodeProcess

TIMEOUT_S = 5.0  # --group-timeout-s in these tests: the documented detection deadline
FAILED = common_pb2.Lifecycle.Value("LIFECYCLE_FAILED")
READY = common_pb2.Lifecycle.Value("LIFECYCLE_READY")


@pytest.fixture(scope="module")
def group_model(tmp_path_factory) -> Path:
    """The tiny model with two KV heads, so tensor mode splits them over two ranks."""
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-group", TinyModelSpec(num_key_value_heads=2)
    )


def free_ports(n: int) -> list[int]:
    """Ports free for both TCP (the ring backend) and UDP (the heartbeat)."""
    ports: list[int] = []
    while len(ports) < n:
        with closing(socket.socket()) as tcp, closing(socket.socket(type=socket.SOCK_DGRAM)) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            if port not in ports:
                ports.append(port)
    return ports


def start_group(
    stack: ExitStack, model: Path, logs: Path, mode: str, *extra: str, wait: bool = True, models=()
):
    """Two ranks, started together; returns them once rank 0 serves and rank 1 is READY."""
    group = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    ranks = []
    for rank in range(2):
        proc = NodeProcess(
            models[rank] if models else model,
            "--group",
            group,
            "--rank",
            str(rank),
            "--group-mode",
            mode,
            "--group-timeout-s",
            str(TIMEOUT_S),
            *extra,
            node_id=f"group-{mode}-{rank}",
        )
        stack.enter_context(proc)
        proc.start(logs)
        ranks.append(proc)
    if not wait:
        return ranks
    ranks[0].wait_serving(timeout_s=90)
    ranks[1].wait_until(lambda s: s.lifecycle == READY, timeout_s=30, what="rank 1 READY")
    return ranks


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


@pytest.mark.allow_blocking("drives node processes")
def test_a_rank_with_other_weights_fails_the_group(group_model, tmp_path):
    """Each rank computes its own embedding and head: ranks must load the same model."""
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    other = make_tiny_model(tmp_path / "other", TinyModelSpec(num_key_value_heads=2, seed=1))
    with ExitStack() as stack:
        rank0, rank1 = start_group(
            stack, group_model, tmp_path / "logs", "tensor", wait=False, models=(group_model, other)
        )
        reason, _ = wait_failed(rank0, 60)
        assert "rank 1 (127.0.0.1:" in reason and "other weights" in reason, reason
        assert rank0.wait_exit(timeout_s=20) == GROUP_FAILED_EXIT_CODE
        assert rank1.wait_exit(timeout_s=20) == GROUP_FAILED_EXIT_CODE


@pytest.mark.allow_blocking("drives node processes")
def test_a_model_a_mode_cannot_shard_is_refused_on_every_rank(group_model, tmp_path):
    """Pipeline mode without a weight index: every rank says so and none loads; the ranks
    stay up (FAILED, with the reason) instead of failing the group over and over."""
    import shutil

    model = tmp_path / "no-index"
    shutil.copytree(group_model, model)
    (model / "model.safetensors.index.json").unlink()
    with ExitStack() as stack:
        ranks = start_group(stack, model, tmp_path / "logs", "pipeline", wait=False)
        for proc in ranks:
            st, _ = proc.wait_until(lambda s: s.lifecycle == FAILED, 60, "FAILED")
            assert "model.safetensors.index.json" in st.lifecycle_reason, st.lifecycle_reason
        assert all(proc.proc.poll() is None for proc in ranks)


def wait_op(node, call, timeout_s: float = 90.0):
    """Re-issue an operation (same id: returns its record) until it is no longer running."""
    running = node_pb2.OPERATION_STATE_RUNNING
    call()
    node.wait_until(lambda st: call().operation.state != running, timeout_s, "operation end")
    return call()


def check_activation(rank0, rank1, tmp_path) -> None:
    """A model staged on rank 0 only is refused with the rank named and nothing switches;
    staged on every rank, activation switches the whole group."""
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
    uncordon = node_pb2.CordonRequest(operation_id="uncordon", cordoned=False)
    stubs[0].Cordon(uncordon, timeout=5)
    s = collect(rank0.inference, note(0, 8, request_id="on-v2"), 60)
    assert s.final is not None and s.final.finish_reason != inference_pb2.FINISH_REASON_ERROR


def wait_failed(rank0: NodeProcess, timeout_s: float) -> tuple[str, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            st = rank0.status()
        except grpc.RpcError:
            break  # exited already: the reason is in its log
        if st.lifecycle == FAILED:
            return st.lifecycle_reason, time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"rank 0 not FAILED within {timeout_s}s: {rank0.stderr()[-2000:]}")


@pytest.mark.slow
@pytest.mark.allow_blocking("drives node processes")
def test_killing_rank_1_fails_the_group_and_streams_move_on(
    group_model, tmp_path, start_coordinator
):
    """kill -9 rank 1 while streams run, through a coordinator with a single node beside
    the group (its digest differs: streams restart there, allow_restart) and straight to
    rank 0 (error finals naming rank 1); no rank remains; restarted, the group re-forms."""
    logs = tmp_path / "logs"
    with ExitStack() as stack:
        rank0, rank1 = start_group(stack, group_model, logs, "tensor")
        single = stack.enter_context(NodeProcess(group_model, node_id="beside-the-group"))
        single.start(logs)
        single.wait_serving()
        co = start_coordinator(nodes=[rank0.address, single.address])
        listing = co.wait_routable(2)
        # The group is one row for the coordinator, its ranks beneath it in `fleetctl nodes`.
        group_row = next(n for n in listing.nodes if n.status.node_id == "group-tensor-0")
        assert [r.rank for r in group_row.status.group.ranks] == [0, 1]
        console = Console(width=200, record=True)
        console.print(fleet_table(listing))
        assert "rank 1" in console.export_text()
        started = [threading.Event() for _ in range(10)]

        def one(i: int):
            def seen(s) -> None:
                if s.ids:
                    started[i].set()

            if i < 8:  # through the coordinator
                request = note(i, 150, request_id=f"co-{i}", allow_restart=True)
                return collect(co.inference, request, 120, seen)
            return collect(rank0.inference, note(i, 150, request_id=f"direct-{i}"), 120, seen)

        out, threads = in_threads(one, list(range(10)))
        for event in started:
            assert event.wait(60), "a stream did not start"
        assert rank0.status().load.running > 0, "no stream runs on the group"
        rank1.proc.kill()
        reason, _ = wait_failed(rank0, 20)
        assert "rank 1 (127.0.0.1:" in reason, reason
        for t in threads:
            t.join(timeout=120)
        for s in out[:8]:
            assert s.error is None, s.error
            assert s.final.finish_reason != inference_pb2.FINISH_REASON_ERROR, s.final.message
        for s in out[8:]:
            assert s.final is not None, s.error
            assert s.final.finish_reason == inference_pb2.FINISH_REASON_ERROR
            assert "rank 1" in s.final.message and "another node" in s.final.message
        # No rank is left behind: rank 0 exits for its service manager, rank 1 is dead.
        assert rank0.wait_exit(timeout_s=20) == GROUP_FAILED_EXIT_CODE
        assert rank1.proc.poll() is not None
        # The service manager restarts both; the group forms again and serves.
        for proc in (rank0, rank1):
            proc.restart(logs)
        rank0.wait_serving(timeout_s=90)
        co.wait_routable(2, timeout_s=60)
        again = collect(co.inference, note(0, 8, request_id="after-reform"), 60)
        assert again.final is not None and again.final.finish_reason != (
            inference_pb2.FINISH_REASON_ERROR
        )


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


@pytest.mark.allow_blocking("drives a process tree")
def test_a_rank_dies_with_the_process_that_started_it(group_model, tmp_path):
    """PR_SET_PDEATHSIG: a rank (here waiting for its peers) ends when its supervisor is
    killed, so no rank outlives it holding its port and weights."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signals are Linux's")
    group = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    rank = [sys.executable, "-m", "node_agent.main", "--model", str(group_model), "--plaintext"]
    rank += ["--listen", "127.0.0.1:0", "--no-mdns", "--group", group, "--rank", "0"]
    rank += ["--state-dir", str(tmp_path / "state")]
    supervisor = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen({rank!r}, stdout=subprocess.PIPE, text=True)\n"
        "print(p.pid, flush=True)\n"
        "p.stdout.readline()\n"  # the rank's listening line: it runs, waiting for rank 1
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    sup = subprocess.Popen([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(sup.stdout.readline())
        assert sup.stdout.readline().strip() == "up"
        sup.kill()
        sup.wait(timeout=10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
            assert time.monotonic() < deadline, "the rank outlived its supervisor"
            time.sleep(0.05)
    finally:
        if sup.poll() is None:
            sup.kill()
        if "pid" in locals() and Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)  # a failed check leaves nothing behind either


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
