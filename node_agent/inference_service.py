"""The Inference service on a node: validate, admit, stream, and end each request once."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Callable

import grpc

from cluster.api import SMOKE_METADATA_KEY, inference_pb2, inference_pb2_grpc
from cluster.config import NodeSettings
from cluster.logs import without_text
from cluster.validation import check_output_format_async, serves
from node_agent.engine import Engine, EngineClosed, EngineRequest
from node_agent.lifecycle import Lifecycle, State
from node_agent.node_state import NodeState
from node_agent.prompts import PromptError, apply_template, build_prompt_tokens
from node_agent.requests import EngineFailed, NodeStopping, Outcome, RequestRegistry, RequestStream
from node_agent.serving import Serving
from node_agent.validation import InvalidRequest, ValidRequest, check_length, display_id, validate

log = logging.getLogger(__name__)

PUSHBACK_KEY = "grpc-retry-pushback-ms"
# A caller cancelling this close to its deadline is counted as a deadline: the caller's
# timer fires first and cancels, a little before the server's copy of the deadline.
DEADLINE_SLACK_S = 0.5
# The outcome recorded when the RPC ends without the handler deciding one: the caller
# went away, its deadline passed, or the node's abort never reached a stalled writer.
CALLER_GONE = "caller cancelled"


def _smoke(context) -> bool:
    return any(k == SMOKE_METADATA_KEY for k, _v in (context.invocation_metadata() or ()))


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        *,
        node_id: str,
        settings: NodeSettings,
        engine: Engine,
        registry: RequestRegistry,
        lifecycle: Lifecycle,
        node_state: NodeState,
        serving: Callable[[], Serving],
        stopping: Callable[[], bool],
        engine_died: Callable[[str], Awaitable[None]],
    ):
        self._node_id = node_id
        self._settings = settings
        self._engine = engine
        self._registry = registry
        self._lifecycle = lifecycle
        self._node_state = node_state  # cordon and its reason (saved by Operations)
        self._serving = serving  # -> the model served now (replaced whole on a load)
        self._stopping = stopping  # -> True once the agent is shutting down
        self._engine_died = engine_died  # (reason): the engine is gone; the node enters FAILED

    async def _reject(
        self, context, request_id: str, code: grpc.StatusCode, message: str, trailing=()
    ) -> None:
        """Count, log and end the call with `code`; never returns (abort raises)."""
        self._registry.reject(request_id, code.name, message)
        await context.abort(code, message, trailing_metadata=trailing)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        node = self._node_id
        rid = display_id(request.request_id)
        try:
            req, prompt_tokens, matcher = await self._admit(request, context, rid)
            serving = self._serving()
            stream = self._registry.open(
                req,
                prompt_len=len(prompt_tokens),
                detokenizer=serving.tokenizer.detokenizer,
                eos_token_ids=serving.facts.eos_token_ids,
            )
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - never UNKNOWN, never request text in logs
            log.error(
                "node=%s request=%s internal error before accepting: %s",
                node,
                rid,
                without_text(exc),
            )
            await self._reject(
                context,
                rid,
                grpc.StatusCode.INTERNAL,
                f"node {node} hit an internal error on request {rid}; retry on another "
                "node and report the node log",
            )
        # Whatever ends the RPC (cancel, deadline, a stalled writer at shutdown), the engine
        # slot is freed and the outcome recorded, even if this generator is never resumed.
        context.add_done_callback(
            lambda _ctx: self._finish(stream, context, Outcome.CANCELLED, CALLER_GONE)
        )
        sent = False  # a chunk went out: an engine failure ends the stream with an error final
        try:
            self._engine.submit(
                EngineRequest(
                    key=stream.key,
                    prompt_tokens=prompt_tokens + list(req.prefix_token_ids),
                    prefix_len=len(req.prefix_token_ids),
                    max_tokens=req.max_tokens,
                    sampling=req.sampling,
                    matcher=matcher,
                    schema=req.output.schema_text if req.output is not None else "",
                    messages=req.messages,
                )
            )
            while True:
                chunk = await stream.next_chunk()
                if chunk is None:
                    continue
                if stream.finish is None:
                    sent = True
                    yield chunk
                    continue
                chunk.final.CopyFrom(
                    stream.final_info(node_id=node, model=self._serving().model_info)
                )
                yield chunk
                self._finish(stream, context, Outcome.COMPLETED, "")
                return
        except NodeStopping as exc:
            message = (
                f"node {node} stopped request {req.request_id} after {stream.completion_tokens} "
                f"tokens: {exc}; resume it on another node with prefix_token_ids"
            )
            self._finish(stream, context, Outcome.CANCELLED, str(exc))
            yield stream.node_final(
                inference_pb2.FINISH_REASON_CANCELLED,
                message,
                node_id=node,
                model=self._serving().model_info,
            )
        except (EngineFailed, EngineClosed) as exc:
            message = (
                f"node {node} failed request {req.request_id} after {stream.completion_tokens} "
                f"tokens: {exc}; retry or resume it on another node"
            )
            self._finish(stream, context, Outcome.FAILED, str(exc))
            if isinstance(exc, EngineFailed) and exc.status and not sent:
                # Nothing streamed yet: the call ends with the engine's status (an upstream's 429).
                code, hint = grpc.StatusCode[exc.status], exc.retry_after_ms
                await context.abort(
                    code,
                    f"node {node} could not run request {req.request_id}: {exc}",
                    trailing_metadata=((PUSHBACK_KEY, str(hint)),) if hint else (),
                )
            if not self._engine.alive:
                await self._engine_died(str(exc))
            yield stream.node_final(
                inference_pb2.FINISH_REASON_ERROR,
                message,
                node_id=node,
                model=self._serving().model_info,
            )
        except Exception as exc:  # noqa: BLE001 - a bug here must not look like a caller cancel
            if isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError)):
                raise
            log.error(
                "node=%s request=%s internal error: %s", node, req.request_id, without_text(exc)
            )
            self._finish(stream, context, Outcome.FAILED, f"internal error ({type(exc).__name__})")
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"node {node} hit an internal error on request {req.request_id} after "
                f"{stream.completion_tokens} tokens; retry on another node and report the node log",
            )
        finally:
            self._finish(stream, context, Outcome.CANCELLED, CALLER_GONE)

    def _finish(self, stream: RequestStream, context, outcome: Outcome, detail: str) -> None:
        """Record the request's one outcome (first call wins) and free its engine slot."""
        if stream.outcome is not None:
            return
        if detail is CALLER_GONE:
            if stream.aborted is not None:  # the node ended it, the writer never got to say so
                detail = str(stream.aborted)
            else:
                remaining = context.time_remaining()
                if remaining is not None and remaining < DEADLINE_SLACK_S:
                    outcome, detail = Outcome.DEADLINE, "caller deadline passed"
        if not stream.engine_done:  # a stop sequence, a cancel or an error ended it early
            self._engine.cancel(stream.key)
        self._registry.close(stream, outcome, detail)

    async def _admit(self, request, context, rid: str) -> tuple[ValidRequest, list[int]]:
        """Every check before a request is accepted; rejects (aborts) with the right status."""
        node = self._node_id
        state = self._lifecycle.state
        if self._stopping():
            await self._reject(
                context,
                rid,
                grpc.StatusCode.UNAVAILABLE,
                f"node {node} is shutting down; send the request to another node",
            )
        smoke = _smoke(context)
        if state is not State.READY and not (
            smoke and state is State.DRAINED
        ):  # a gate may test a drained node
            await self._reject(
                context,
                rid,
                grpc.StatusCode.UNAVAILABLE,
                f"node {node} is {state.value} ({self._lifecycle.snapshot.reason}); "
                "retry shortly or send the request to another node",
            )
        if self._node_state.cordoned and not smoke:
            await self._reject(
                context,
                rid,
                grpc.StatusCode.UNAVAILABLE,
                f"node {node} is cordoned ({self._node_state.cordon_reason or 'operator'}); "
                "send the request to another node",
            )
        serving = self._serving()
        facts, limits, info = serving.facts, serving.limits, serving.model_info
        try:
            req = validate(request, limits, with_output=False)
            if request.HasField("output_format"):  # a new schema compiles off the event loop
                req = replace(req, output=await check_output_format_async(request))
            if req.require_weights_digest and req.require_weights_digest != facts.weights_digest:
                await self._reject(
                    context,
                    req.request_id,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {node} serves weights {facts.weights_digest[:19]}, request "
                    f"{req.request_id} requires {display_id(req.require_weights_digest)[:19]}; "
                    "send it to a node serving those weights",
                )
            if not serves(info.model_id, info.version, request.model):
                await self._reject(
                    context,
                    req.request_id,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {node} serves model {info.model_id!r}, request {req.request_id} asks for "
                    "another model (GenerateRequest.model); send it to a node serving that model",
                )
            req = apply_template(req, info.family, limits.max_tokens)
            prompt_tokens = build_prompt_tokens(serving.tokenizer, req)
            max_tokens = check_length(
                len(prompt_tokens),
                len(req.prefix_token_ids),
                req.max_tokens,
                limits,
                fit=req.fit_context,
            )
            if max_tokens != req.max_tokens:
                req = replace(req, max_tokens=max_tokens)
            matcher = await self._matcher(req, context, rid, serving)
        except (InvalidRequest, PromptError) as exc:
            await self._reject(
                context,
                rid,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {rid} on node {node}: {exc}",
            )
        if self._registry.in_flight(req.request_id):
            await self._reject(
                context,
                req.request_id,
                grpc.StatusCode.ALREADY_EXISTS,
                f"request {req.request_id} is already running on node {node}; "
                "use a new request_id per request",
            )
        s = self._settings
        if len(self._registry) >= s.max_running + s.max_queued:
            retry_ms = s.retry_after_ms
            await self._reject(
                context,
                req.request_id,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node {node} is at capacity ({s.max_running} running, "
                f"{s.max_queued} queued); retry after {retry_ms} ms or use another node",
                trailing=((PUSHBACK_KEY, str(retry_ms)),),
            )
        return req, prompt_tokens, matcher

    async def _matcher(self, req: ValidRequest, context, rid: str, serving: Serving):
        """The grammar matcher for a constrained request on an engine that masks logits itself."""
        if req.output is None:
            return None
        if self._engine.server_enforces_schema:
            if req.prefix_token_ids:  # vLLM's grammar always starts at the first generated token
                await self._reject(
                    context,
                    rid,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {self._node_id} ({self._engine.name}) cannot resume a schema-constrained "
                    f"request after prefix_token_ids; resume request {rid} on an MLX node or start "
                    "it over",
                )
            return None
        return await asyncio.to_thread(serving.grammars.matcher, req.output, req.prefix_token_ids)
