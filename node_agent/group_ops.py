"""A node group stages as one node: rank 0 passes each StageModel on to the other ranks,
whose agents stage the same source path on their own hosts, digest-checked as if told
directly; activation then finds every rank's own copy (docs/node-groups.md)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from node_agent.engine import EngineClosed

log = logging.getLogger(__name__)


def wire_group_staging(engine, ops, loop: asyncio.AbstractEventLoop) -> None:
    """Connect a group engine (GroupMlxEngine) and this agent's Operations."""
    if engine.follower:

        def stage(op_id: str, source: str, model_id: str, version: str, expected: str) -> None:
            # Called on the engine thread: the staging runs on the agent's loop, in the background.
            loop.call_soon_threadsafe(
                lambda: loop.create_task(
                    ops.stage(op_id, Path(source), model_id, version, expected)
                )
            )

        engine.on_stage = stage
        return
    own = ops.stage

    async def stage_on_every_rank(op_id, source, model_id, version, expected):
        record = await own(op_id, source, model_id, version, expected)
        try:
            engine.share_stage(op_id, str(source), model_id, version, expected)
        except EngineClosed as exc:
            log.warning("stage %s not passed on to the group's other ranks: %s", op_id, exc)
        return record

    ops.stage = stage_on_every_rank
