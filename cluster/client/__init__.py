"""The Python client for clinical apps: stream or generate, with typed errors.

    client = FleetClient("127.0.0.1:7700")
    result = client.generate(prompt="...", max_tokens=400, timeout_s=60)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import grpc

from cluster.api import inference_pb2, inference_pb2_grpc
from cluster.client.errors import FleetError, GenerationInterruptedError, from_rpc_error

__all__ = ["FleetClient", "GenerateResult", "FleetError", "GenerationInterruptedError", "build_request"]

_FINISH_NAMES = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
    inference_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass
class GenerateResult:
    """A whole completion with the final record's metadata."""

    text: str
    token_ids: list[int]
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

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "chunks"}


def build_request(
    *,
    prompt: Optional[str] = None,
    messages: Optional[Sequence[tuple[str, str]]] = None,
    max_tokens: int,
    request_id: str = "",
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams()
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                        ("min_p", min_p), ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    req = inference_pb2.GenerateRequest(request_id=request_id, sampling=sampling,
                                        max_tokens=max_tokens, stop=list(stop))
    if messages is not None:
        req.chat.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in messages)
    elif prompt is not None:
        req.prompt = prompt
    return req


class FleetClient:
    """A synchronous client of one Inference endpoint (a node or a coordinator)."""

    def __init__(self, target: str, *, channel: Optional[grpc.Channel] = None):
        self.target = target
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "FleetClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(self, request: inference_pb2.GenerateRequest, *,
               timeout_s: Optional[float] = None) -> Iterator[inference_pb2.GenerateChunk]:
        """Yield chunks as they arrive; raises a FleetError subclass on failure."""
        call = self._stub.Generate(request, timeout=timeout_s)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def generate(self, request: Optional[inference_pb2.GenerateRequest] = None, *,
                 timeout_s: Optional[float] = None, **kwargs) -> GenerateResult:
        """Run one request to the end and return its text and metadata; raises
        GenerationInterruptedError (with the partial result) if the node ended it early."""
        request = request if request is not None else build_request(**kwargs)
        start = time.perf_counter()
        text, ids, final, chunks = [], [], None, 0
        for chunk in self.stream(request, timeout_s=timeout_s):
            chunks += 1
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            if chunk.HasField("final"):
                final = chunk.final
        if final is None:
            raise FleetError(f"stream for request {request.request_id or '(no id)'} ended without a final chunk")
        result = GenerateResult(
            text="".join(text),
            token_ids=ids,
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
            client_total_ms=(time.perf_counter() - start) * 1000.0,
            chunks=chunks,
            message=final.message,
        )
        if result.finish_reason in ("cancelled", "error"):
            raise GenerationInterruptedError(final.message or f"generation ended: {result.finish_reason}",
                                             partial=result, finish_reason=result.finish_reason)
        return result
