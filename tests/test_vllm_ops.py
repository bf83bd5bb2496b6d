"""Node operations on a vLLM node: activate restarts the vLLM server on the new weights
after the drain; no vLLM process outlives the agent, even a SIGKILLed one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster.api import common_pb2, node_pb2
from cluster.client import build_request
from cluster.digest import weights_digest
from tests.test_node_ops import DONE, ops, wait_op
from tests.test_vllm_node import _run
from tests.vllm_support import START_TIMEOUT_S, VLLM_ENV, group_alive, vllm_node_args

pytestmark = [pytest.mark.usefixtures("as_node_caller"), pytest.mark.slow]


def _wait_gone(pgid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid):
        assert time.monotonic() < deadline, (
            f"vLLM processes of group {pgid} still alive: {group_alive(pgid)}"
        )
        time.sleep(0.2)


def test_activate_restarts_the_server_on_new_weights_and_nothing_outlives_the_agent(
    start_node, tiny_model, vllm_python, tmp_path
):
    from cluster.tinymodel import TinyModelSpec, make_tiny_model

    new_model = make_tiny_model(tmp_path / "tiny-qwen2-v2", TinyModelSpec(seed=7))
    old, new = weights_digest(tiny_model), weights_digest(new_model)
    node = start_node(*vllm_node_args(vllm_python), node_id="vllm-swap", env=VLLM_ENV, wait=False)
    node.wait_serving(START_TIMEOUT_S)
    stub = ops(node)
    first = node.status().engine_server.pid

    staged = wait_op(
        node,
        lambda: stub.StageModel(
            node_pb2.StageModelRequest(
                operation_id="v-s1", source_path=str(new_model), version="v2", expected_digest=new
            ),
            timeout=5,
        ),
        "staged",
    )
    assert staged.operation.state == DONE, staged.operation.message
    wait_op(
        node, lambda: stub.Drain(node_pb2.DrainRequest(operation_id="v-d1"), timeout=5), "drained"
    )
    act = wait_op(
        node,
        lambda: stub.Activate(
            node_pb2.ActivateRequest(operation_id="v-a1", weights_digest=new), timeout=5
        ),
        "activated",
        timeout_s=START_TIMEOUT_S,
    )
    assert act.operation.state == DONE, act.operation.message
    st = act.status
    assert (
        st.model.weights_digest == new
        and st.model.version == "v2"
        and st.previous_model.weights_digest == old
    )
    assert st.model.engine == "vllm" and st.lifecycle == common_pb2.LIFECYCLE_READY and st.cordoned
    second = st.engine_server.pid
    assert second not in (0, first), "activation starts a new vLLM server on the new weights"
    assert st.engine_server.restarts == 0, "a planned restart is not a crash"
    _wait_gone(first)
    stub.Cordon(node_pb2.CordonRequest(operation_id="v-u1", cordoned=False), timeout=5)
    _, _, final = _run(node, build_request(prompt="Plan:", max_tokens=6, request_id="on-new"))
    assert final.model.weights_digest == new

    # The agent is SIGKILLed: the server hears of it (PR_SET_PDEATHSIG) and its group exits.
    node.proc.kill()
    node.proc.wait(timeout=10)
    _wait_gone(second)

    # A group a dead agent left behind (planted here: a process naming itself vllm in the
    # pid file's group) is killed by the next agent before it starts its own server.
    stale = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "vllm-left-behind"],
        start_new_session=True,
    )
    try:
        (node.state_dir / "vllm-server.pid").write_text(str(stale.pid))
        node.restart(tmp_path / "logs")
        assert stale.wait(timeout=30) == -9
    finally:
        if stale.poll() is None:
            os.killpg(stale.pid, 9)
    node.wait_serving(START_TIMEOUT_S)
    st = node.status()
    assert st.model.weights_digest == new, (
        "the activated model is what the agent serves after a restart"
    )
    assert st.engine_server.pid not in (0, second)
