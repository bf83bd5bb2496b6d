"""Requests in, results out: shared by the sync and the async client."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from studiofleet_client.api import inference_pb2
from studiofleet_client.errors import (
    FleetError,
    GenerationInterruptedError,
    SchemaViolationError,
    add_context,
)

__all__ = ["GenerateResult", "Quality", "ResultBuilder", "build_request", "with_request_id"]

_FINISH_NAMES = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
    inference_pb2.FINISH_REASON_ERROR: "error",
}
_PRIORITIES = {
    "interactive": inference_pb2.PRIORITY_INTERACTIVE,
    "batch": inference_pb2.PRIORITY_BATCH,
}


@dataclass
class GenerateResult:
    """A whole completion with the final record's metadata."""

    text: str = field(repr=False)  # content: never in a repr, a log or a failed assert
    token_ids: list[int] = field(repr=False)
    finish_reason: str
    request_id: str
    node_id: str
    model_id: str
    weights_digest: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    seed: int
    queue_wait_ms: float
    time_to_first_token_ms: float
    total_ms: float
    decode_tokens_per_s: float
    client_total_ms: float = 0.0
    message: str = ""
    chunks: int = field(default=0, repr=False)
    failovers: int = 0  # times the coordinator moved the request
    nodes: list[str] = field(default_factory=list)  # nodes that served it, in order
    restarts: int = 0  # times it started over on other weights (text: the last run's)
    target: str = ""  # the address that answered
    attempts: int = 1  # client attempts, this one included
    coordinator_failovers: int = 0  # times the client resumed it on another coordinator
    output: object = field(
        default=None, repr=False
    )  # the validated object (output_format requests)
    output_format: str = ""  # note template, or json_schema:<digest>
    quality: Optional["Quality"] = None  # the note's score (output_format/template requests)
    template: str = ""  # prompt template version used, e.g. soap-note@qwen2/v2

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("chunks", "output")}


@dataclass(frozen=True)
class Quality:
    """A note's quality score: the weighted total and each named sub-score (0..1)."""

    total: float
    parts: dict[str, float]
    details: dict[str, str]
    rubric: str

    @classmethod
    def from_proto(cls, q: inference_pb2.QualityScore) -> "Quality":
        return cls(
            q.total,
            {p.name: p.score for p in q.parts},
            {p.name: p.detail for p in q.parts if p.detail},
            q.rubric,
        )


def build_request(
    *,
    prompt: Optional[str] = None,
    messages: Optional[Sequence[tuple[str, str]]] = None,
    max_tokens: int = 0,
    request_id: str = "",
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    priority: Optional[str] = None,
    session_key: str = "",
    allow_restart: bool = False,
    template: Optional[str] = None,
    template_version: str = "",
    variables: Optional[dict[str, str]] = None,
    json_schema: Optional[Union[str, dict]] = None,
    note_template: Optional[str] = None,
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; `priority` is "interactive" (default) or "batch", `session_key`
    an opaque affinity hint for routers (e.g. a conversation id; never logged).
    `allow_restart`: if a started stream's weights are gone from the fleet, the coordinator
    may start it over on other weights (a chunk with `restarted` voids what came before).
    `template` names a prompt template (filled with `variables`; max_tokens 0 takes its
    budget); `json_schema` or `note_template` constrains the output, and the result then
    carries the validated object (`output`) and a quality score, or generate raises
    SchemaViolationError."""
    sampling = inference_pb2.SamplingParams()
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("min_p", min_p),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
    ):
        if value is not None:
            setattr(sampling, name, value)
    if priority is not None and priority not in _PRIORITIES:
        raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, got {priority!r}")
    req = inference_pb2.GenerateRequest(
        request_id=request_id,
        sampling=sampling,
        max_tokens=max_tokens,
        stop=list(stop),
        priority=_PRIORITIES.get(priority, inference_pb2.PRIORITY_UNSPECIFIED),
        session_key=session_key,
        allow_restart=allow_restart,
    )
    if messages is not None:
        req.chat.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in messages)
    elif prompt is not None:
        req.prompt = prompt
    elif template is not None:
        req.template.name = template
        req.template.version = template_version
        req.template.variables.update(variables or {})
    if json_schema is not None:
        req.output_format.json_schema = (
            json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        )
    elif note_template is not None:
        req.output_format.note_template = note_template
    return req


def with_request_id(request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
    """The request itself if it has an id; else a copy with a new one, so every attempt
    and every error message names the same request."""
    if request.request_id:
        return request
    copy = inference_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = f"req-{uuid.uuid4().hex[:16]}"
    return copy


class ResultBuilder:
    """Collects a stream's chunks into a GenerateResult; a `restarted` chunk voids the text
    and token ids collected before it."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.started = time.perf_counter()
        self._text: list[str] = []
        self._ids: list[int] = []
        self._final: Optional[inference_pb2.FinalInfo] = None
        self._chunks = 0

    def add(self, chunk: inference_pb2.GenerateChunk) -> None:
        self._chunks += 1
        if chunk.restarted:
            self._text.clear()
            self._ids.clear()
        self._text.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        if chunk.HasField("final"):
            self._final = chunk.final

    def result(self, *, target: str = "", attempts: int = 1) -> GenerateResult:
        """The result; raises FleetError if the stream had no final chunk and
        GenerationInterruptedError (with the partial result) if the node ended it early."""
        final = self._final
        if final is None:
            raise add_context(
                FleetError("the stream ended without a final chunk"),
                target=target,
                request_id=self.request_id,
                attempts=attempts,
            )
        result = GenerateResult(
            text="".join(self._text),
            token_ids=list(self._ids),
            finish_reason=_FINISH_NAMES.get(final.finish_reason, "unspecified"),
            request_id=final.request_id,
            node_id=final.node_id,
            model_id=final.model.model_id,
            weights_digest=final.model.weights_digest,
            prompt_tokens=final.usage.prompt_tokens,
            completion_tokens=final.usage.completion_tokens,
            cached_prompt_tokens=final.usage.cached_prompt_tokens,
            seed=final.seed,
            queue_wait_ms=final.timings.queue_wait_ms,
            time_to_first_token_ms=final.timings.time_to_first_token_ms,
            total_ms=final.timings.total_ms,
            decode_tokens_per_s=final.timings.decode_tokens_per_s,
            client_total_ms=(time.perf_counter() - self.started) * 1000.0,
            message=final.message,
            chunks=self._chunks,
            failovers=final.failovers,
            nodes=list(final.nodes) or ([final.node_id] if final.node_id else []),
            restarts=final.restarts,
            target=target,
            attempts=attempts,
            coordinator_failovers=final.coordinator_failovers,
            template=final.template,
        )
        if final.HasField("quality"):
            result.quality = Quality.from_proto(final.quality)
        if result.finish_reason in ("cancelled", "error"):
            exc = GenerationInterruptedError(
                final.message or f"generation ended: {result.finish_reason}",
                partial=result,
                finish_reason=result.finish_reason,
            )
            raise add_context(
                exc,
                target=target,
                request_id=result.request_id or self.request_id,
                attempts=attempts,
            )
        if final.HasField("structured"):
            st = final.structured
            result.output_format = st.format
            if not st.valid:
                exc = SchemaViolationError(
                    f"the completion is not a valid {st.format}: {st.error}",
                    rule=st.rule,
                    path=st.path,
                    result=result,
                )
                raise add_context(
                    exc,
                    target=target,
                    request_id=result.request_id or self.request_id,
                    attempts=attempts,
                )
            result.output = json.loads(st.json)
        return result
