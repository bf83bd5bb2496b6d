"""The checks a node passes after it activated new weights, before it takes traffic again.

A gate is `async check(ctx) -> Optional[str]` (None passes; a string is why it failed).
The rollout runs the smoke gate, then the operator's command gate if configured; the
quality issue plugs a real scorer in the same way (`Rollouts(gates=[...])`).
"""

from __future__ import annotations

import asyncio
import os
import shlex
from dataclasses import dataclass
from typing import Optional, Protocol

import grpc

from cluster.api import SMOKE_METADATA_KEY, inference_pb2
from cluster.client import build_request
from coordinator.node_link import NodeLink

SMOKE_TIMEOUT_S = 60.0
_OK = (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)


@dataclass(frozen=True)
class GateContext:
    rollout_id: str
    node_id: str
    address: str
    link: NodeLink
    weights_digest: str             # what the node must now serve ("" for a release restart)


class Gate(Protocol):
    name: str

    async def check(self, ctx: GateContext) -> Optional[str]: ...


class SmokeGate:
    """Synthetic generations straight to the node: each must stream tokens and end with
    stop or length, from the expected weights."""

    name = "smoke"

    def __init__(self, requests: int = 2, max_tokens: int = 8):
        self._n = requests
        self._max_tokens = max_tokens

    async def check(self, ctx: GateContext) -> Optional[str]:
        for i in range(self._n):
            req = build_request(messages=[("user", f"Rollout smoke test {i}: reply with one word.")],
                                max_tokens=self._max_tokens, temperature=0.0,
                                request_id=f"{ctx.rollout_id}/{ctx.node_id}/smoke-{i}")
            tokens, final = 0, None
            try:
                async for chunk in ctx.link.generate(req, SMOKE_TIMEOUT_S, metadata=((SMOKE_METADATA_KEY, "1"),)):
                    tokens += len(chunk.token_ids)
                    if chunk.HasField("final"):
                        final = chunk.final
            except grpc.aio.AioRpcError as err:
                return f"smoke request {i} failed: {err.code().name}: {err.details()}"
            if final is None or final.finish_reason not in _OK or tokens == 0:
                why = final.message if final is not None else "no final chunk"
                return f"smoke request {i} ended without a completion ({why})"
            if ctx.weights_digest and final.model.weights_digest != ctx.weights_digest:
                return (f"smoke request {i} was served by weights {final.model.weights_digest[:19]}, "
                        f"not {ctx.weights_digest[:19]}")
        return None


class CommandGate:
    """The operator's own check (an evaluation script): exit 0 passes. It gets NODE_ID,
    NODE_ADDRESS, WEIGHTS_DIGEST and ROLLOUT_ID in its environment; its output is not kept
    (it may contain generated text), only its exit status."""

    name = "command"

    def __init__(self, command: str, timeout_s: float):
        self._argv = shlex.split(command)
        self._timeout = timeout_s

    async def check(self, ctx: GateContext) -> Optional[str]:
        env = {**os.environ, "NODE_ID": ctx.node_id, "NODE_ADDRESS": ctx.address,
               "WEIGHTS_DIGEST": ctx.weights_digest, "ROLLOUT_ID": ctx.rollout_id}
        try:
            proc = await asyncio.create_subprocess_exec(*self._argv, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            return f"gate command {self._argv[0]!r} could not start: {exc}"
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=self._timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return f"gate command did not finish in {self._timeout:g}s"
        return None if code == 0 else f"gate command exited with {code}"


def default_gates(settings) -> list[Gate]:
    gates: list[Gate] = [SmokeGate(settings.rollout_smoke_requests)]
    if settings.rollout_gate_command:
        gates.append(CommandGate(settings.rollout_gate_command, settings.rollout_gate_timeout_s))
    return gates
