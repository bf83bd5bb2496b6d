"""Node groups failing as one unit (docs/node-groups.md): a rank killed under load, a rank
with other weights, a model a mode cannot shard, and a rank outliving its supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from rich.console import Console

from cluster.api import inference_pb2
from cluster.fleetctl.nodes_cmd import fleet_table
from node_agent.group import GROUP_FAILED_EXIT_CODE
from tests.fleet_helpers import collect, in_threads, note
from tests.group_helpers import FAILED, free_ports, make_group_model, start_group, wait_failed
from tests.procs import NodeProcess


@pytest.fixture(scope="module")
def group_model(tmp_path_factory) -> Path:
    return make_group_model(tmp_path_factory.mktemp("models") / "tiny-group")


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


def test_tensor_mode_refuses_a_quantized_split_into_partial_groups(tmp_path):
    """Qwen2.5-72B-Instruct-4bit's shape (hidden 8,192, MLP 29,568, quantization groups of
    64): two ranks split it into whole groups, four do not (29,568 / 4 = 7,392 = 115.5
    groups), which mlx refuses inside the load; the check says so before any rank loads.
    The check reads only config.json, so no weights are made here."""
    import json
    from types import SimpleNamespace

    from node_agent.group import GroupSpec
    from node_agent.group_engine import GroupMlxEngine

    config = {
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "quantization": {"group_size": 64, "bits": 4},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    def problem(size: int):
        spec = GroupSpec(tuple(f"10.0.0.{i}:5000" for i in range(size)), 0, "ring", "tensor", 10)
        return GroupMlxEngine._shard_problem(SimpleNamespace(group_spec=spec, _path=tmp_path))

    assert problem(2) is None
    four = problem(4)
    assert four and "intermediate_size 29568" in four and "quantization groups of 64" in four
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}})
    )
    assert problem(4) is None  # 7,392 / 32 = 231 whole groups
