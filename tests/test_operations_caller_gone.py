"""A node operation whose caller goes away mid-call (its coordinator killed while the node is
still entering DRAINING) ends anyway: the record is never left running with nothing to end
it, so the coordinator that retries the same operation id finds it ended.

Real Operations, Lifecycle, RequestRegistry and state file; no engine or gRPC server (the
caller's cancellation is what grpc.aio does to a handler whose client disconnects). The
agent's `enter` callback is replaced by one that makes the lifecycle transition and then
waits on a gate, standing in for the health update the agent awaits there."""

from __future__ import annotations

import asyncio

from node_agent.lifecycle import Lifecycle, State
from node_agent.node_state import NodeState
from node_agent.operations import Operations
from node_agent.requests import RequestRegistry


def _ops(tmp_path, gate: asyncio.Event, entered: asyncio.Event) -> tuple[Operations, Lifecycle]:
    lifecycle = Lifecycle(node_id="gone-node")
    for state in (State.LOADING, State.WARMING, State.READY):
        lifecycle.transition(state, "test")

    async def enter(state: State, reason: str) -> None:
        lifecycle.transition(state, reason)
        entered.set()
        await gate.wait()

    ops = Operations(
        node_id="gone-node",
        state=NodeState(),
        state_dir=tmp_path / "state",
        lifecycle=lifecycle,
        registry=RequestRegistry(node_id="gone-node"),
        staging=None,
        drain_timeout_s=5.0,
        configured_model=None,
        model_info=None,
        enter=enter,
        load_and_warm=None,
        request_restart=None,
    )
    return ops, lifecycle


async def _cancel_mid_call(call, entered: asyncio.Event) -> None:
    """Start `call`, cancel it once it is blocked inside the node, as a lost caller does."""
    entered.clear()
    task = asyncio.create_task(call)
    await asyncio.wait_for(entered.wait(), 10)  # the handler now waits on the gate
    assert not task.done()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def test_a_drain_whose_caller_went_away_still_ends(tmp_path):
    async def run():
        gate, entered = asyncio.Event(), asyncio.Event()
        ops, lifecycle = _ops(tmp_path, gate, entered)
        await _cancel_mid_call(ops.drain("op-drain-1", 5.0, "rollout"), entered)
        assert lifecycle.state is State.DRAINING
        gate.set()
        for _ in range(200):
            rec = ops.find("op-drain-1")
            if rec.state != "running":
                break
            await asyncio.sleep(0.01)
        assert (rec.state, lifecycle.state) == ("done", State.DRAINED), rec.message
        again = await ops.drain("op-drain-1", 5.0, "rollout")  # the coordinator's retry
        assert again is rec and again.state == "done"
        saved = await asyncio.to_thread(NodeState.load, tmp_path / "state")
        assert saved.operations[-1].state == "done"

    asyncio.run(run())


def test_a_cordon_whose_caller_went_away_still_ends(tmp_path):
    async def run():
        gate, entered = asyncio.Event(), asyncio.Event()
        ops, lifecycle = _ops(tmp_path, gate, entered)
        await _cancel_mid_call(ops.drain("op-drain-2", 5.0, ""), entered)
        gate.set()
        for _ in range(200):
            if ops.find("op-drain-2").state != "running":
                break
            await asyncio.sleep(0.01)
        gate.clear()
        await _cancel_mid_call(ops.cordon("op-uncordon", False, "back"), entered)
        gate.set()
        for _ in range(200):
            rec = ops.find("op-uncordon")
            if rec.state != "running":
                break
            await asyncio.sleep(0.01)
        assert rec.state == "done" and lifecycle.state is State.READY, rec.message
        assert not ops.state.cordoned

    asyncio.run(run())
