"""The checks a node passes after it activated new weights, before it takes traffic again.

A gate is `async check(ctx) -> Optional[str]` (None passes; a string is why it failed),
and may have `async prepare(ctx)`, run on each node before it is drained (while it still
serves the current version). The rollout runs the smoke gate, then the eval gate (the
quality suite against the current version's score), the shadow gate (a shadow run's verdict
on real traffic) and the operator's command gate when configured.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import grpc

from cluster.api import SMOKE_METADATA_KEY, inference_pb2, node_pb2
from cluster.client import build_request
from cluster.config import RolloutSection
from cluster.digest import served_digest
from cluster.quality import evaluation
from coordinator.baseline_store import MemoryBaselines
from coordinator.node_link import NodeLink

log = logging.getLogger(__name__)

SMOKE_TIMEOUT_S = 60.0
_OK = (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)


@dataclass(frozen=True)
class GateContext:
    rollout_id: str
    node_id: str
    address: str
    link: NodeLink
    weights_digest: str  # the model the node must now serve ("" for a release restart)
    group: Optional[node_pb2.NodeGroup] = None  # a node group's shape; None for a single node

    @property
    def served_digest(self) -> str:
        """What the node's generations report while it serves weights_digest (a node group's
        digest adds its layout: docs/node-groups.md)."""
        return served_digest(self.weights_digest, self.group)


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
            req = build_request(
                messages=[("user", f"Rollout smoke test {i}: reply with one word.")],
                max_tokens=self._max_tokens,
                temperature=0.0,
                request_id=f"{ctx.rollout_id}/{ctx.node_id}/smoke-{i}",
            )
            tokens, final = 0, None
            try:
                async for chunk in ctx.link.generate(
                    req, SMOKE_TIMEOUT_S, metadata=((SMOKE_METADATA_KEY, "1"),)
                ):
                    tokens += len(chunk.token_ids)
                    if chunk.HasField("final"):
                        final = chunk.final
            except grpc.aio.AioRpcError as err:
                return f"smoke request {i} failed: {err.code().name}: {err.details()}"
            if final is None or final.finish_reason not in _OK or tokens == 0:
                why = final.message if final is not None else "no final chunk"
                return f"smoke request {i} ended without a completion ({why})"
            if ctx.weights_digest and final.model.weights_digest != ctx.served_digest:
                return (
                    f"smoke request {i} was served by weights {final.model.weights_digest[:19]}, "
                    f"not {ctx.served_digest[:19]}"
                )
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
        env = {
            **os.environ,
            "NODE_ID": ctx.node_id,
            "NODE_ADDRESS": ctx.address,
            "WEIGHTS_DIGEST": ctx.weights_digest,
            "ROLLOUT_ID": ctx.rollout_id,
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            return f"gate command {self._argv[0]!r} could not start: {exc}"
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=self._timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"gate command did not finish in {self._timeout:g}s"
        return None if code == 0 else f"gate command exited with {code}"


class EvalGate:
    """The evaluation harness as a gate: the suite runs on the node before it is drained
    (the current version's score, measured once per rollout) and again after it activated
    the new weights; the node rejoins only if the new score is within `margin` of the old
    one and at least `min_score`. Only scores are kept, never notes."""

    name = "eval"

    def __init__(
        self,
        suite_path: Path,
        *,
        margin: float,
        min_score: float = 0.0,
        template: str = "",
        concurrency: int = 4,
        timeout_s: float = 300.0,
        baselines=None,
    ):
        self._suite = evaluation.load_suite(
            suite_path
        )  # a bad suite stops the coordinator at start
        self._margin = margin
        self._min = min_score
        self._template = template
        self._concurrency = concurrency
        self._timeout = timeout_s
        # (rollout, digest) -> report; in the state database (baseline_store.py) when given
        self.baselines = baselines if baselines is not None else MemoryBaselines()

    async def _run(self, ctx: GateContext, what: str) -> evaluation.Report:
        async def generate(req: inference_pb2.GenerateRequest) -> inference_pb2.FinalInfo:
            return await evaluation.final_of(
                ctx.link.generate(req, self._timeout, metadata=((SMOKE_METADATA_KEY, "1"),))
            )

        report = await evaluation.run_suite(
            self._suite,
            generate,
            target=ctx.address,
            label=f"{ctx.node_id} {what}",
            template=self._template,
            concurrency=self._concurrency,
            run_id=f"{ctx.rollout_id}/{ctx.node_id}/eval-{what}",
        )
        log.info(
            "rollout=%s node=%s eval %s: score %.3f, schema-valid %.0f%%, truncated %d of %d",
            ctx.rollout_id,
            ctx.node_id,
            what,
            report.summary["score"],
            100 * report.summary["schema_valid"],
            report.summary["truncated"],
            len(report.cases),
        )
        return report

    async def prepare(self, ctx: GateContext) -> Optional[str]:
        """Score the current version on this node (still serving it), once per rollout."""
        key = (ctx.rollout_id, ctx.weights_digest)
        if await self.baselines.has(*key):
            return None
        report = await self._run(ctx, "baseline")
        if not any(c.ok for c in report.cases):
            return (
                f"the baseline run on the current version failed every case ({report.cases[0].error}); "
                "fix the node or the suite, then start the rollout again"
            )
        await self.baselines.put(*key, report)
        return None

    async def check(self, ctx: GateContext) -> Optional[str]:
        baseline = await self.baselines.get(ctx.rollout_id)
        report = await self._run(ctx, "candidate")
        why = evaluation.gate_verdict(report, baseline, margin=self._margin, min_score=self._min)
        if why is None and baseline is None:
            log.warning(
                "rollout=%s node=%s eval gate found no baseline recorded for this rollout; "
                "checked the floor only",
                ctx.rollout_id,
                ctx.node_id,
            )
        return why


class ShadowGate:
    """A shadow run's report as the evidence (docs/shadow.md): the node rejoins only if this
    coordinator's latest shadow run compared exactly the weights the node now serves against
    the live model on real traffic, and its verdict is pass (scores within its margin over at
    least its minimum of samples, per template)."""

    name = "shadow"

    def __init__(self, shadow):
        self._shadow = shadow  # coordinator/shadow.py

    async def check(self, ctx: GateContext) -> Optional[str]:
        if not ctx.weights_digest:
            return None  # a release restart: the weights do not change
        report = self._shadow.report()
        if not report.shadow_id:
            return (
                "no shadow run on this coordinator to take as evidence (one kept only in memory is forgotten at a restart); "
                "serve the new weights on a candidate node and run `fleetctl shadow start`"
            )
        digests = {d for t in report.by_template for d in t.candidate.digests}
        if digests != {ctx.served_digest}:
            shown = ", ".join(sorted(d[:19] for d in digests)) or "none yet"
            return (
                f"shadow run {report.shadow_id} compared weights {shown}, not exactly "
                f"{ctx.served_digest[:19]}"
            )
        if report.verdict != "pass":
            return f"shadow run {report.shadow_id}: {report.verdict}: {report.reason}"
        return None


def default_gates(settings: RolloutSection, shadow=None, baselines=None) -> list[Gate]:
    gates: list[Gate] = [SmokeGate(settings.rollout_smoke_requests)]
    if settings.rollout_eval_suite:
        gates.append(
            EvalGate(
                Path(settings.rollout_eval_suite),
                margin=settings.rollout_eval_margin,
                min_score=settings.rollout_eval_min_score,
                template=settings.rollout_eval_template,
                baselines=baselines,
            )
        )
    if settings.rollout_shadow_gate and shadow is not None:
        gates.append(ShadowGate(shadow))
    if settings.rollout_gate_command:
        gates.append(CommandGate(settings.rollout_gate_command, settings.rollout_gate_timeout_s))
    return gates
