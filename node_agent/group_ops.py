"""A node group stages as one node: rank 0 passes each StageModel on to the other ranks,
whose agents stage the same source path on their own hosts, digest-checked as if told
directly, and report how it went in their heartbeat; rank 0's stage operation ends only when
every rank has staged, or fails naming the rank that could not. Activation then finds every
rank's own copy. Weights pushed by a coordinator would reach rank 0 only: a group refuses
them (docs/node-groups.md)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from pathlib import Path

import grpc

from node_agent.engine import EngineClosed
from node_agent.operations import OperationError
from node_agent.staging import StagingError

log = logging.getLogger(__name__)

START_S = 60.0  # a rank that has not started a stage rank 0 passed on this long: it failed
_REPORTED = 3  # the newest stages a follower reports in each heartbeat
_REPORT_BYTES = 1200  # and at most this much of them (a heartbeat is one small datagram)


def wire_group_staging(engine, ops, staging, loop: asyncio.AbstractEventLoop) -> None:
    """Connect a group engine (GroupMlxEngine), this agent's Operations and StagingArea."""
    spec = engine.group_spec
    ops.serving_digest = lambda: engine.model_digest  # staged and activated by the model's own
    if engine.follower:
        asked: collections.deque[str] = collections.deque(maxlen=_REPORTED)

        def stage(op_id: str, source: str, model_id: str, version: str, expected: str) -> None:
            # Called on the engine thread: the staging runs on the agent's loop, in the background.
            def begin() -> None:
                asked.append(op_id)
                loop.create_task(ops.stage(op_id, Path(source), model_id, version, expected))

            loop.call_soon_threadsafe(begin)

        def report() -> dict:
            """How the stages rank 0 passed on went, newest last (read on the heartbeat thread)."""
            out = {}
            for op_id in list(asked):
                rec = ops.find(op_id)
                if rec is not None:
                    out[op_id] = [rec.state, rec.message[:300]]
            while out and len(json.dumps(out)) > _REPORT_BYTES:
                oldest = next(iter(out))
                if len(out) > 1:
                    del out[oldest]
                else:
                    out[oldest][1] = ""  # the state still says how it went
                    break
            return out

        engine.on_stage = stage
        engine.stage_report = report
        return

    async def stage_on_other_ranks(op_id, source, model_id, version, expected) -> str:
        try:
            engine.share_stage(op_id, str(source), model_id, version, expected)
        except EngineClosed as exc:
            raise OperationError(
                grpc.StatusCode.UNAVAILABLE,
                f"the group's other ranks were not told to stage it: {exc}",
            ) from None
        waiting, since = set(range(1, spec.size)), time.monotonic()
        while waiting:
            if engine.failure:
                raise OperationError(grpc.StatusCode.UNAVAILABLE, engine.failure)
            for rank in sorted(waiting):
                got = engine.staged_on(rank, op_id)
                if got is None and time.monotonic() - since > START_S:
                    raise OperationError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"{spec.describe(rank)} did not start staging it within {START_S:g}s; "
                        "see that rank's log and `fleetctl node status`, then stage again",
                    )
                if got is not None and got[0] == "failed":
                    raise OperationError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{spec.describe(rank)} could not stage it: {got[1] or 'see its log'}; "
                        "put the model at that path on every rank's host, then stage again",
                    )
                if got is not None and got[0] == "done":
                    waiting.discard(rank)
            if waiting:
                await asyncio.sleep(0.1)
        return f" on all {spec.size} ranks"

    ops.stage_on_other_ranks = stage_on_other_ranks

    def refuse_push(*args, **kwargs):
        raise StagingError(
            f"this node is a node group of {spec.size} ranks: pushed weights would reach "
            "rank 0 only; put the model at one path on every rank's host and stage it from "
            "there (`fleetctl rollout start --shared-path`, or StageModel with its source_path; "
            "docs/node-groups.md)"
        )

    staging.begin_push = refuse_push  # BeginPush and PushWeights both start with it
